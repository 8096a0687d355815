"""The host of a run from the shell: a checkpoint file loaded by ``loader``, a terminal, an output folder.

It gives ``webui.jobs.JobManager`` the same surface the WebUI glue does (folders, model parts, progress,
interrupts), so a job runs through exactly the same checks and training code as one from the tab or the API.
What only the WebUI has is refused with a clear message: txt2img (previews, DreamBooth class images, test
grids), BLIP/DeepBooru captioning, and the check of LoRA keys against the WebUI's Lora extension.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lib_trainer.errors import ConfigError
from lib_trainer.loop.distributed import is_main
from lib_trainer.loop.hooks import Progress
from lib_trainer.models.ldm import parts_from_ldm
from lib_trainer.models.parts import ModelParts
from lib_trainer.webui.jobs import Folders

NO_TXT2IMG = (
    "the headless trainer has no txt2img (previews, DreamBooth class images and test grids are rendered by the "
    "WebUI's own samplers)"
)


def folders_under(out: Path) -> Folders:
    """Where a headless run writes: the WebUI's folder names below ``out`` (embeddings,
    models/{hypernetworks,Lora,Stable-diffusion}, trainer for the logs), so the files can be copied over."""
    out = Path(out).resolve()
    models = out / "models"
    return Folders(
        out / "embeddings", models / "hypernetworks", models / "Lora", out / "trainer", models / "Stable-diffusion"
    )


class Terminal:
    """Progress on stderr: a tqdm bar (loss, learning rate, it/s, ETA), or one JSON line per step on stdout."""

    def __init__(self, json_lines: bool):
        self.json_lines = json_lines
        self.bar = None

    def progress(self, progress: Progress, name: str) -> None:
        if not is_main():
            return
        if self.json_lines:
            self.emit(
                "progress",
                step=progress.step,
                total_steps=progress.total_steps,
                loss=progress.loss,
                learning_rate=progress.learning_rate,
                eta_s=round(progress.eta_s, 1),
                steps_per_s=round(progress.steps_per_s, 4),
                **progress.loss_parts,
            )
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=progress.total_steps, initial=progress.step - 1, desc=name, unit="step", file=sys.stderr
            )
        self.bar.set_postfix(loss=f"{progress.loss:.4f}", lr=f"{progress.learning_rate:.2e}", refresh=False)
        self.bar.update(progress.step - self.bar.n)

    def status(self, text: str) -> None:
        if not is_main():
            return
        if self.json_lines:
            self.emit("status", text=text)
        elif self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def emit(self, event: str, **fields: Any) -> None:
        """One JSON line on stdout (rank 0 only)."""
        if is_main():
            print(json.dumps({"event": event, **fields}), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class HeadlessHost:
    """The host surface ``JobManager`` uses, over a model loaded from a file."""

    def __init__(self, loaded: Any, out: Path, terminal: Terminal, clip_skip: int = 1):
        self.loaded, self.terminal, self.clip_skip = loaded, terminal, clip_skip
        self._folders = folders_under(out)
        self.stop_requested = False

    # what the job queue asks
    def folders(self) -> Folders:
        return self._folders

    def allowed_roots(self) -> list[Path] | None:
        return None  # the user's own shell: any path they can read or write

    def unavailable_methods(self) -> dict[str, str]:
        """None: every method's checks are the job's own (what needs txt2img is refused by them)."""
        return {}

    def model_parts(self, clip_skip: int | None = None) -> ModelParts:
        loaded = self.loaded
        parts = parts_from_ldm(loaded.model, clip_skip or self.clip_skip, loaded.name, loaded.short_hash)
        parts.checkpoint_file = str(loaded.path)
        return parts

    def native_resolution(self) -> int:
        return 512

    def webui_clip_skip(self) -> int:
        return self.clip_skip

    def sampler_names(self) -> list[str]:
        return ["Euler a"]  # only checked for samplers that are used; nothing renders here

    def queue_lock(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def job_state(self, title: str, total_steps: int) -> Iterator[None]:
        self.terminal.status(f"{title}: preparing...")
        yield

    def report_progress(self, progress: Progress, name: str) -> None:
        self.terminal.progress(progress, name)

    def report_status(self, text: str) -> None:
        self.terminal.status(text)

    def interrupted(self) -> bool:
        return self.stop_requested

    def render_txt2img(self, settings: dict[str, Any]) -> list[Any]:
        raise ConfigError(f"{NO_TXT2IMG}; run this job in the WebUI's Trainer tab, or give the images it needs")

    def captioners(self, blip: bool, deepbooru: bool) -> list:
        if blip or deepbooru:
            raise ConfigError(
                "BLIP and DeepBooru captions come from the WebUI's interrogators, which the headless trainer does not "
                "have; caption in the WebUI's Extras tab, or turn caption_blip / caption_deepbooru off",
                field="caption_blip" if blip else "caption_deepbooru",
            )
        return []

    def unmatched_lora_keys(self, path: Path) -> list[str]:
        return []  # no WebUI Lora extension to ask; the names are the ones the tab's runs are checked with

    # what only matters inside the WebUI: nothing to refresh, show or switch
    def clear_merged_networks(self) -> None:
        pass

    def release_captioners(self) -> None:
        pass

    def refresh_embeddings(self) -> None:
        pass

    def refresh_loras(self) -> None:
        pass

    def refresh_hypernetworks(self) -> None:
        pass

    def refresh_checkpoints(self) -> None:
        pass

    def reset_conditioning_cache(self) -> None:
        pass

    def load_checkpoint(self, path: Path) -> None:
        pass

    def show_image(self, image: Any) -> None:
        pass

    def register_embedding(self, name: str, tensors: dict[str, Any]) -> None:
        pass

    def network_preview(self, name: str, state: Any, step: int, folder: Path) -> contextlib.AbstractContextManager:
        return state.for_preview()


def elapsed_text(seconds: float) -> str:
    """``1h02m03s`` style duration."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
