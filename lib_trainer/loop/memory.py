"""Memory of a run: the peak after the first steps (the preflight), and what to change when it does not fit.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` since the run began (the peak statistics are reset at its
start), against the GPU's total memory; on the CPU it is the process's peak resident memory against the
machine's RAM (a rough guide only: the process's peak cannot be reset).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field

import torch

from lib_trainer.config import TrainConfig

PREFLIGHT_STEPS = 2  # the steps after which the peak is reported (the first step allocates the optimizer state)
FITS_SHARE = 0.9  # a peak above this share of the total leaves too little room (fragmentation, previews)


@dataclass(frozen=True)
class MemoryReport:
    """Peak memory of the steps so far, the device's total, and what would lower it."""

    device: str
    steps: int
    peak_mib: float
    total_mib: float
    fits: bool
    advice: list[str] = field(default_factory=list)

    def text(self) -> str:
        """One line for the status display."""
        kind = "VRAM" if self.device.startswith("cuda") else "RAM (process peak)"
        verdict = "fits" if self.fits else "too close to the limit: " + "; ".join(self.advice)
        amount = f"{self.peak_mib / 1024:.2f} GiB of {self.total_mib / 1024:.1f} GiB"
        return f"{kind} peak {amount} after {self.steps} steps: {verdict}"


class MemoryProbe:
    """Peak memory of one run on ``device``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        """Start counting the peak from now (CUDA)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def total_mib(self) -> float:
        if self.cuda:
            return torch.cuda.get_device_properties(self.device).total_memory / 2**20
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20

    def report(self, steps: int, config: TrainConfig) -> MemoryReport:
        """The peak so far, whether it fits with room to spare, and (when not) what to change."""
        peak, total = self.peak_mib(), self.total_mib()
        fits = peak <= FITS_SHARE * total
        return MemoryReport(str(self.device), steps, peak, total, fits, [] if fits else memory_advice(config))


def memory_advice(config: TrainConfig) -> list[str]:
    """The options that lower a run's memory, among those this config does not use yet (most effective first)."""
    advice = []
    if not config.gradient_checkpointing:
        advice.append("turn on train.gradient_checkpointing (activations recomputed: far less memory, ~30% slower)")
    if config.batch_size > 1:
        advice.append(
            f"lower train.batch_size to {config.batch_size // 2} and raise train.gradient_accumulation to "
            f"{config.gradient_accumulation * 2} (the same effective batch)"
        )
    if config.optimizer not in ("adafactor", "adamw8bit", "sgd"):
        advice.append(f"use train.optimizer 'adafactor' or 'adamw8bit' ({config.optimizer!r} keeps more state)")
    if config.mixed_precision == "no":
        advice.append("use train.mixed_precision 'bf16' (or 'fp16')")
    if not config.cache_text_encoder_outputs:
        advice.append("turn on train.cache_text_encoder_outputs")
    if not config.offload_idle_models:
        advice.append("turn on train.offload_idle_models")
    advice.append("train at a smaller resolution (data.width / data.height) or a lower rank")
    return advice
