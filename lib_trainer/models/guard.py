"""Freeze host modules for training and restore them exactly afterwards (ComfyUI ModelPatcher style)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def frozen_host(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Put ``modules`` in eval mode with no trainable parameters; restore modes, flags and devices on exit.

    Restoration happens in ``finally``, so an exception or an interrupt inside the block leaves the host
    model as it was: every submodule's train/eval flag, every parameter's ``requires_grad`` and device.
    """
    modules = [m for m in modules if m is not None]
    modes = [(sub, sub.training) for m in modules for sub in m.modules()]
    params = [(p, p.requires_grad, p.device) for m in modules for p in m.parameters()]
    try:
        for module in modules:
            module.eval()
            module.requires_grad_(False)
        yield
    finally:
        for sub, training in modes:
            sub.training = training
        for param, requires_grad, device in params:
            if param.device != device:
                param.data = param.data.to(device)
            param.requires_grad_(requires_grad)


@contextlib.contextmanager
def restored_weights(params: Iterable[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Keep an exact CPU copy of ``params`` and write it back on exit, also on errors and interrupts.

    For methods that change the host's own weights (full fine-tuning): afterwards every tensor is bit-identical
    to before, in its own dtype and device, and holds no gradient. A run may change a parameter's storage dtype
    (training fp16 host weights in fp32) or device; the original storage is then put back from the copy. Yields
    the copies.
    """
    params = list(params)
    saved = [(p.detach().to("cpu", copy=True), p.device) for p in params]
    try:
        yield [copy for copy, _ in saved]
    finally:
        with torch.no_grad():
            for param, (copy, device) in zip(params, saved, strict=True):
                if param.dtype == copy.dtype and param.device == device:
                    param.copy_(copy.to(device))
                else:
                    param.data = copy.to(device)
                param.grad = None


def parameter_versions(modules: Iterable[nn.Module]) -> list[int]:
    """In-place modification counters of every parameter: unchanged counters mean untouched weights."""
    return [p._version for m in modules for p in m.parameters()]


def state_fingerprint(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state (tests compare it bit for bit)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


@contextlib.contextmanager
def wrapped_forwards(modules: Iterable[nn.Module], wrap: Callable[[nn.Module, Callable], Callable]) -> Iterator[None]:
    """Give each module the instance ``forward`` ``wrap(module, its current forward)`` for the block; on exit
    every module's ``__dict__`` is as before (its own instance forward back, or none)."""
    modules = list(modules)
    had = [("forward" in m.__dict__, m.__dict__.get("forward")) for m in modules]
    try:
        for module in modules:
            module.forward = wrap(module, module.forward)
        yield
    finally:
        for module, (present, original) in zip(modules, had, strict=True):
            if present:
                module.forward = original
            else:
                module.__dict__.pop("forward", None)


class IdleModules:
    """Host modules training does not use (the VAE once latents are cached, a text encoder whose outputs are
    cached), moved to ``target`` (the CPU) for the run and back on exit; ``present()`` brings them back for a
    block (previews, saves). Each module is put back on the device it was on, buffers included."""

    def __init__(self, modules: Iterable[nn.Module | None], target: torch.device | None):
        self.target = target
        kept = [m for m in modules if m is not None] if target is not None else []
        self.homes = [(m, next(m.parameters()).device) for m in kept if any(True for _ in m.parameters())]
        self.away = False

    def __enter__(self) -> IdleModules:
        self._send()
        return self

    def __exit__(self, *_exc) -> None:
        self._bring_back()

    @contextlib.contextmanager
    def present(self) -> Iterator[None]:
        """The modules on their own devices for the block."""
        was_away = self.away
        self._bring_back()
        try:
            yield
        finally:
            if was_away:
                self._send()

    def _send(self) -> None:
        if self.homes:
            for module, _home in self.homes:
                module.to(self.target)
            self.away = True
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _bring_back(self) -> None:
        if self.away:
            for module, home in self.homes:
                module.to(home)
            self.away = False
