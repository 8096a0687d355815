"""ModelParts: everything the core needs from a loaded Stable Diffusion model, host-independent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lib_trainer.models.text import TextEncoder

FAMILIES = ("sd1", "sd2")
PREDICTIONS = ("eps", "v")


@dataclass
class LatentEncoder:
    """The VAE's encoder: image in [-1, 1] NCHW -> latent distribution (mean, std), and the scale factor."""

    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    scale_factor: float


@dataclass
class ModelParts:
    """A loaded model seen through what training needs; adapters build it from host objects."""

    family: str  # "sd1" | "sd2"
    prediction: str  # "eps" | "v"
    text_encoder: TextEncoder
    unet: nn.Module  # the denoiser (ldm UNetModel), for freezing and for networks attached to it
    apply_model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, cond) -> prediction
    latent_encoder: LatentEncoder
    alphas_cumprod: torch.Tensor  # fp32, the unmodified training schedule
    host_modules: dict[str, nn.Module] = field(default_factory=dict)  # every host module training touches
    model_name: str | None = None
    model_hash: str | None = None

    @property
    def device(self) -> torch.device:
        """Device the UNet runs on."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the UNet weights."""
        return next(self.unet.parameters()).dtype

    @property
    def num_timesteps(self) -> int:
        """Length of the training noise schedule (1000 for SD)."""
        return int(self.alphas_cumprod.shape[0])
