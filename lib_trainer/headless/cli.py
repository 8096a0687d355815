"""``python -m lib_trainer`` / ``sd-trainer``: run a job (the JSON ``POST /trainer/v1/jobs`` takes) on a checkpoint
file, without the WebUI; several GPUs with ``torchrun`` or ``accelerate launch``.

    sd-trainer train job.json --checkpoint model.safetensors --out runs/
    torchrun --nproc-per-node 4 -m lib_trainer train job.json --checkpoint model.safetensors --out runs/

Exit status: 0 done, 130 interrupted (Ctrl-C: the state is saved, ``--resume`` continues), 1 failed while
training, 2 refused before training (the message names the setting).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lib_trainer.errors import ConfigError, TrainerError
from lib_trainer.loop import distributed

INTERRUPTED = 130
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEBUI_LDM = Path("repositories") / "stable-diffusion-stability-ai"
HEADLESS_METHODS = ("textual_inversion", "lora", "hypernetwork", "dreambooth", "embedding_finetune", "preprocess")


def parser() -> argparse.ArgumentParser:
    """The command line."""
    root = argparse.ArgumentParser(
        prog="sd-trainer", description="Train embeddings, LoRA / LyCORIS, hypernetworks and DreamBooth on a checkpoint"
    )
    commands = root.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run a job file on a checkpoint")
    train.add_argument("job", help="the job: a .json file as the Trainer tab exports it and the REST API takes it")
    train.add_argument("--checkpoint", required=True, help="the model: an SD1.x / SD2.x .safetensors or .ckpt file")
    train.add_argument(
        "--out",
        default="trainer-output",
        help="output folder: embeddings/, models/Lora/, models/hypernetworks/, models/Stable-diffusion/, trainer/",
    )
    train.add_argument("--resume", action="store_true", help="continue the job's saved file from its last save")
    train.add_argument("--json-progress", action="store_true", help="one JSON line per step on stdout, no bar")
    train.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: cuda:LOCAL_RANK, else cpu)")
    train.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="storage of the frozen UNet and text encoder (default fp16 on CUDA, as the WebUI; fp32 on the CPU)",
    )
    train.add_argument(
        "--prediction", choices=("auto", "eps", "v"), default="auto", help="override the detected parameterization"
    )
    train.add_argument("--clip-skip", type=int, default=1, help="Clip skip for jobs whose train.clip_skip is 0")
    train.add_argument(
        "--webui-dir",
        default=os.environ.get("SD_WEBUI_DIR") or None,
        help="a WebUI folder whose repositories/ provide ldm (default $SD_WEBUI_DIR); not needed with ldm installed",
    )
    return root


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = parser().parse_args(argv)
    for category in (DeprecationWarning, FutureWarning):  # the model libraries' own notices, not the user's concern
        warnings.filterwarnings("ignore", category=category)
    try:
        return _train(args)
    except TrainerError as exc:
        where = f" [{exc.field}]" if getattr(exc, "field", None) else ""
        print(f"error{where}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return INTERRUPTED


def _train(args: argparse.Namespace) -> int:
    from lib_trainer import presets

    document = presets.import_job(str(args.job))
    method = document["method"]
    if method not in HEADLESS_METHODS:
        raise ConfigError(f"method {method!r} needs the WebUI; run it in the Trainer tab", field="method")
    _find_ldm(args.webui_dir)
    device = _device(args.device)
    distributed.init_from_environment(device)
    try:
        return _run(args, document, device)
    finally:
        if distributed.active():
            distributed.barrier()
            torch.distributed.destroy_process_group()


def _run(args: argparse.Namespace, document: dict[str, Any], device: torch.device) -> int:
    from lib_trainer.headless.host import HeadlessHost, Terminal
    from lib_trainer.headless.loader import load_model
    from lib_trainer.webui.jobs import METHODS, Job, JobManager

    terminal = Terminal(args.json_progress)
    dtype = _dtype(args.dtype, device)
    started = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):  # ldm prints while building; stdout carries --json-progress
        loaded = load_model(Path(args.checkpoint).expanduser(), device, dtype, args.prediction)
    say = _sayer(terminal)
    say(
        f"model: {loaded.name} [{loaded.short_hash}] {loaded.family.upper()} {loaded.prediction}-prediction "
        f"(config {loaded.config_source}), {str(dtype).removeprefix('torch.')} on {device}, "
        f"loaded in {time.monotonic() - started:.1f}s"
    )
    host = HeadlessHost(loaded, Path(args.out), terminal, args.clip_skip)
    manager = JobManager(host)
    method, config = document["method"], document["config"]
    preview = _without_previews(document.get("preview"), say)
    if args.resume:
        config = _resumed(method, config, host.folders())
    parsed, preview_config = manager.validate(method, config, preview)
    _check_class_images(parsed)
    job = Job(id=f"cli-{int(time.time())}", method=method, config=parsed, preview=preview_config)
    job.output_dir = str(manager.output_dir(job))
    train = getattr(parsed, "train", None)
    if train is not None:
        world = distributed.world()
        say(
            f"effective batch {train.batch_size * world * train.gradient_accumulation} = {train.batch_size} per "
            f"process x {world} process(es) x {train.gradient_accumulation} accumulation step(s); "
            f"{train.steps} steps; output {job.output_dir}"
        )
    with _stop_on_signals(job, host, say):
        manager.run(job)
    terminal.close()
    return _report(job, terminal, say, METHODS[method].name(parsed))


def _sayer(terminal: Any):
    def say(text: str) -> None:
        if not distributed.is_main():
            return
        if terminal.json_lines:
            terminal.emit("info", text=text)
        else:
            print(text, file=sys.stderr, flush=True)

    return say


def _find_ldm(webui_dir: str | None) -> None:
    """Make ldm (the model classes the WebUI runs for SD1/SD2) importable: installed, or a WebUI's copy."""
    if webui_dir:
        repo = Path(webui_dir).expanduser() / WEBUI_LDM
        if not repo.is_dir():
            raise ConfigError(
                f"{webui_dir} has no {WEBUI_LDM} (the WebUI clones it on first start); give the folder of a WebUI that "
                "has run once, or install ldm: pip install --no-deps stable-diffusion-sdkit==2.1.5",
                field="--webui-dir",
            )
        sys.path.insert(0, str(repo))
    if importlib.util.find_spec("ldm") is None:
        raise ConfigError(
            "the ldm model code is not installed; run: pip install --no-deps stable-diffusion-sdkit==2.1.5 "
            "(the classes the WebUI runs), or give --webui-dir of a WebUI installation",
            field="--webui-dir",
        )


