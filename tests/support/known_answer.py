"""Pieces of the learning checks: fixed batches, and a loss against the frozen model's own predictions."""

from __future__ import annotations

import torch.nn.functional as F


class FixedBatches:
    """Always the same latents and prompts (the known-answer problem is deterministic)."""

    def __init__(self, latents, prompts):
        self.latents, self.prompts = latents, prompts

    def next_batch(self):
        return self.latents, self.prompts

    def rng_state(self):
        return {}

    def set_rng_state(self, state):
        pass


class TeacherObjective:
    """MSE to targets the frozen model produced with a hidden change applied, at fixed (x_t, t)."""

    def __init__(self, x_t, t, target):
        self.x_t, self.t, self.target = x_t, t, target

    def loss(self, parts, latents, cond, generator, mask=None):
        pred = parts.apply_model(self.x_t, self.t, cond).float()
        return F.mse_loss(pred, self.target, reduction="none").mean(dim=(1, 2, 3))
