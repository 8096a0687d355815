"""ModelParts: everything the core needs from a loaded Stable Diffusion model, host-independent."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lib_trainer.models.text import TextEncoder

FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTIONS = ("eps", "v")


@dataclass
class LatentEncoder:
    """The VAE's encoder: image in [-1, 1] NCHW -> latent distribution (mean, std), and the scale factor."""

    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    scale_factor: float


@dataclass(frozen=True)
class SizeCondition:
    """SDXL's per-image size conditioning, in pixels, each pair (height, width) / (top, left) as sgm takes it."""

    original: tuple[int, int]  # the source image's size
    crop_top_left: tuple[int, int]  # where the training crop starts in the resized image
    target: tuple[int, int]  # the training size (the bucket)


class Prompts(list):
    """A batch's prompts (a plain ``list[str]``) with each image's ``SizeCondition`` when known."""

    def __init__(self, texts: Sequence[str] = (), sizes: Sequence[SizeCondition] | None = None):
        super().__init__(texts)
        self.sizes = list(sizes) if sizes is not None else None


Conditioning = Callable[[Sequence[str], Mapping[str, torch.Tensor] | None], Any]


@dataclass
class ModelParts:
    """A loaded model seen through what training needs; adapters build it from host objects."""

    family: str  # "sd1" | "sd2" | "sdxl"
    prediction: str  # "eps" | "v"
    text_encoder: TextEncoder
    unet: nn.Module  # the denoiser (ldm UNetModel), for freezing and for networks attached to it
    apply_model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, cond) -> prediction
    latent_encoder: LatentEncoder
    alphas_cumprod: torch.Tensor  # fp32, the unmodified training schedule
    host_modules: dict[str, nn.Module] = field(default_factory=dict)  # every host module training touches
    model_name: str | None = None
    model_hash: str | None = None
    # (prompts, {name: vectors}) -> what apply_model takes; None: the text encoder's output (SD1/SD2)
    conditioning: Conditioning | None = None
    resolution: int = 512  # the side length the model was trained at (buckets default to its square area)
    unet_lora_names: Callable[[nn.Module], dict[str, str]] | None = None  # lycoris name -> kohya file name
    model: nn.Module | None = None  # the whole host model: its state_dict (wrappers removed) is a checkpoint
    checkpoint_file: str | None = None  # the file the host loaded the model from, when known
    size_conditioned: bool = False  # the conditioning depends on each image's SizeCondition (SDXL)

    def condition(self, prompts: Sequence[str], vectors: Mapping[str, torch.Tensor] | None = None) -> Any:
        """The conditioning ``apply_model`` takes for ``prompts`` (a tensor; SDXL: its dict), with embeddings
        ``vectors`` spliced in where their names occur. ``Prompts.sizes`` gives SDXL its size conditioning."""
        if self.conditioning is not None:
            return self.conditioning(prompts, vectors)
        return self.text_encoder.encode(prompts, vectors)

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
