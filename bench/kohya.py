"""kohya sd-scripts runs comparable to a bench row: the same random-weight model as an ldm/sgm checkpoint, a small
dataset, an offline CLIP tokenizer cache, the command line, and kohya's step times and memory.

kohya's argument names are those of sd-scripts' ``library/train_util.py`` (``add_sd_models_arguments``,
``add_dataset_arguments``, ``add_training_arguments``, ``add_optimizer_arguments``, ``get_optimizer``) and
``train_network.py`` / ``train_textual_inversion.py``. Its loaders read ldm keys: ``model.diffusion_model.*``,
``first_stage_model.*``, and ``cond_stage_model.transformer.*`` (SD1) or ``conditioner.embedders.0.transformer.*`` /
``conditioner.embedders.1.model.*`` (SDXL; ``library/sdxl_model_util.py`` checks the key sets strictly). Its
tokenizers come from ``--tokenizer_cache_dir``/<hub id with / as _> when that folder exists
(``library/strategy_base.py``), so the bench writes them there and kohya never reaches the hub.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

TOKEN = "zqtoken"
CAPTION = f"a photo of {TOKEN}, red, blue"
RANK, ALPHA, CONV_RANK, CONV_ALPHA = 16, 8.0, 8, 1.0
SCRIPTS = {
    ("sd1", "network"): "train_network.py",
    ("sdxl", "network"): "sdxl_train_network.py",
    ("sd1", "ti"): "train_textual_inversion.py",
    ("sdxl", "ti"): "sdxl_train_textual_inversion.py",
}
# our optimizer -> kohya's --optimizer_type and the --optimizer_args that give our defaults (weight decay 0 as ours;
# kohya's SGDNesterov would add Nesterov, so plain torch.optim.SGD through kohya's "any torch.optim class" branch)
OPTIMIZERS = {
    "adamw": ("AdamW", []),
    "adamw8bit": ("AdamW8bit", []),
    "adafactor": ("Adafactor", ["relative_step=False", "scale_parameter=False", "warmup_init=False"]),
    "sgd": ("SGD", ["momentum=0.9"]),
    "lion": ("Lion", []),
    "prodigy": ("Prodigy", ["safeguard_warmup=True"]),
    "adamw_schedulefree": ("AdamWScheduleFree", []),
}
TOKENIZERS = ("openai/clip-vit-large-patch14", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")
KEPT = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.", "conditioner.embedders.")

# Runs a kohya script with a global optimizer-step hook: a timestamp per step (CUDA synchronised) and the memory
# peak over steps 2+ (CUDA allocator, or the RSS high-water mark after /proc/self/clear_refs), written as JSON.
WRAPPER = r"""
import atexit, json, os, runpy, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
out, times, peak = os.environ["TRAINER_BENCH_OUT"], [], {}
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
def hook(optimizer, args, kwargs):
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    times.append(time.perf_counter())
    if len(times) == 1:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                open("/proc/self/clear_refs", "w").write("5")
            except OSError:
                pass
    else:
        peak["mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else hwm()
def report():
    with open(out, "w") as fh:
        json.dump({"times": times, "memory_mib": peak.get("mib")}, fh)
register_optimizer_step_post_hook(hook)
atexit.register(report)
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
"""


@dataclasses.dataclass(frozen=True)
class KohyaSetup:
    """Where sd-scripts and its Python are, the bench's work folder, the device."""

    kohya_dir: Path
    python: str
    workdir: Path
    device: str


@dataclasses.dataclass(frozen=True)
class KohyaRow:
    """The settings of one bench row that kohya's command line repeats."""

    kind: str  # lora, locon, lokr, ti
    family: str
    side: int
    batch: int
    steps: int
    checkpointing: bool
    optimizer: str


@dataclasses.dataclass
class Measured:
    """kohya's step timestamps (or tqdm's rate when the hook gave none) and peak memory."""

    status: str = "ok"
    times: list[float] = dataclasses.field(default_factory=list)
    memory_mib: float | None = None
    tqdm_ms: float | None = None


def not_comparable(family: str, size: str, kind: str, our_status: str) -> str:
    """Why a row gets no kohya run ('' when it does)."""
    if not kind:
        return "n/a (no kohya equivalent)"
    if family not in ("sd1", "sdxl"):
        return "n/a (SD1/SDXL only)"
    if size != "full":
        return "n/a (kohya loads full-size only)"
    return "" if our_status == "ok" else our_status


def checkpoint_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the ldm/sgm checkpoint names kohya's loaders read (CPU, contiguous): the trainer's
    own checkpoint naming (the WebUI's ``.wrapped`` hijack layers removed), less what kohya's strict loaders refuse."""
    from lib_trainer.formats.model_file import checkpoint_tensors as trainer_names

    return {
        key: value.detach().to("cpu").contiguous()
        for key, value in trainer_names(model).items()
        if key.startswith(KEPT) and ".position_ids" not in key
    }


def save_checkpoint(model_factory: Callable[[], torch.nn.Module], path: Path) -> Path:
    """Write the bench model as ``path`` once (later rows of the same model reuse it)."""
    from safetensors.torch import save_file

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(checkpoint_tensors(model_factory()), str(path))
    return path


def write_dataset(folder: Path, side: int, count: int, repeats: int) -> Path:
    """``count`` random ``side``-px images with captions in kohya's ``<repeats>_<name>`` folder layout."""
    import numpy as np
    from PIL import Image

    images = folder / f"{repeats}_{TOKEN}"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{index:03d}.png")
        (images / f"{index:03d}.txt").write_text(CAPTION, encoding="utf-8")
    return folder


def write_tokenizer_cache(folder: Path) -> Path:
    """kohya's ``--tokenizer_cache_dir`` with CLIP-L's and bigG's tokenizers (the same BPE vocabulary), offline."""
    from lib_trainer.models.clip_files import write_clip_tokenizer

    for hub_id in TOKENIZERS:
        target = folder / hub_id.replace("/", "_")
        if not (target / "vocab.json").exists():
            write_clip_tokenizer(target)
    return folder


def learning_rate(run: KohyaRow) -> str:
    """The same rate as our row (Prodigy: a multiplier of its own estimate)."""
    return "1.0" if run.optimizer == "prodigy" else "0.005" if run.kind == "ti" else "1e-4"


def method_args(run: KohyaRow) -> list[str]:
    """The network (kohya's LoRA or LyCORIS through lycoris.kohya) or embedding arguments."""
    if run.kind == "ti":
        return ["--token_string", TOKEN, "--init_word", "cat", "--num_vectors_per_token", "4"]
    args = ["--network_dim", str(RANK), "--network_alpha", str(ALPHA), "--network_train_unet_only"]
    if run.kind == "lora":
        return [*args, "--network_module", "networks.lora"]
    network = [f"algo={run.kind}", f"conv_dim={CONV_RANK}", f"conv_alpha={CONV_ALPHA}"]
    return [*args, "--network_module", "lycoris.kohya", "--network_args", *network]


def kohya_args(run: KohyaRow, precision: str, paths: dict[str, Path]) -> list[str]:
    """kohya's command-line arguments for ``run`` with our autocast ``precision`` (bf16, fp16 or no)."""
    optimizer_type, optimizer_args = OPTIMIZERS[run.optimizer]
    args = ["--pretrained_model_name_or_path", str(paths["checkpoint"]), "--train_data_dir", str(paths["data"])]
    args += ["--caption_extension", ".txt", "--resolution", f"{run.side},{run.side}"]
    args += ["--train_batch_size", str(run.batch), "--max_train_steps", str(run.steps), "--seed", "0"]
    args += ["--learning_rate", learning_rate(run), "--lr_scheduler", "constant", "--max_grad_norm", "0"]
    args += ["--optimizer_type", optimizer_type, "--optimizer_args", "weight_decay=0.0", *optimizer_args]
    args += ["--mixed_precision", precision, "--cache_latents", "--sdpa", "--max_data_loader_n_workers", "0"]
    args += ["--output_dir", str(paths["out"]), "--output_name", "bench", "--save_model_as", "safetensors"]
    args += ["--tokenizer_cache_dir", str(paths["tokenizers"])]
    if run.checkpointing:
        args.append("--gradient_checkpointing")
    return args + method_args(run)


def prepare(setup: KohyaSetup, run: KohyaRow, model_factory: Callable[[], torch.nn.Module]) -> dict[str, Path]:
    """Checkpoint, dataset (one epoch covers every step), tokenizer cache and an empty output folder."""
    root = setup.workdir / "kohya"
    name = f"{run.kind}-{run.family}-{run.side}-b{run.batch}-{run.optimizer}-{'gc' if run.checkpointing else 'nogc'}"
    out = root / "runs" / name
    out.mkdir(parents=True, exist_ok=True)
    return {
        "checkpoint": save_checkpoint(model_factory, root / f"{run.family}.safetensors"),
        "data": write_dataset(root / f"data-{run.side}-b{run.batch}", run.side, run.batch, run.steps + 1),
        "tokenizers": write_tokenizer_cache(root / "tokenizers"),
        "out": out,
    }


def run_kohya(
    setup: KohyaSetup, run: KohyaRow, precision: str, model_factory: Callable[[], torch.nn.Module]
) -> Measured:
    """Run kohya's script for ``run`` in a subprocess through the step-hook wrapper; its step times and memory."""
    script = setup.kohya_dir / SCRIPTS[(run.family, "ti" if run.kind == "ti" else "network")]
    if not script.is_file():
        return Measured(status=f"failed ({script} not found: --kohya-dir is not an sd-scripts checkout)")
    paths = prepare(setup, run, model_factory)
    result, log = paths["out"] / "bench.json", paths["out"] / "kohya.log"
    env = {**os.environ, "TRAINER_BENCH_OUT": str(result), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if setup.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [setup.python, "-c", WRAPPER, str(script), *kohya_args(run, precision, paths)]
    with log.open("w") as fh:
        done = subprocess.run(command, cwd=setup.kohya_dir, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    return read_measurement(result, log, done.returncode)


def read_measurement(result: Path, log: Path, returncode: int) -> Measured:
    """The wrapper's JSON, else tqdm's last rate from the log; a failure shows the log's last lines on stderr."""
    import json

    text = log.read_text(encoding="utf-8", errors="replace")
    data = json.loads(result.read_text()) if result.exists() else {}
    if returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-15:])
        print(f"[bench] kohya failed (exit {returncode}); the end of its log:\n{tail}", file=sys.stderr)
        return Measured(status=f"failed (exit {returncode})")
    if len(data.get("times", [])) >= 4:
        return Measured(times=data["times"], memory_mib=data.get("memory_mib"))
    rates = re.findall(r"(\d+(?:\.\d+)?)(it/s|s/it)", text)
    if not rates:
        return Measured(status="failed (no step times in its output)")
    value, unit = float(rates[-1][0]), rates[-1][1]
    return Measured(tqdm_ms=1000 / value if unit == "it/s" else 1000 * value, memory_mib=data.get("memory_mib"))
