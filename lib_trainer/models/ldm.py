"""Adapter: ModelParts from an ldm ``LatentDiffusion`` (the object the WebUI holds as ``shared.sd_model``).

Duck-typed on the ldm structure, so it works on the WebUI's hijacked model (``cond_stage_model.wrapped``
is the ldm embedder) and on a bare ldm model built in tests alike.
"""

from __future__ import annotations

import torch
from torch import nn

from lib_trainer.errors import UnsupportedModelError
from lib_trainer.models.parts import LatentEncoder, ModelParts
from lib_trainer.models.text import HFClipTextEncoder, OpenClipTextEncoder, TextEncoder


def parts_from_ldm(
    sd_model: nn.Module, clip_skip: int = 1, model_name: str | None = None, model_hash: str | None = None
) -> ModelParts:
    """Build ModelParts from an ldm LatentDiffusion (SD1/SD2; SDXL goes through ``models.sgm``); inpainting and
    x0 models are refused."""
    _refuse_unsupported(sd_model)
    embedder = _ldm_embedder(sd_model)
    text_encoder, family = _text_encoder(embedder, clip_skip)
    alphas = getattr(sd_model, "alphas_cumprod_original", None)
    if alphas is None:
        alphas = sd_model.alphas_cumprod
    unet = sd_model.model.diffusion_model
    alphas = alphas.detach().to(device=next(unet.parameters()).device, dtype=torch.float32)
    return ModelParts(
        family=family,
        prediction=sd_model.parameterization,
        text_encoder=text_encoder,
        unet=unet,
        apply_model=sd_model.apply_model,
        latent_encoder=LatentEncoder(_vae_encode_fn(sd_model), float(sd_model.scale_factor)),
        alphas_cumprod=alphas,
        host_modules={
            "unet": sd_model.model,
            "text_encoder": sd_model.cond_stage_model,
            "vae": sd_model.first_stage_model,
        },
        model_name=model_name,
        model_hash=model_hash,
        model=sd_model,
    )


def _refuse_unsupported(sd_model: nn.Module) -> None:
    if hasattr(sd_model, "conditioner") or getattr(sd_model, "is_sdxl", False):
        raise UnsupportedModelError(
            "the loaded model is SDXL (an sgm DiffusionEngine); build its parts with models.sgm.parts_from_sgm"
        )
    if not hasattr(sd_model, "cond_stage_model") or not hasattr(sd_model, "apply_model"):
        raise UnsupportedModelError(
            f"the loaded model ({type(sd_model).__name__}) is not a Stable Diffusion LatentDiffusion model; "
            "load an SD1.x or SD2.x checkpoint"
        )
    key = getattr(getattr(sd_model, "model", None), "conditioning_key", None)
    if key != "crossattn":
        raise UnsupportedModelError(
            f"the loaded model has conditioning_key {key!r} (an inpainting or instruct model); "
            "training needs a plain text-to-image checkpoint (conditioning_key 'crossattn')"
        )
    if getattr(sd_model, "parameterization", None) not in ("eps", "v"):
        raise UnsupportedModelError(
            f"the loaded model predicts {sd_model.parameterization!r}; only eps- and v-prediction models are supported"
        )


def _ldm_embedder(sd_model: nn.Module) -> nn.Module:
    cond = sd_model.cond_stage_model
    return getattr(cond, "wrapped", cond)


def _text_encoder(embedder: nn.Module, clip_skip: int) -> tuple[TextEncoder, str]:
    if hasattr(embedder, "transformer") and hasattr(embedder, "tokenizer"):
        return HFClipTextEncoder(embedder, clip_skip=clip_skip), "sd1"
    if hasattr(embedder, "model") and hasattr(embedder, "encode_with_transformer"):
        return OpenClipTextEncoder(embedder), "sd2"
    raise UnsupportedModelError(
        f"the text encoder {type(embedder).__name__} is not supported; expected ldm FrozenCLIPEmbedder (SD1) "
        "or FrozenOpenCLIPEmbedder (SD2)"
    )


def _vae_encode_fn(sd_model: nn.Module):
    vae = sd_model.first_stage_model

    def encode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        param = next(vae.parameters())
        with torch.no_grad():
            dist = vae.encode(images.to(device=param.device, dtype=param.dtype))
        if isinstance(dist, torch.Tensor):
            return dist.float(), torch.zeros_like(dist, dtype=torch.float32)
        return dist.mean.float(), dist.std.float()

    return encode
