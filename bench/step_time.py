"""Step time and peak memory per training method, on the device at hand. Prints a table; asserts nothing.

CPU: the tiny test models (SD1, SD2-v, SDXL). CUDA: also SD1.5-, SD2.1- and SDXL-base-sized models with random
weights built from configs (no downloads; SDXL at 1024 px), in fp16 storage like the WebUI's default, trained under
autocast (``--precision bf16`` for bf16).

    .venv-test/bin/python bench/step_time.py [--steps 20] [--sizes tiny,full] [--families sd1,sd2,sdxl] [--device cuda]

It needs the test stack (ldm, open_clip, transformers): ``bash tests/run.sh`` builds it in ``.venv-test``.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    import ldm  # noqa: F401
    import torch
except ImportError as missing:
    sys.exit(
        f"bench/step_time.py needs the test stack ({missing.name} is missing here): run `bash tests/run.sh` once, "
        "then `.venv-test/bin/python bench/step_time.py`"
    )

from tests.support.stack import prepare_stack  # noqa: E402

prepare_stack(threads=2)

import torch  # noqa: E402

from lib_trainer.config import build  # noqa: E402
from lib_trainer.formats.embedding import EmbeddingFile  # noqa: E402
from lib_trainer.loop.hooks import TrainingHooks  # noqa: E402
from lib_trainer.loop.train import train  # noqa: E402
from lib_trainer.methods import dreambooth, hypernetwork, lora  # noqa: E402
from lib_trainer.methods import token_finetune as rows  # noqa: E402
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


def model_parts(model):
    """The trainer's view of a benchmark model (SD1/SD2 ldm or SDXL sgm)."""
    return parts_from_sgm(model) if is_sgm(model) else parts_from_ldm(model)


class RandomLatents:
    """Batches of random latents with a fixed prompt (timing only; data loading is not measured)."""

    def __init__(self, batch: int, side: int):
        self.shape, self.prompts = (batch, 4, side, side), ["a photo of zqtoken, red, blue"] * batch

    def next_batch(self):
        return torch.randn(self.shape), self.prompts

    def rng_state(self):
        return {}

    def set_rng_state(self, state):
        pass


class StepClock(TrainingHooks):
    """Timestamps of every optimizer step (CUDA synchronised)."""

    def __init__(self):
        self.times: list[float] = []

    def on_progress(self, progress):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def bench_textual_inversion(
    model, side: int, batch: int, steps: int, precision: str, workdir: Path
) -> tuple[float, float]:
    """Milliseconds per step (median after warm-up) and peak memory in MiB for textual inversion."""
    parts = model_parts(model)
    config = build(
        TextualInversionConfig,
        {
            "embedding": {"name": "zqtoken", "num_vectors": 4, "init_text": "cat"},
            "data": {"data_dir": str(workdir)},
            "train": {
                "steps": steps,
                "batch_size": batch,
                "mixed_precision": precision,
                "save_every": 0,
                "preview_every": 0,
            },
        },
    )
    start = EmbeddingFile(initial_vectors(parts, "cat", 4), 0, "zqtoken")
    trainable = EmbeddingTrainable(config, parts, OutputPaths(workdir / "emb", workdir / "log"), start)
    trainable.save = lambda step, resume: []  # timing only
    return _time_steps(parts, trainable, side, batch, config.train)


def bench_lora(
    model, side: int, batch: int, steps: int, precision: str, workdir: Path, algo: str = "lora"
) -> tuple[float, float]:
    """Milliseconds per step and peak memory for a rank-16 LoRA/LyCORIS network on the UNet (kohya's targets)."""
    parts = model_parts(model)
    config = build(
        lora.LoraConfig,
        {
            "network": {
                "name": "zqnet",
                "algo": algo,
                "rank": 16,
                "alpha": 8.0,
                "conv_rank": 8 if algo != "lora" else 0,
            },
            "data": {"data_dir": str(workdir)},
            "train": {
                "steps": steps,
                "batch_size": batch,
                "mixed_precision": precision,
                "save_every": 0,
                "preview_every": 0,
                "learning_rate": "1e-4",
            },
        },
    )
    trainable = lora.NetworkTrainable(config, parts, lora.OutputPaths(workdir / "Lora", workdir / "log"), [])
    trainable.save = lambda step, resume: []  # timing only
    return _time_steps(parts, trainable, side, batch, config.train)


