"""The DDPM forward process and training targets (Ho et al. 2020; v-prediction: Salimans & Ho 2022).

x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * eps, with a_t = alphas_cumprod[t];
the eps-model's target is eps, the v-model's target is v = sqrt(a_t) * eps - sqrt(1 - a_t) * x_0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lib_trainer.models.parts import ModelParts


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t for integer timesteps ``t`` (one per batch row)."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def target_for(
    prediction: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """What the model should output at x_t: eps for eps-models, v for v-models."""
    if prediction == "eps":
        return noise
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def min_snr_weight(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction."""
    a = alphas_cumprod[t]
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction == "v" else clipped / snr


class DiffusionObjective:
    """The standard denoising loss: random t and noise, MSE to the parameterisation's target, per sample.

    ``noise_offset`` adds a per-channel constant to the noise (Guttenberg 2023, "offset noise");
    ``min_snr_gamma`` > 0 weights each sample by ``min_snr_weight``.
    """

    def __init__(self, noise_offset: float = 0.0, min_snr_gamma: float = 0.0):
        self.noise_offset, self.min_snr_gamma = noise_offset, min_snr_gamma

    def loss(
        self,
        parts: ModelParts,
        latents: torch.Tensor,
        cond: torch.Tensor,
        generator: torch.Generator,
        mask: torch.Tensor | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Per-sample MSE ``[B]`` of the model's prediction at a random timestep (mask-weighted if given).

        ``rows`` = (start, total): ``latents`` are rows start.. of a batch of ``total`` (one rank's share); the
        timesteps and noise are drawn for the whole batch and these rows kept, as one process would draw them."""
        batch = latents.shape[0]
        start, total = rows or (0, batch)
        keep = slice(start, start + batch)
        draw = torch.randint(0, parts.num_timesteps, (total,), generator=generator, device=generator.device)
        t = draw[keep].to(latents.device)
        shape = (total, *latents.shape[1:])
        noise = torch.randn(shape, generator=generator, device=generator.device)[keep].to(latents.device)
        if self.noise_offset:
            offset = torch.randn((total, latents.shape[1], 1, 1), generator=generator, device=generator.device)
            noise = noise + self.noise_offset * offset[keep].to(latents.device)
        x_t = add_noise(latents, noise, t, parts.alphas_cumprod)
        pred = parts.apply_model(x_t.to(parts.dtype), t, cond)
        target = target_for(parts.prediction, latents, noise, t, parts.alphas_cumprod)
        error = F.mse_loss(pred.float(), target.float(), reduction="none")
        if mask is None:
            loss = error.mean(dim=(1, 2, 3))
        else:  # transparent pixels (mask 0) do not count; the mean is over the counted area
            weight = mask.float().expand_as(error)
            loss = (error * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3)).clamp(min=1e-6)
        if self.min_snr_gamma:
            loss = loss * min_snr_weight(t, parts.alphas_cumprod, self.min_snr_gamma, parts.prediction)
        return loss
