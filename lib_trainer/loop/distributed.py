"""Data parallel training over several processes (torchrun, accelerate launch): the parts the loop needs.

Every rank builds the same global batch (per-GPU batch x world size, the same seeds), takes its contiguous rows,
and draws the timesteps and noise of the whole batch before taking its rows, so N ranks compute exactly what one
process computes on the global batch. The gradients of the trained parameters (only those: the host model is
frozen) are summed over ranks after the accumulation steps; each rank's loss is scaled so the sum is the global
batch's loss. Only rank 0 writes files. Without ``torch.distributed`` initialised everything here is a no-op, so
the WebUI's single-process runs are unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


def active() -> bool:
    """Whether this process is one of several (an initialised process group of size > 1)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    """The number of processes training together (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0)."""
    return rank() == 0


def launched_world() -> int:
    """The world size a launcher (torchrun, accelerate launch) set in the environment, before any group exists."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_environment(device: torch.device) -> None:
    """Join the launcher's process group (``env://``): NCCL on CUDA, gloo on the CPU."""
    if launched_world() > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's communicator goes to the current device: each rank its own GPU
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")


@dataclass(frozen=True)
class RowShare:
    """This rank's rows ``[start, stop)`` of a global batch of ``total`` rows. A rank left without rows (a batch
    smaller than the world) trains on row 0 with weight 0 (``idle``): its random draws and collectives stay in step
    with the others, and it adds nothing."""

    start: int
    stop: int
    total: int
    idle: bool = False

    def take(self, value):
        """This rank's rows of a batch tensor, list (``Prompts`` keeps its sizes) or dict of them."""
        if isinstance(value, dict):
            return {key: self.take(item) for key, item in value.items()}
        if isinstance(value, torch.Tensor):
            return value[self.start : self.stop]
        sizes = getattr(value, "sizes", None)
        taken = type(value)(value[self.start : self.stop])
        if sizes is not None:
            taken.sizes = sizes[self.start : self.stop]
        return taken


def share(total: int) -> RowShare | None:
    """This rank's contiguous rows of ``total`` (the first ``total % world`` ranks take one more); None alone."""
    if not active():
        return None
    size, index = world(), rank()
    base, extra = divmod(total, size)
    start = index * base + min(index, extra)
    stop = start + base + (1 if index < extra else 0)
    return RowShare(start, stop, total) if stop > start else RowShare(0, 1, total, idle=True)


def sum_gradients(params: Sequence[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over ranks (a rank without a gradient adds zeros), in one flat buffer per
    dtype; a parameter no rank has a gradient for keeps none, so the optimizer skips it as it would alone."""
    if not active() or not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    used = [p for p, flag in zip(params, has.tolist(), strict=True) if flag]
    for param in used:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    for dtype in sorted({p.grad.dtype for p in used}, key=str):
        grads = [p.grad for p in used if p.grad.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def broadcast_parameters(params: Sequence[torch.Tensor]) -> None:
    """Make every rank start from rank 0's values (a resumed or randomly initialised trainable)."""
    if not active():
        return
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=0)


def sum_values(values: Sequence[float], device: torch.device) -> list[float]:
    """The sums over ranks of a few numbers (the step's loss and its parts)."""
    if not active():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (a stop or save asked for on one rank is done by all)."""
    if not active():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier() -> None:
    """Wait for every rank (after rank 0 wrote what the others read)."""
    if active():
        dist.barrier()
