"""Step time, it/s and peak memory per training method, on the device at hand; optionally beside kohya sd-scripts.
Prints a table; asserts nothing.

Models: CPU uses the tiny test models (SD1, SD2-v, SDXL). CUDA also builds SD1.5-, SD2.1- and SDXL-base-sized models
with random weights from configs (no downloads; SDXL at 1024 px), stored in fp16 like the WebUI's default
(``--precision bf16``: bf16 storage and bf16 autocast, kohya's ``--mixed_precision bf16``). Rows: every method in
``--methods`` x model x batch size (``--batch 1,4``) x gradient checkpointing (``--checkpointing on|off|both``; the
default is each method's own: off for adapters, on for DreamBooth) x optimizer (``--optimizers adamw,lion,...``;
default: each method's own). An optimizer whose package is missing prints "skipped (package missing)".

Time is the median interval between optimizer steps after two warm-up steps (so ``--steps`` >= 4), also shown as
it/s. Memory is per row, over steps 2+ (the steady state, optimizer state included): on CUDA ``max_memory_allocated``
after ``empty_cache`` + ``reset_peak_memory_stats``; on CPU the peak RSS after resetting the kernel's high-water mark
(``/proc/self/clear_refs``; the process's whole RSS: interpreter, model and what earlier rows' heap kept). With
``--isolate`` (automatic where clear_refs is unavailable) each row runs in its own process (a hidden ``--one-row``
re-invocation): clean numbers, but every row pays the imports and the model build (minutes instead of ~20 s for
``--sizes tiny --steps 4`` on 2 cores).

Environments:

    bash tests/run.sh    # once: builds .venv-test with the CPU test stack (ldm, open_clip, transformers, lycoris)
    .venv-test/bin/python bench/step_time.py --sizes tiny --steps 4

or from a WebUI's own venv, taking ldm/sgm from the WebUI's repositories/ (open_clip, transformers and lycoris-lora
must be installed there; the WebUI installs the first two, this extension's install.py the third):

    /path/to/webui/venv/bin/python bench/step_time.py --webui-dir /path/to/webui

Comparison with kohya sd-scripts (``--kohya-dir``): for every LoRA/LoCon/LoKr/TI row of a full-size SD1 or SDXL
model the bench saves the same random-weight model as an ldm/sgm ``.safetensors`` checkpoint, writes a small dataset
(random images, captions) and a CLIP tokenizer cache (kohya runs offline), runs kohya's ``train_network.py`` /
``sdxl_train_network.py`` / ``train_textual_inversion.py`` / ``sdxl_train_textual_inversion.py`` with the same
resolution, batch, rank/alpha, targets, precision, optimizer, checkpointing and steps (cached latents, SDPA), and
prints kohya's ms/step, it/s, memory and the ratio ours/kohya (of it/s: > 1 means we are faster). kohya's packages
are the user's: make its venv once (``--kohya-python`` picks it; default: this Python):

    git clone https://github.com/kohya-ss/sd-scripts /opt/sd-scripts
    python3 -m venv /opt/kohya-venv
    /opt/kohya-venv/bin/pip install torch torchvision          # the CUDA build matching the driver
    cd /opt/sd-scripts && /opt/kohya-venv/bin/pip install -r requirements.txt lycoris-lora==4.1.3

The H100/H200 table (SD1.5- and SDXL-size, batch 1 and 4, bf16, cached latents, with and without checkpointing,
per optimizer; about an hour, most of it SDXL):

    .venv-test/bin/python bench/step_time.py --device cuda --sizes full --families sd1,sdxl --precision bf16 \\
        --methods lora,locon,lokr,textual_inversion --batch 1,4 --checkpointing both \\
        --optimizers adamw,adamw8bit,adafactor,lion,prodigy,adamw_schedulefree --steps 20 \\
        --kohya-dir /opt/sd-scripts --kohya-python /opt/kohya-venv/bin/python

(.venv-test has CPU torch; on the GPU machine use a venv with CUDA torch plus tests/requirements.txt, or the WebUI's
venv with ``--webui-dir``.) A CPU check of the kohya wiring: ``--sizes full --families sd1 --resolution 256
--methods lora --steps 4 --kohya-dir ...`` (minutes; kohya cannot load the tiny models: it hardcodes SD1.5/SDXL).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WEBUI_REPOSITORIES = ("repositories/stable-diffusion-stability-ai", "repositories/generative-models")
NEEDED = {"torch": "torch", "ldm": "", "open_clip": "open-clip-torch", "transformers": "transformers"}


def add_webui_paths(argv: list[str]) -> str:
    """Put a WebUI's ldm/sgm checkouts first on sys.path when ``--webui-dir`` is given; returns the folder or ''."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--webui-dir", default="")
    webui = pre.parse_known_args(argv)[0].webui_dir
    for sub in WEBUI_REPOSITORIES if webui else ():
        folder = Path(webui).expanduser().resolve() / sub
        if not folder.is_dir():
            sys.exit(f"--webui-dir {webui}: {folder} does not exist; point it at the WebUI folder (with repositories/)")
        sys.path.insert(1, str(folder))
    return webui


