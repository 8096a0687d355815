"""Pieces of the learning checks: fixed batches, and a loss against the frozen model's own predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lib_trainer.models.diffusion import add_noise


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


def learning_train(steps: int, learning_rate: str, schedule: str = "cosine") -> dict:
    """The ``train`` section of a learning check: no saves, no previews."""
    return {
        "steps": steps,
        "learning_rate": learning_rate,
        "lr_schedule": schedule,
        "save_every": 0,
        "preview_every": 0,
    }


def noisy_latents(parts, seed: int, t=(300, 600)):
    """(x0, x_t, t) for two fixed samples: the known-answer problem's inputs."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor(list(t))
    return x0, add_noise(x0, torch.randn(2, 4, 8, 8, generator=gen), t, parts.alphas_cumprod), t


def loss_before_and_after(parts, trainable, objective, x0, prompts, train_config, loss_now) -> tuple[float, float]:
    """``loss_now()`` before and after training ``trainable`` on the fixed batch (saving switched off)."""
    from lib_trainer.loop.train import train

    trainable.save = lambda step, resume: []
    before = loss_now()
    train(parts, trainable, FixedBatches(x0, prompts), objective, train_config)
    return before, loss_now()
