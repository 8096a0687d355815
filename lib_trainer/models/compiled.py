"""``train.compile``: the UNet's forward through ``torch.compile`` for the run (opt-in).

Only calls with gradients on go through the compiled function (previews run the host's forward as usual, without
recompiling for their shapes). The first steps are slow while it compiles, once per bucket shape; the time is
reported. The UNet's own forward is restored on exit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import nn

from lib_trainer.models.guard import wrapped_forwards

BACKEND = "inductor"  # tests use "aot_eager" (no C compiler needed)


def compiled_unet(unet: nn.Module, enabled: bool, report: Callable[[str], None]) -> contextlib.AbstractContextManager:
    """For the block: ``unet``'s forward compiled (when ``enabled``); ``report`` hears about compile times."""
    return wrapped_forwards([unet] if enabled else [], lambda _m, forward: _compiled(forward, report))


def _compiled(forward: Callable, report: Callable[[str], None]) -> Callable:
    fast = torch.compile(forward, backend=BACKEND, dynamic=False)
    shapes: set[tuple] = set()

    def run(x, *args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(x, *args, **kwargs)
        shape = tuple(x.shape)
        if shape in shapes:
            return fast(x, *args, **kwargs)
        started = time.monotonic()
        out = fast(x, *args, **kwargs)
        shapes.add(shape)
        report(f"torch.compile: the UNet for input {list(shape)} compiled in {time.monotonic() - started:.1f} s")
        return out

    return run
