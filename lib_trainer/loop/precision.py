"""Mixed precision: torch autocast (bf16/fp16) where the device supports it, with a GradScaler for fp16."""

from __future__ import annotations

import contextlib

import torch

from lib_trainer.errors import ConfigError


def resolve_precision(setting: str, device: torch.device) -> str:
    """Turn ``auto`` into a concrete choice for ``device``; refuse what the device cannot do."""
    if setting == "auto":
        if device.type != "cuda":
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.mixed_precision 'fp16' needs a CUDA GPU, but the model is on {device.type}; use 'bf16' or 'no'",
            field="train.mixed_precision",
        )
    if setting == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "train.mixed_precision 'bf16' is not supported by this GPU; use 'fp16' or 'no'",
            field="train.mixed_precision",
        )
    return setting


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` ('no' gives a no-op context)."""
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str):
    """A GradScaler for fp16 on CUDA, else None (bf16 and fp32 need no loss scaling)."""
    if precision != "fp16" or device.type != "cuda":
        return None
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()