def _time_steps(parts, trainable, side: int, batch: int, train_config) -> tuple[float, float]:
    clock = StepClock()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(parts, trainable, RandomLatents(batch, side), DiffusionObjective(), train_config, clock)
    deltas = sorted(b - a for a, b in zip(clock.times[2:], clock.times[3:], strict=False))
    ms = 1000 * deltas[len(deltas) // 2]
    if torch.cuda.is_available():
        return ms, torch.cuda.max_memory_allocated() / 2**20
    return ms, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_hypernetwork(model, side: int, batch: int, steps: int, precision: str, workdir: Path) -> tuple[float, float]:
    """Milliseconds per step and peak memory for a 1-2-1 hypernetwork on every attention width of the model."""
    parts = model_parts(model)
    widths = ", ".join(str(w) for w in sorted(hypernetwork.attention_widths(parts)))
    config = build(
        hypernetwork.HypernetworkConfig,
        {
            "hypernetwork": {"name": "zqhn", "sizes": widths},
            "data": {"data_dir": str(workdir)},
            "train": {
                "steps": steps,
                "batch_size": batch,
                "mixed_precision": precision,
                "save_every": 0,
                "preview_every": 0,
                "learning_rate": "1e-5",
            },
        },
    )
    net = hypernetwork.Hypernetwork.create(config.hypernetwork)
    paths = hypernetwork.OutputPaths(workdir / "hn", workdir / "log")
    trainable = hypernetwork.HypernetworkTrainable(config, parts, paths, net, 0)
    trainable.save = lambda step, resume: []  # timing only
    return _time_steps(parts, trainable, side, batch, config.train)


def bench_dreambooth(
    model, side: int, batch: int, steps: int, precision: str, workdir: Path, **options
) -> tuple[float, float]:
    """Milliseconds per step and peak memory for full UNet fine-tuning (``options``: optimizer, checkpointing,
    weights precision); the host model is restored afterwards as in a real run."""
    parts = model_parts(model)
    optimizer = options.pop("optimizer", "adafactor")
    checkpointing = options.pop("gradient_checkpointing", True)
    if options.get("weights_precision") == "bf16" and precision == "no":
        precision = "bf16"  # bf16 weights compute under autocast
    config = build(
        dreambooth.DreamBoothConfig,
        {
            "dreambooth": {"name": "zqdb", **options},
            "concepts": [{"instance_dir": str(workdir)}],
            "train": {
                "steps": steps,
                "batch_size": batch,
                "mixed_precision": precision,
                "optimizer": optimizer,
                "gradient_checkpointing": checkpointing,
                "learning_rate": "1e-6",
                "save_every": 0,
                "preview_every": 0,
            },
        },
    )
    paths = dreambooth.OutputPaths(workdir / "ckpt", workdir / "Lora", workdir / "log")
    trainable = dreambooth.FullTrainable(config, parts, paths, [])
    trainable.save = lambda step, resume: []  # timing only
    return _time_steps(parts, trainable, side, batch, config.train)


def bench_token_rows(model, side: int, batch: int, steps: int, precision: str, workdir: Path) -> tuple[float, float]:
    """Milliseconds per step and peak memory for fine-tuning the rows of two words."""
    parts = model_parts(model)
    config = build(
        rows.EmbeddingFinetuneConfig,
        {
            "finetune": {"name": "zqrows", "tokens": "cat, dog"},
            "data": {"data_dir": str(workdir)},
            "train": {"steps": steps, "batch_size": batch, "mixed_precision": precision, "save_every": 0},
        },
    )
    trainable = rows.RowsTrainable(config, parts, rows.OutputPaths(workdir / "r", workdir / "c", workdir / "log"))
    trainable.save = lambda step, resume: []  # timing only
    return _time_steps(parts, trainable, side, batch, config.train)


METHODS = {
    "textual_inversion": lambda *a: bench_textual_inversion(*a),
    "lora": lambda *a: bench_lora(*a, algo="lora"),
    "locon": lambda *a: bench_lora(*a, algo="locon"),
    "loha": lambda *a: bench_lora(*a, algo="loha"),
    "hypernetwork": lambda *a: bench_hypernetwork(*a),
    "embedding_finetune": lambda *a: bench_token_rows(*a),
    "dreambooth": lambda *a: bench_dreambooth(*a),  # Adafactor + gradient checkpointing (the defaults)
    "dreambooth-no-checkpointing": lambda *a: bench_dreambooth(*a, gradient_checkpointing=False),
    "dreambooth-adamw": lambda *a: bench_dreambooth(*a, optimizer="adamw"),
    "dreambooth-adamw8bit": lambda *a: bench_dreambooth(*a, optimizer="adamw8bit"),  # CUDA + bitsandbytes
    "dreambooth-bf16-weights": lambda *a: bench_dreambooth(*a, weights_precision="bf16"),
}
CUDA_ONLY = {"dreambooth-adamw8bit"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="tiny,full" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--batch", type=int, default=1)
    cuda = torch.cuda.is_available()
    parser.add_argument("--methods", default=",".join(m for m in METHODS if cuda or m not in CUDA_ONLY))
    parser.add_argument("--families", default="sd1,sd2,sdxl")
    parser.add_argument("--precision", default="auto", help="on CUDA: auto (fp16 autocast), bf16, fp16 or no")
    args = parser.parse_args()
    device = torch.device(args.device)
    memory = "peak CUDA MiB" if device.type == "cuda" else "peak RSS MiB (process)"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            for family in args.families.split(","):
                side = SDXL_SIDE[size] if family == "sdxl" else SIZES[size]["image"]
                with contextlib.redirect_stdout(sys.stderr):  # ldm prints while building
                    model = build_sdxl(size, Path(tmp)) if family == "sdxl" else build_model(family, size, Path(tmp))
                    precision = "no"
                    if device.type == "cuda":
                        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16
                        model = model.to(dtype).to(device)  # the WebUI's default storage (fp16)
                        precision = args.precision
                    for method in args.methods.split(","):
                        ms, mib = METHODS[method](model, side // 8, args.batch, args.steps, precision, Path(tmp))
                        row = (method, family, size, f"{side}px", str(device), precision, args.batch)
                        rows.append((*row, f"{ms:.1f}", f"{mib:.0f}"))
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    header = ("method", "model", "size", "image", "device", "precision", "batch", "ms/step", memory)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
