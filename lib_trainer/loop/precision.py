"""Mixed precision: torch autocast (bf16/fp16) where the device supports it, with a GradScaler for fp16.

``full_bf16`` also stores the UNet's weights in bf16 for the run (put back exactly afterwards), so autocast has no
weight copies to make (the fp16-to-bf16 copy of every weight is memory and time), and keeps the trained
parameters in bf16 for the forward with fp32 master copies that the optimizer updates (``Bf16Masters``).
"""

from __future__ import annotations

import contextlib

import torch

from lib_trainer.errors import ConfigError


def resolve_precision(setting: str, device: torch.device, full_bf16_refusal: str = "") -> str:
    """Turn ``auto`` into a concrete choice for ``device``; refuse what the device (or the method:
    ``full_bf16_refusal`` says why it cannot train in full bf16) cannot do."""
    if setting == "full_bf16" and full_bf16_refusal:
        raise ConfigError(
            f"train.mixed_precision 'full_bf16' does not apply here: {full_bf16_refusal}", field="train.mixed_precision"
        )
    if setting == "auto":
        if device.type != "cuda":
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.mixed_precision 'fp16' needs a CUDA GPU, but the model is on {device.type}; use 'bf16' or 'no'",
            field="train.mixed_precision",
        )
    if setting in ("bf16", "full_bf16") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"train.mixed_precision {setting!r} is not supported by this GPU; use 'fp16' or 'no'",
            field="train.mixed_precision",
        )
    return setting


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` ('no' gives a no-op context)."""
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str):
    """A GradScaler for fp16 on CUDA, else None (bf16 and fp32 need no loss scaling)."""
    if precision != "fp16" or device.type != "cuda":
        return None
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


class Bf16Masters:
    """Trained parameters kept in bf16 for the forward, with fp32 masters the optimizer updates (``full_bf16``).

    ``masters`` replace the parameters in the optimizer; after backward ``to_masters`` moves the gradients over,
    after the step ``to_params`` writes the rounded values back. ``exact()`` puts the fp32 masters in place for a
    block (saving, resume copies), so files never hold the bf16 rounding.
    """

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.masters = [p.detach().to(torch.float32, copy=True).requires_grad_(True) for p in params]
        for p in params:
            p.data = p.data.to(torch.bfloat16)

    def groups(self, groups: list[dict]) -> list[dict]:
        """Optimizer groups over the masters instead of the parameters."""
        index = {id(p): m for p, m in zip(self.params, self.masters, strict=True)}
        return [{**g, "params": [index[id(p)] for p in g["params"]]} for g in groups]

    def to_masters(self) -> None:
        for p, m in zip(self.params, self.masters, strict=True):
            m.grad = None if p.grad is None else p.grad.to(torch.float32)
            p.grad = None

    def to_params(self) -> None:
        with torch.no_grad():
            for p, m in zip(self.params, self.masters, strict=True):
                p.copy_(m)

    @contextlib.contextmanager
    def exact(self):
        """The fp32 masters as the parameters' data for the block."""
        rounded = [p.data for p in self.params]
        for p, m in zip(self.params, self.masters, strict=True):
            p.data = m.data
        try:
            yield
        finally:
            for p, data in zip(self.params, rounded, strict=True):
                p.data = data
            self.to_params()  # what the block wrote into the masters (a resume) reaches the bf16 copies

    def restore(self) -> None:
        """The parameters back in fp32 with the masters' values (after the run)."""
        for p, m in zip(self.params, self.masters, strict=True):
            p.data = m.data.clone()


@contextlib.contextmanager
def bf16_weights(module: torch.nn.Module, enabled: bool):
    """For the block: ``module``'s weight matrices and convolution kernels (the bulk of its memory) stored in bf16;
    norms and biases stay as they are (ldm's GroupNorm32 computes in fp32 with its own parameters). Put back
    bit-identically (their own dtype and values) on exit, also after errors."""
    from lib_trainer.models.guard import restored_weights

    params = [p for p in module.parameters() if p.dim() > 1 and p.is_floating_point() and p.dtype != torch.bfloat16]
    params = params if enabled else []
    with restored_weights(params):
        for p in params:
            p.data = p.data.to(torch.bfloat16)
        yield
