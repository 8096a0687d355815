"""kohya-format LoRA / LyCORIS ``.safetensors`` files (docs/formats.md section 3): tensors + ss_*/modelspec metadata."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from lib_trainer.errors import FormatError
from lib_trainer.formats.files import finite_for_saving, write_bytes_atomic

BASE_VERSIONS = {
    ("sd1", "eps"): "sd_v1",
    ("sd2", "eps"): "sd_v2",
    ("sd2", "v"): "sd_v2_v",
    ("sdxl", "eps"): "sdxl_base_v1-0",
    ("sdxl", "v"): "sdxl_base_v1-0",  # kohya has no SDXL v name; modelspec.prediction_type says "v"
}
ARCHITECTURES = {
    ("sd1", "eps"): "stable-diffusion-v1",
    ("sd2", "eps"): "stable-diffusion-v2-512",
    ("sd2", "v"): "stable-diffusion-v2-768-v",
    ("sdxl", "eps"): "stable-diffusion-xl-v1-base",
    ("sdxl", "v"): "stable-diffusion-xl-v1-base",
}
IMPLEMENTATIONS = {"sdxl": "https://github.com/Stability-AI/generative-models"}  # kohya's: SDXL keys are sgm paths
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def network_metadata(
    *,
    name: str,
    algo: str,
    rank: int,
    alpha: float,
    network_args: dict[str, str],
    family: str,
    prediction: str,
    resolution: tuple[int, int],
    extra: dict[str, Any],
) -> dict[str, str]:
    """The ss_* minimum set, modelspec keys and training extras, all as strings (kohya's conventions)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {
        "ss_network_module": "networks.lora" if algo in ("lora", "locon") else "lycoris.kohya",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps(network_args),
        "ss_base_model_version": BASE_VERSIONS[(family, prediction)],
        "ss_v2": str(family == "sd2"),
        "ss_output_name": name,
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{ARCHITECTURES[(family, prediction)]}/lora",
        "modelspec.implementation": IMPLEMENTATIONS.get(family, "diffusers"),
        "modelspec.title": name,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": now.isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if prediction == "v" else "epsilon",
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def save_network(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], precision: str) -> Path:
    """Write the file atomically with ``sshs_model_hash`` (sha256 of the bytes after the header)."""
    fix = (
        "Set network.save_precision to 'bf16' or 'fp32' (or lower train.learning_rate)"
        if precision == "fp16"
        else "Lower train.learning_rate and train again"
    )
    tensors = finite_for_saving(tensors, DTYPES[precision], f"LoRA {path.stem}", fix, "network.save_precision")
    first = safetensors.torch.save(tensors, metadata=metadata)
    header = int.from_bytes(first[:8], "little")
    digest = hashlib.sha256(first[8 + header :]).hexdigest()
    meta = {**metadata, "sshs_model_hash": digest, "sshs_legacy_hash": digest[:8]}
    return write_bytes_atomic(path, safetensors.torch.save(tensors, metadata=meta))


def read_network(path: Path, field: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file (for resuming); FormatError naming ``field`` when it is not one."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except (OSError, RuntimeError, ValueError, safetensors.SafetensorError) as exc:
        raise FormatError(f"{Path(path).name} cannot be read as a LoRA .safetensors file: {exc}", field) from exc
    return tensors, metadata
