"""Resume sidecars: optimizer state, RNG states and step beside a saved file (``<file>.trainer-state``).

Not ``<file>.optim``: the WebUI ``torch.load``s a hypernetwork's ``.optim`` when it loads the hypernetwork,
and a file of another format there would make the hypernetwork fail to load.

Stored as safetensors bytes (tensors) with JSON metadata (everything else), so resuming never unpickles.
The sidecar is only used when its checksum matches the trained tensors it was written with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from lib_trainer.formats.files import write_bytes_atomic

SIDECAR_SUFFIX = ".trainer-state"


@dataclass
class ResumeState:
    """What a run needs besides the trained tensors to continue exactly."""

    optimizer: dict[str, Any]
    rng: dict[str, Any]
    step: int


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


def load_sidecar(path: Path, checksum: str) -> ResumeState | None:
    """The sidecar of ``path`` if it exists, is readable and matches ``checksum``; else None."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        with safetensors.safe_open(str(side), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except (OSError, safetensors.SafetensorError):
        return None
    if meta.get("checksum") != checksum:
        return None
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in json.loads(meta["optimizer_plain"]).items()}
    rng: dict[str, Any] = json.loads(meta["rng_plain"])
    for key, value in tensors.items():
        kind, rest = key.split(".", 1)
        if kind == "optimizer":
            index, name = rest.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        else:
            rng[rest] = value
    optimizer = {"state": state, "param_groups": json.loads(meta["param_groups"])}
    return ResumeState(optimizer=optimizer, rng=rng, step=int(meta.get("step", 0)))
