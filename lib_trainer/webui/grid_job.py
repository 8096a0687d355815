"""The "Test it" job: a finished LoRA or embedding run's saved steps x strengths rendered by the host's txt2img
into one grid picture (lib_trainer/grid.py composes it).

Each saved step must be usable in a prompt under a name of its own while the grid renders, and gone afterwards:
an embedding's step file is registered with the host under a temporary word (the host's embedding folder is
reloaded afterwards, which drops it); a LoRA's step file is copied into the Lora folder under a temporary name
(``<name>__trainer_grid_<step>``), used as ``<lora:that-name:weight>``, and removed afterwards (also by the next
grid when a crash left one behind).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_trainer.errors import ConfigError
from lib_trainer.formats.files import write_atomic
from lib_trainer.grid import TestGridConfig, compose_grid, parse_strengths, pick_rows

GRID_METHODS = ("textual_inversion", "lora")
TEMP_MARK = "__trainer_grid_"
DEFAULT_SEED = 1234
USABLE_STATES = ("done", "interrupted")


@dataclass
class GridPlan:
    """What a grid job renders, fixed when it is submitted."""

    method: str
    name: str
    rows: list[tuple[int, str]]  # (step, saved file)
    strengths: list[float]  # LoRA weights; an embedding's columns are off / on
    settings: dict[str, Any]  # txt2img settings, the prompt with [name]
    out_dir: Path
    lora_dir: Path | None = None


def prepare_grid(config: TestGridConfig, manager: Any) -> GridPlan:
    """Check the source job (known, finished, LoRA or embedding, files still there) and plan the grid."""
    source = manager.get(config.job)
    if source is None:
        raise ConfigError(f"job {config.job!r} is not known (the job panel lists this session's jobs)", field="job")
    if source.method not in GRID_METHODS:
        raise ConfigError(
            f"job {config.job!r} trained {source.method}; the grid tests LoRA and embedding jobs", field="job"
        )
    if source.state not in USABLE_STATES or source.preflight:
        raise ConfigError(f"job {config.job!r} is {source.state}; test it once it has finished", field="job")
    saved = [(int(s["step"]), str(s["path"])) for s in source.saved if s.get("step") and Path(s["path"]).is_file()]
    # the main file is rewritten at every save and holds only the last step: the numbered copies hold each step
    paths = [path for _, path in saved]
    saved = [(step, path) for step, path in saved if paths.count(path) == 1] or saved[-1:]
    if not saved:
        raise ConfigError(f"job {config.job!r} has no saved file left to test", field="job")
    from lib_trainer.webui.jobs import METHODS  # the method table (imported here: it imports this module)

    spec = METHODS[source.method]
    name = spec.name(source.config)
    paths = spec.paths(manager.host.folders())
    preview = source.preview
    settings = dataclasses.asdict(preview) if preview is not None else {}
    settings.pop("enabled", None)
    if config.prompt.strip():
        settings["prompt"] = config.prompt
    settings.setdefault("prompt", "a photo of [name]")
    seed = config.seed if config.seed != -1 else settings.get("seed", -1)
    settings["seed"] = seed if seed != -1 else DEFAULT_SEED  # one seed for every cell: only the step differs
    settings["clip_skip"] = source.config.train.clip_skip
    strengths = parse_strengths(config.strengths) if source.method == "lora" else [0.0, 1.0]
    return GridPlan(
        method=source.method,
        name=name,
        rows=pick_rows(saved, config.rows),
        strengths=strengths,
        settings=settings,
        out_dir=Path(paths.log_dir) / name / "grids",
        lora_dir=Path(paths.lora_dir) if source.method == "lora" else None,
    )


def column_labels(plan: GridPlan) -> list[str]:
    """The grid's column headings."""
    if plan.method == "textual_inversion":
        return ["without", "with " + plan.name]
    return [f"weight {s:g}" for s in plan.strengths]


def run_grid(job: Any, host: Any, hooks: Any) -> Any:
    """Render the planned grid; the picture goes to the run folder's grids/ and into the job's previews."""
    plan: GridPlan = job.plan
    cells: list[list[Any]] = []
    job.total_steps = len(plan.rows) * len(plan.strengths)
    off_image = None
    with _step_names(plan, host) as names:
        for step, _ in plan.rows:
            row = []
            for strength in plan.strengths:
                if job.cancel_requested or host.interrupted():
                    return types.SimpleNamespace(stopped=True)
                if plan.method == "textual_inversion" and strength == 0.0 and off_image is not None:
                    row.append(off_image)  # the prompt without the word is the same for every step
                else:
                    job.status = f"step {step}, {column_labels(plan)[plan.strengths.index(strength)]}"
                    row.append(_render(host, plan, names[step], strength))
                    if plan.method == "textual_inversion" and strength == 0.0:
                        off_image = row[-1]
                job.step += 1
            cells.append(row)
    job.status = ""
    grid = compose_grid(cells, [f"step {step}" for step, _ in plan.rows], column_labels(plan))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = write_atomic(plan.out_dir / f"{plan.name}-grid-{stamp}.png", lambda tmp: grid.save(tmp, "PNG"))
    job.saved.append({"path": str(path), "step": 0})
    job.previews.append((plan.rows[-1][0], path))
    host.show_image(grid)
    return types.SimpleNamespace(stopped=False)


def _render(host: Any, plan: GridPlan, alias: str, strength: float) -> Any:
    settings = dict(plan.settings)
    prompt = settings["prompt"]
    if plan.method == "textual_inversion":
        prompt = prompt.replace("[name]", alias if strength else "")
    else:
        prompt = prompt.replace("[name]", plan.name) + f" <lora:{alias}:{strength:g}>"
    settings["prompt"] = re.sub(r"\s+,", ",", re.sub(r"\s+", " ", prompt)).strip(" ,")
    images = host.render_txt2img(settings)
    host.show_image(images[0])
    return images[0]


@contextlib.contextmanager
def _step_names(plan: GridPlan, host: Any):
    """Each row's step usable in prompts under a temporary name, for the duration of the grid."""
    names = {step: f"{plan.name}{TEMP_MARK}{step:06d}" for step, _ in plan.rows}
    copies: list[Path] = []
    try:
        if plan.method == "textual_inversion":
            import safetensors.torch

            for step, file in plan.rows:
                host.register_embedding(names[step], safetensors.torch.load_file(file))
        else:
            remove_stale_copies(plan.lora_dir)
            for step, file in plan.rows:
                copy = plan.lora_dir / f"{names[step]}.safetensors"
                write_atomic(copy, lambda tmp, src=file: shutil.copyfile(src, tmp))
                copies.append(copy)
            host.refresh_loras()
        yield names
    finally:
        for copy in copies:
            with contextlib.suppress(OSError):
                copy.unlink()
        if plan.method == "textual_inversion":
            host.refresh_embeddings()  # reloads the folder: the temporary words are gone
        else:
            host.refresh_loras()


def remove_stale_copies(lora_dir: Path) -> None:
    """Temporary grid copies a crashed grid left in the Lora folder."""
    for path in Path(lora_dir).glob(f"*{TEMP_MARK}*.safetensors"):
        with contextlib.suppress(OSError):
            path.unlink()
