"""Resume sidecars: optimizer state, RNG states and step beside a saved file (``<file>.trainer-state``).

Not ``<file>.optim``: the WebUI ``torch.load``s a hypernetwork's ``.optim`` when it loads the hypernetwork,
and a file of another format there would make the hypernetwork fail to load.

Stored as safetensors bytes (tensors) with JSON metadata (everything else), so resuming never unpickles.
The sidecar holds fp32 master copies of the trained tensors, so a run continues exactly even when the file
itself is saved in a lower precision (a fp16 LoRA). A save writes the run folder's numbered copy, then the
sidecar, then the main file; the sidecar is used when its checksum matches the main file's tensors, or, when a
run was killed after the sidecar but before the main file was replaced, the numbered copy of the sidecar's
step (the run then continues from that step: every kill point resumes exactly).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from lib_trainer.errors import TrainerError
from lib_trainer.formats.files import write_bytes_atomic

SIDECAR_SUFFIX = ".trainer-state"


@dataclass
class ResumeState:
    """What a run needs besides the trained tensors to continue exactly."""

    optimizer: dict[str, Any]
    rng: dict[str, Any]
    step: int
    params: list[torch.Tensor] = field(default_factory=list)  # fp32 master copies of the trained tensors
    checksum: str = ""  # of the saved file's tensors this state belongs to (set when read back)


def tensors_checksum(tensors: list[torch.Tensor]) -> str:
    """Short sha256 of the trained tensors (fp32 bytes), tying a sidecar to its file."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def sidecar_path(path: Path) -> Path:
    """Where the sidecar of ``path`` lives."""
    return Path(str(path) + SIDECAR_SUFFIX)


def save_sidecar(path: Path, state: ResumeState, checksum: str) -> Path:
    """Write the sidecar of ``path`` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    opt_state = {}
    for index, entries in state.optimizer["state"].items():
        plain = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[key] = value
        opt_state[str(index)] = plain
    for index, param in enumerate(state.params):
        tensors[f"params.{index}"] = param.detach().to("cpu", torch.float32).contiguous()
    rng_plain = {}
    for key, value in state.rng.items():
        if isinstance(value, torch.Tensor):
            tensors[f"rng.{key}"] = value.cpu().contiguous()
        else:
            rng_plain[key] = value
    meta = {
        "checksum": checksum,
        "step": str(state.step),
        "param_groups": json.dumps(state.optimizer["param_groups"]),
        "optimizer_plain": json.dumps(opt_state),
        "rng_plain": json.dumps(rng_plain),
    }
    return write_bytes_atomic(sidecar_path(path), safetensors.torch.save(tensors, metadata=meta))


def find_resume_state(
    path: Path, checksum: str, numbered: Callable[[int], Path], checksum_of: Callable[[Path], str]
) -> ResumeState | None:
    """The state to continue the file ``path`` (whose tensors have ``checksum``) from, or None.

    Its sidecar when they match; otherwise, if a kill came after the sidecar was written but before the file
    was replaced, the sidecar describes the newer save: it is used when the numbered copy of its step
    (``numbered(step)``) holds exactly the tensors it was written with.
    """
    state = read_sidecar(path)
    if state is None:
        return None
    if state.checksum == checksum:
        return state
    copy = numbered(state.step)
    if state.params and copy.is_file():
        try:
            if checksum_of(copy) == state.checksum:
                return state
        except TrainerError:  # an unreadable copy confirms nothing
            return None
    return None


def read_sidecar(path: Path) -> ResumeState | None:
    """The sidecar of ``path`` whatever file it belongs to (``checksum`` says which); None if absent or unreadable."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        with safetensors.safe_open(str(side), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
        state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in json.loads(meta["optimizer_plain"]).items()}
        rng: dict[str, Any] = json.loads(meta["rng_plain"])
        param_groups = json.loads(meta["param_groups"])
        step = int(meta.get("step", 0))
    except (OSError, ValueError, KeyError, safetensors.SafetensorError):
        return None
    params: dict[int, torch.Tensor] = {}
    for key, value in tensors.items():
        kind, rest = key.split(".", 1)
        if kind == "optimizer":
            index, name = rest.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        elif kind == "params":
            params[int(rest)] = value
        else:
            rng[rest] = value
    optimizer = {"state": state, "param_groups": param_groups}
    ordered = [params[i] for i in sorted(params)]
    return ResumeState(optimizer, rng, step, ordered, meta.get("checksum", ""))