def check_stack(webui: str) -> None:
    """Exit with what is missing (and how to get it) before importing anything heavy."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if not missing:
        return
    if webui:
        pips = " ".join(NEEDED[m] for m in missing if NEEDED[m])
        hint = f"run this with the WebUI's venv Python ({sys.executable} is this one)" + (
            f", or install {pips} into it" if pips else ""
        )
    else:
        hint = "run `bash tests/run.sh` once, then `.venv-test/bin/python bench/step_time.py`, or pass --webui-dir"
    sys.exit(f"bench/step_time.py needs {', '.join(missing)} (not importable from {sys.executable}): {hint}")


WEBUI_DIR = add_webui_paths(sys.argv[1:])
check_stack(WEBUI_DIR)

from tests.support.stack import prepare_stack  # noqa: E402

prepare_stack(threads=2)

import torch  # noqa: E402

from bench import kohya  # noqa: E402
from lib_trainer.config import build  # noqa: E402
from lib_trainer.errors import TrainerError  # noqa: E402
from lib_trainer.formats.embedding import EmbeddingFile  # noqa: E402
from lib_trainer.loop.hooks import TrainingHooks  # noqa: E402
from lib_trainer.loop.optimizers import SPECS, check_optimizer  # noqa: E402
from lib_trainer.loop.precision import resolve_precision  # noqa: E402
from lib_trainer.loop.train import train  # noqa: E402
from lib_trainer.methods import dreambooth, hypernetwork, lora  # noqa: E402
from lib_trainer.methods import token_finetune as token_rows  # noqa: E402
from lib_trainer.methods.textual_inversion import (  # noqa: E402
    EmbeddingTrainable,
    OutputPaths,
    TextualInversionConfig,
    initial_vectors,
)
from lib_trainer.models.diffusion import DiffusionObjective  # noqa: E402
from lib_trainer.models.ldm import parts_from_ldm  # noqa: E402
from lib_trainer.models.sgm import is_sgm, parts_from_sgm  # noqa: E402
from tests.support.models import SIZES, build_model  # noqa: E402
from tests.support.sdxl import build_sdxl  # noqa: E402

SDXL_SIDE = {"tiny": 64, "full": 1024}
WARMUP = 2  # optimizer steps before timing starts (allocator, autotuning, lazy optimizer state)
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclasses.dataclass(frozen=True)
class Row:
    """One benchmark row: what trains, on which model, with which loop settings."""

    method: str
    family: str
    size: str
    side: int  # image side in pixels (latents are side // 8)
    batch: int
    checkpointing: bool
    optimizer: str
    precision: str  # train.mixed_precision as requested: auto, no, fp16, bf16
    steps: int


@dataclasses.dataclass
class Result:
    """What one run (ours or kohya's) measured; ``status`` is 'ok' or why there are no numbers."""

    status: str = "ok"
    times: list[float] = dataclasses.field(default_factory=list)
    memory_mib: float | None = None
    autocast: str = ""
    weights: str = ""
    tqdm_ms: float | None = None  # kohya's progress-bar rate, where its step hook gave no timestamps

    @property
    def ms(self) -> float | None:
        return median_step_ms(self.times) or self.tqdm_ms


def median_step_ms(times: list[float]) -> float | None:
    """Median milliseconds between optimizer-step timestamps after the warm-up steps (None when too few)."""
    deltas = sorted(b - a for a, b in zip(times[WARMUP:], times[WARMUP + 1 :], strict=False))
    return 1000 * deltas[len(deltas) // 2] if deltas else None


class PeakMemory:
    """Per-row peak memory: CUDA's allocator peak, or the process's RSS high-water mark (Linux clear_refs)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def reset_rss() -> bool:
        """Reset this process's peak RSS to its current RSS; False where the kernel does not allow it (not Linux
        >= 4.0): rows then run in their own processes and report each process's peak."""
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return _vm_hwm_mib() is not None

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.reset_rss()

    def peak_mib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return _vm_hwm_mib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vm_hwm_mib() -> float | None:
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


class StepClock(TrainingHooks):
    """Timestamps of every optimizer step (CUDA synchronised); resets the memory peak after step 1."""

    def __init__(self, memory: PeakMemory):
        self.times: list[float] = []
        self.memory = memory

    def on_progress(self, progress):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if len(self.times) == 1:
            self.memory.reset()


class RandomLatents:
    """Batches of random latents with a fixed prompt (timing only; data loading is not measured)."""

    def __init__(self, batch: int, side: int):
        self.shape, self.prompts = (batch, 4, side, side), [kohya.CAPTION] * batch

    def next_batch(self):
        return torch.randn(self.shape), self.prompts

    def rng_state(self):
        return {}

    def set_rng_state(self, state):
        pass


def model_parts(model):
    """The trainer's view of a benchmark model (SD1/SD2 ldm or SDXL sgm)."""
    return parts_from_sgm(model) if is_sgm(model) else parts_from_ldm(model)


def train_section(row: Row, learning_rate: str, precision: str | None = None) -> dict:
    """The ``train`` section of a row's config (Prodigy's rate is a multiplier of its own estimate: 1.0)."""
    return {
        "steps": row.steps,
        "batch_size": row.batch,
        "mixed_precision": precision or row.precision,
        "optimizer": row.optimizer,
        "gradient_checkpointing": row.checkpointing,
        "learning_rate": "1.0" if row.optimizer == "prodigy" else learning_rate,
        "save_every": 0,
        "preview_every": 0,
    }


def textual_inversion_trainable(parts, row: Row, workdir: Path):
    """A 4-vector embedding initialised from 'cat' (kohya: --num_vectors_per_token 4 --init_word cat)."""
    config = build(
        TextualInversionConfig,
        {
            "embedding": {"name": kohya.TOKEN, "num_vectors": 4, "init_text": "cat"},
            "data": {"data_dir": str(workdir)},
            "train": train_section(row, "0.005"),
        },
    )
    start = EmbeddingFile(initial_vectors(parts, "cat", 4), 0, kohya.TOKEN)
    return EmbeddingTrainable(config, parts, OutputPaths(workdir / "emb", workdir / "log"), start), config.train


def network_trainable(parts, row: Row, workdir: Path, algo: str):
    """A rank-16 (alpha 8) LoRA/LyCORIS network on the UNet (kohya's targets); conv rank 8 for the LyCORIS algos."""
    network = {"name": "zqnet", "algo": algo, "rank": kohya.RANK, "alpha": kohya.ALPHA}
    network["conv_rank"] = kohya.CONV_RANK if algo != "lora" else 0
    config = build(
        lora.LoraConfig,
        {"network": network, "data": {"data_dir": str(workdir)}, "train": train_section(row, "1e-4")},
    )
    paths = lora.OutputPaths(workdir / "Lora", workdir / "log")
    return lora.NetworkTrainable(config, parts, paths, []), config.train


def hypernetwork_trainable(parts, row: Row, workdir: Path):
    """A 1-2-1 hypernetwork on every attention width of the model."""
    widths = ", ".join(str(w) for w in sorted(hypernetwork.attention_widths(parts)))
    config = build(
        hypernetwork.HypernetworkConfig,
        {
            "hypernetwork": {"name": "zqhn", "sizes": widths},
            "data": {"data_dir": str(workdir)},
            "train": train_section(row, "1e-5"),
        },
    )
    net = hypernetwork.Hypernetwork.create(config.hypernetwork)
    paths = hypernetwork.OutputPaths(workdir / "hn", workdir / "log")
    return hypernetwork.HypernetworkTrainable(config, parts, paths, net, 0), config.train


def dreambooth_trainable(parts, row: Row, workdir: Path, weights_precision: str = "fp32"):
    """Full UNet fine-tuning; the host model is restored afterwards as in a real run."""
    config = build(
        dreambooth.DreamBoothConfig,
        {
            "dreambooth": {"name": "zqdb", "weights_precision": weights_precision},
            "concepts": [{"instance_dir": str(workdir)}],
            "train": train_section(row, "1e-6", effective_precision(row, parts.device)),
        },
    )
    paths = dreambooth.OutputPaths(workdir / "ckpt", workdir / "Lora", workdir / "log")
    return dreambooth.FullTrainable(config, parts, paths, []), config.train


def token_rows_trainable(parts, row: Row, workdir: Path):
    """Fine-tuning the embedding rows of two words."""
    config = build(
        token_rows.EmbeddingFinetuneConfig,
        {
            "finetune": {"name": "zqrows", "tokens": "cat, dog"},
            "data": {"data_dir": str(workdir)},
            "train": train_section(row, "0.005"),
        },
    )
    paths = token_rows.OutputPaths(workdir / "r", workdir / "c", workdir / "log")
    return token_rows.RowsTrainable(config, parts, paths), config.train


# name -> (builder of (trainable, train config), default optimizer, default checkpointing, kohya kind or "")
METHODS = {
    "textual_inversion": (textual_inversion_trainable, "adamw", False, "ti"),
    "lora": (lambda p, r, w: network_trainable(p, r, w, "lora"), "adamw", False, "lora"),
    "locon": (lambda p, r, w: network_trainable(p, r, w, "locon"), "adamw", False, "locon"),
    "loha": (lambda p, r, w: network_trainable(p, r, w, "loha"), "adamw", False, ""),
    "lokr": (lambda p, r, w: network_trainable(p, r, w, "lokr"), "adamw", False, "lokr"),
    "hypernetwork": (hypernetwork_trainable, "adamw", False, ""),
    "embedding_finetune": (token_rows_trainable, "adamw", False, ""),
    "dreambooth": (dreambooth_trainable, "adafactor", True, ""),
    "dreambooth-bf16-weights": (lambda p, r, w: dreambooth_trainable(p, r, w, "bf16"), "adafactor", True, ""),
}
BF16_WEIGHTS = {"dreambooth-bf16-weights"}
CHECKPOINTING = {"on": [True], "off": [False], "both": [False, True]}  # --checkpointing default: the method's own


def effective_precision(row: Row, device: torch.device) -> str:
    """The autocast a row really runs (``auto`` resolved; bf16 weights compute under bf16 autocast)."""
    precision = resolve_precision(row.precision, device)
    return "bf16" if row.method in BF16_WEIGHTS and precision == "no" else precision


def skip_reason(row: Row, device: torch.device) -> str:
    """Why this machine cannot run the row's optimizer ('' when it can)."""
    spec = SPECS[row.optimizer]
    if importlib.util.find_spec(spec.module.split(".")[0]) is None:
        return "skipped (package missing)"
    try:
        check_optimizer(row.optimizer, device)
    except TrainerError as exc:
        return "skipped (needs CUDA)" if spec.cuda_only else f"skipped ({exc})"
    return ""


def run_ours(model, row: Row, workdir: Path, device: torch.device) -> Result:
    """Train one row on ``model``; step timestamps, per-row memory and the precision it ran at."""
    reason = skip_reason(row, device)
    if reason:
        return Result(status=reason)
    parts = model_parts(model)
    trainable, train_config = METHODS[row.method][0](parts, row, workdir)
    trainable.save = lambda step, resume: []  # timing only
    memory = PeakMemory(device)
    clock = StepClock(memory)
    autocast = {"no": "off"}.get(effective_precision(row, device), effective_precision(row, device))
    memory.reset()
    try:
        train(parts, trainable, RandomLatents(row.batch, row.side // 8), DiffusionObjective(), train_config, clock)
    except torch.cuda.OutOfMemoryError:
        return Result(status="out of memory")
    base = DTYPE_NAMES.get(next(parts.unet.parameters()).dtype, "?")
    trained = "bf16" if row.method in BF16_WEIGHTS else "fp32"
    weights = f"{base}, trained {trained}" if row.method.startswith("dreambooth") else base
    return Result(times=clock.times, memory_mib=memory.peak_mib(), autocast=autocast, weights=weights)


def build_bench_model(family: str, size: str, workdir: Path, device: torch.device, precision: str):
    """The random-weight model of a family and size, on ``device`` in the WebUI's storage dtype."""
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # ldm prints while building
        model = build_sdxl(size, workdir) if family == "sdxl" else build_model(family, size, workdir)
    if device.type == "cuda":
        model = model.to(torch.bfloat16 if precision == "bf16" else torch.float16).to(device)
    return model


def default_side(family: str, size: str) -> int:
    return SDXL_SIDE[size] if family == "sdxl" else SIZES[size]["image"]


def plan_rows(args: argparse.Namespace) -> list[Row]:
    """Every row the flags ask for, in table order (model, method, batch, checkpointing, optimizer)."""
    rows = []
    models = itertools.product(args.sizes.split(","), args.families.split(","))
    for (size, family), method in itertools.product(models, args.methods.split(",")):
        _, default_optimizer, default_checkpointing, _ = METHODS[method]
        optimizers = [default_optimizer] if args.optimizers == "default" else args.optimizers.split(",")
        checkpointing = CHECKPOINTING.get(args.checkpointing, [default_checkpointing])
        side = args.resolution or default_side(family, size)
        for batch, ckpt, optimizer in itertools.product(parse_batches(args.batch), checkpointing, optimizers):
            rows.append(Row(method, family, size, side, batch, ckpt, optimizer, args.precision, args.steps))
    return rows


def parse_batches(text: str) -> list[int]:
    """``"1,4"`` -> [1, 4]."""
    return [int(b) for b in text.split(",")]


def run_isolated(row: Row, workdir: Path, args: argparse.Namespace) -> Result:
    """Run one row in a fresh process (``--one-row``) so its peak RSS is the row's alone."""
    command = [sys.executable, __file__, "--device", args.device, "--one-row", json.dumps(dataclasses.asdict(row))]
    command += ["--workdir", str(workdir)] + (["--webui-dir", WEBUI_DIR] if WEBUI_DIR else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return Result(**json.loads(line))
    tail = "\n".join(done.stderr.strip().splitlines()[-10:])
    print(f"[bench] {row.method} {row.family}-{row.size} failed (exit {done.returncode}):\n{tail}", file=sys.stderr)
    return Result(status=f"failed (exit {done.returncode})")


def one_row(args: argparse.Namespace) -> None:
    """The hidden ``--one-row`` mode: build the row's model, train it, print the Result as one JSON line."""
    row = Row(**json.loads(args.one_row))
    device = torch.device(args.device)
    model = build_bench_model(row.family, row.size, Path(args.workdir), device, row.precision)
    result = run_ours(model, row, Path(args.workdir), device)  # RSS peak from step 2 where resettable, not the build's
    print(json.dumps(dataclasses.asdict(result)))


def run_rows(rows: list[Row], workdir: Path, args: argparse.Namespace) -> list[tuple[Row, Result, Result | None]]:
    """Our result (and kohya's, with --kohya-dir) for every row; one model build per family and size."""
    device = torch.device(args.device)
    isolate = args.isolate or (device.type == "cpu" and not PeakMemory.reset_rss())
    models = ModelCache(workdir, device)
    results = []
    for row in rows:
        ours = run_isolated(row, workdir, args) if isolate else run_ours(models.get(row), row, workdir, device)
        theirs = kohya_result(row, ours, workdir, args, lambda row=row: models.get(row))
        results.append((row, ours, theirs))
        print_progress(row, ours, theirs)
    return results


class ModelCache:
    """The current family/size's model, built on first use (one model in memory at a time)."""

    def __init__(self, workdir: Path, device: torch.device):
        self.workdir, self.device, self.key, self.model = workdir, device, None, None

    def get(self, row: Row):
        """The row's model, building it (and dropping the previous one) when the family or size changes."""
        if self.key != (row.family, row.size, row.precision):
            self.model = None  # free the previous model before building the next
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.model = build_bench_model(row.family, row.size, self.workdir, self.device, row.precision)
            self.key = (row.family, row.size, row.precision)
        return self.model


def kohya_result(row: Row, ours: Result, workdir: Path, args: argparse.Namespace, model_factory) -> Result | None:
    """kohya's numbers for a comparable row (None without --kohya-dir, or a status saying why not);
    ``model_factory`` gives the row's model when its checkpoint is not written yet."""
    if not args.kohya_dir:
        return None
    kind = METHODS[row.method][3]
    why = kohya.not_comparable(row.family, row.size, kind, ours.status)
    if why:
        return Result(status=why)
    setup = kohya.KohyaSetup(Path(args.kohya_dir), args.kohya_python or sys.executable, workdir, args.device)
    run = kohya.KohyaRow(kind, row.family, row.side, row.batch, row.steps, row.checkpointing, row.optimizer)
    measured = kohya.run_kohya(setup, run, effective_precision(row, torch.device(args.device)), model_factory)
    return Result(measured.status, measured.times, measured.memory_mib, tqdm_ms=measured.tqdm_ms)


def print_progress(row: Row, ours: Result, theirs: Result | None) -> None:
    """One line per finished row on stderr (full-size rows take minutes)."""
    line = f"[bench] {row.method} {row.family}-{row.size} b{row.batch} {row.optimizer}: {ours.status} {fmt(ours.ms)}"
    kohya_part = f"; kohya {theirs.status} {fmt(theirs.ms)}" if theirs else ""
    print(f"{line} ms{kohya_part}", file=sys.stderr)


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_cells(row: Row, ours: Result, theirs: Result | None, device: str) -> tuple:
    """The printed cells of one row (numbers, or the status where there are none)."""
    head = (row.method, f"{row.family}-{row.size}", f"{row.side}px", device, row.batch)
    head += ("on" if row.checkpointing else "off", row.optimizer, ours.autocast or "-", ours.weights or "-")
    if ours.status != "ok":
        mine = (ours.status, "", "")
    else:
        mine = (fmt(ours.ms), fmt(1000 / ours.ms if ours.ms else None, 2), fmt(ours.memory_mib, 0))
    if theirs is None:
        return head + mine
    if theirs.status != "ok":
        return (*head, *mine, theirs.status, "", "", "")
    ratio = ours.ms and theirs.ms and theirs.ms / ours.ms  # it/s ours / it/s kohya
    kohya_cells = (fmt(theirs.ms), fmt(1000 / theirs.ms if theirs.ms else None, 2), fmt(theirs.memory_mib, 0))
    return (*head, *mine, *kohya_cells, fmt(ratio or None, 2))


def print_table(results: list, device: torch.device, with_kohya: bool) -> None:
    """The table on stdout, columns padded."""
    memory = "peak CUDA MiB" if device.type == "cuda" else "peak RSS MiB"
    header = ("method", "model", "image", "device", "batch", "ckpt", "optimizer", "autocast", "weights")
    header += ("ms/step", "it/s", memory)
    if with_kohya:
        header += ("kohya ms/step", "kohya it/s", f"kohya {memory}", "ours/kohya")
    rows = [table_cells(row, ours, theirs, str(device)) for row, ours, theirs in results]
    widths = [max(len(str(r[i])) for r in [header, *rows] if i < len(r)) for i in range(len(header))]
    for cells in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(cells, widths, strict=False)).rstrip())


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per row (>= 4; 2 are warm-up)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--sizes", default="tiny,full" if cuda else "tiny", help="tiny, full (comma-separated)")
    parser.add_argument("--families", default="sd1,sd2,sdxl")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--batch", default="1", help="batch sizes, e.g. 1,4 (one row each)")
    parser.add_argument("--checkpointing", default="default", choices=["default", "on", "off", "both"])
    parser.add_argument("--optimizers", default="default", help=f"'default' or any of {', '.join(SPECS)}")
    parser.add_argument("--precision", default="auto", help="train.mixed_precision: auto, bf16, full_bf16, fp16 or no")
    parser.add_argument("--resolution", type=int, default=0, help="image side in px (default: the model's own)")
    parser.add_argument("--isolate", action="store_true", help="run every row in its own process")
    parser.add_argument("--webui-dir", default="", help="take ldm/sgm from this WebUI's repositories/")
    parser.add_argument("--kohya-dir", default="", help="a kohya-ss/sd-scripts checkout to compare with")
    parser.add_argument("--kohya-python", default="", help="the Python of kohya's venv (default: this one)")
    parser.add_argument("--one-row", default="", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    unknown += [o for o in args.optimizers.split(",") if args.optimizers != "default" and o not in SPECS]
    if unknown:
        parser.error(f"unknown method/optimizer {', '.join(unknown)}; see --help for the names")
    if args.steps < WARMUP + 2:
        parser.error(f"--steps {args.steps}: at least {WARMUP + 2} (the first {WARMUP} are warm-up)")
    return args


def main() -> None:
    args = parse_args()
    if args.one_row:
        one_row(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = run_rows(plan_rows(args), Path(tmp), args)
    print_table(results, torch.device(args.device), bool(args.kohya_dir))


if __name__ == "__main__":
    main()