def _device(text: str) -> torch.device:
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ConfigError(f"--device {text!r} is not a device; use cuda, cuda:N or cpu", field="--device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu", field="--device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _dtype(text: str, device: torch.device) -> torch.dtype:
    if text == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if text == "fp16" and device.type != "cuda":
        raise ConfigError("--dtype fp16 needs a CUDA GPU (fp16 matmuls on the CPU are slow or missing)", "--dtype")
    return DTYPES[text]


def _without_previews(preview: Any, say) -> Any:
    """Previews need txt2img, which only the WebUI has: a job that asks for them trains without."""
    if isinstance(preview, dict) and preview.get("enabled"):
        say(
            "previews: off (the headless trainer has no txt2img; previews are rendered by the WebUI's own samplers). "
            "Load the saved files in the WebUI to look at them"
        )
        return {**preview, "enabled": False}
    return preview


def _resumed(method: str, config: dict[str, Any], folders: Any) -> dict[str, Any]:
    """The job continuing its saved file: LoRA through ``resume_from``; embeddings, hypernetworks and token rows
    continue the file of their name by themselves (as in the tab), which must exist."""
    from lib_trainer.webui.jobs import METHODS

    if method in ("dreambooth", "preprocess"):
        raise ConfigError(f"--resume: {method} has no resume; its numbered copies are kept", field="--resume")
    if config.get("resume_from"):
        return config
    spec = METHODS[method]
    try:
        name = spec.name(spec.config.from_dict(config))
    except TrainerError:
        return config  # validate() reports what is wrong with the job
    folder = Path(dataclasses.astuple(spec.paths(folders))[0])
    main = folder / f"{name}{'.pt' if method == 'hypernetwork' else '.safetensors'}"
    if not main.is_file():
        raise ConfigError(
            f"--resume: there is no saved file {main} to continue; run without --resume to start, or give the same "
            "--out as the first run",
            field="--resume",
        )
    return {**config, "resume_from": str(main)} if method == "lora" else config


def _check_class_images(config: Any) -> None:
    """DreamBooth's class images are generated by the WebUI's txt2img; headless they must already be there."""
    from lib_trainer.methods.class_images import class_image_count

    for index, concept in enumerate(getattr(config, "concepts", None) or []):
        if not concept.prior:
            continue
        folder = Path(concept.class_dir).expanduser()
        have = class_image_count(folder) if folder.is_dir() else 0
        if have < concept.class_images:
            raise ConfigError(
                f"concepts.{index}.class_dir {folder} has {have} of {concept.class_images} class images, and the "
                "headless trainer cannot generate them (that needs the WebUI's txt2img); generate them with the "
                "WebUI (a job in the tab does), put your own there, or lower class_images",
                field=f"concepts.{index}.class_images",
            )


@contextlib.contextmanager
def _stop_on_signals(job: Any, host: Any, say):
    """Ctrl-C / SIGTERM: stop after the current step and save; a second Ctrl-C (after 3 s) aborts at once."""
    first: list[float] = []

    def stop(signum, frame):
        if first and signum == signal.SIGINT and time.monotonic() - first[0] > 3:
            raise KeyboardInterrupt
        if not first:
            first.append(time.monotonic())
            say("stopping after this step and saving (Ctrl-C again to abort without saving)")
        job.cancel_requested = True
        host.stop_requested = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _report(job: Any, terminal: Any, say, name: str) -> int:
    saved = list(dict.fromkeys(s["path"] for s in job.saved))  # the main file once, at its last save
    for warning in job.warnings:
        say(f"warning: {warning}")
    status = {"done": 0, "interrupted": INTERRUPTED, "cancelled": INTERRUPTED}.get(job.state, 1)
    if terminal.json_lines:
        terminal.emit("done", state=job.state, step=job.step, saved=saved, error=job.error, warnings=job.warnings)
    else:
        say(f"{name}: {job.state} at step {job.step}/{job.total_steps}")
        for path in saved[-3:]:
            say(f"  saved {path}")
        if job.error:
            say(f"error: {job.error}")
        if job.state == "interrupted":
            say("continue with the same command and --resume")
    return status
