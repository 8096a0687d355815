"""Adapter: ModelParts from an SDXL ``sgm`` ``DiffusionEngine`` as the WebUI holds it (``shared.sd_model``).

Duck-typed, so it works on the WebUI's patched model and on the stand-in the tests build. What it touches:
    sd_model.conditioner.embedders: a list of embedders, each with ``input_key``; the WebUI wraps the two text
        embedders (``FrozenCLIPEmbedderForSDXLWithCustomWords``, ``FrozenOpenCLIPEmbedder2WithCustomWords``) and
        keeps the sgm one as ``.wrapped``:
        - "txt" CLIP-L (sgm ``FrozenCLIPEmbedder``): ``transformer`` (HF CLIPTextModel), ``tokenizer``, ``layer``
          ("hidden"/"last"), ``layer_idx``;
        - "txt" OpenCLIP bigG (sgm ``FrozenOpenCLIPEmbedder2``): ``model`` (open_clip), ``layer``, ``legacy``,
          ``encode_with_transformer(ids) -> {layer: [B,77,d], "pooled": [B,p]}``;
        - "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple": ``ConcatTimestepEmbedderND``,
          called with ``[B, 2]`` pixel values (height, width / top, left), giving ``[B, 2*outdim]``.
    sd_model.model (OpenAIWrapper) .diffusion_model (the UNet: ``in_channels``), sd_model.apply_model(x, t, cond)
        with cond ``{"crossattn": [B,77k,2048], "vector": [B,2816]}``
    sd_model.first_stage_model: ``encoder`` + ``quant_conv`` (the legacy AutoencoderKL the WebUI's SDXL config
        uses), else ``encode(x)``; sd_model.scale_factor (0.13025; the WebUI's ``encode_first_stage`` applies it)
    sd_model.parameterization (set by the WebUI's ``extend_sdxl`` from the denoiser), else
        ``sd_model.denoiser.scaling`` (``EpsScaling``/``VScaling``)
    sd_model.alphas_cumprod_original / alphas_cumprod (the WebUI sets them from LegacyDDPMDiscretization)
    sd_model.is_sdxl_inpaint, is_ssd (the WebUI's model-type flags)
The vector is assembled as sgm's ``GeneralConditioner`` does: embedder outputs in embedder order, 3-D outputs
concatenated into ``crossattn`` along the width, 2-D ones into ``vector``. An empty prompt conditions with zeros
for the text parts (sgm trained its unconditional case that way; the WebUI's ``sdxl_zero_negative_prompt``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lib_trainer.errors import UnsupportedModelError
from lib_trainer.models.kohya_names import ldm_key_table
from lib_trainer.models.parts import LatentEncoder, ModelParts, SizeCondition
from lib_trainer.models.text import DualTextEncoder, HFClipTextEncoder, OpenClipTextEncoder

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
RESOLUTION = 1024


def is_sgm(sd_model: nn.Module) -> bool:
    """Whether ``sd_model`` is an sgm DiffusionEngine (SDXL and its relatives)."""
    return hasattr(sd_model, "conditioner")


def parts_from_sgm(
    sd_model: nn.Module,
    clip_skip: int = 1,
    model_name: str | None = None,
    model_hash: str | None = None,
    clip_l_skip: bool = False,
    checkpoint_keys: frozenset[str] = frozenset(),
) -> ModelParts:
    """ModelParts for an SDXL base model; refiner, inpainting and unknown variants are refused by name.

    ``clip_l_skip``: the WebUI's ``sdxl_clip_l_skip`` option (CLIP-L then honours Clip skip); ``checkpoint_keys``:
    marker keys of the checkpoint file (``v_pred``, ``ztsnr``) the host found, to check the prediction type.
    """
    label = model_name or "the loaded SDXL model"
    unet = sd_model.model.diffusion_model
    _refuse_variants(sd_model, unet, label)
    text, sizes = _embedders(sd_model, label)
    prediction = _prediction(sd_model, label, checkpoint_keys)
    first, second = text
    n_layers = first.transformer.config.num_hidden_layers
    if clip_l_skip:
        layer_idx = n_layers + 1 - max(1, clip_skip)  # the WebUI then takes hidden_states[-clip_skip]
    elif getattr(first, "layer", "hidden") == "last":
        layer_idx = n_layers
    else:
        layer_idx = int(first.layer_idx)
    encoder = DualTextEncoder(
        HFClipTextEncoder(first, clip_skip=n_layers + 1 - layer_idx, layer_idx=layer_idx), OpenClipTextEncoder(second)
    )
    device = next(unet.parameters()).device
    return ModelParts(
        family="sdxl",
        prediction=prediction,
        text_encoder=encoder,
        unet=unet,
        apply_model=sd_model.apply_model,
        latent_encoder=LatentEncoder(vae_encode_fn(sd_model.first_stage_model), float(sd_model.scale_factor)),
        alphas_cumprod=_alphas(sd_model).to(device=device, dtype=torch.float32),
        size_conditioned=True,
        host_modules={
            "unet": sd_model.model,
            "text_encoder": sd_model.conditioner,
            "vae": sd_model.first_stage_model,
        },
        model_name=model_name,
        model_hash=model_hash,
        conditioning=SdxlConditioning(encoder, sizes),
        resolution=RESOLUTION,
        unet_lora_names=ldm_key_table,
        model=sd_model,
    )


class SdxlConditioning:
    """Prompts (+ per-image sizes) -> ``{"crossattn", "vector"}``, in sgm ``GeneralConditioner`` order."""

    def __init__(self, encoder: DualTextEncoder, sizes: list[tuple[str, nn.Module]]):
        self.encoder, self.sizes = encoder, sizes

    def __call__(self, prompts: Sequence[str], vectors: Mapping[str, torch.Tensor] | None = None) -> dict:
        crossattn, pooled = self.encoder.encode_with_pooled(list(prompts), vectors)
        empty = torch.tensor([not p.strip() for p in prompts], device=crossattn.device)
        if bool(empty.any()):  # the unconditional case: zeros, as sgm's ucg and the WebUI's empty negative prompt
            keep = (~empty).to(crossattn.dtype)
            crossattn = crossattn * keep.view(-1, 1, 1)
            pooled = pooled * keep.view(-1, 1).to(pooled.dtype)
        conditions = getattr(prompts, "sizes", None) or [_default_size()] * len(prompts)
        vector = [pooled]
        for key, embedder in self.sizes:
            values = [_size_values(c, key) for c in conditions]
            tensor = torch.tensor(values, device=pooled.device, dtype=torch.float32)
            vector.append(embedder(tensor).to(device=pooled.device, dtype=pooled.dtype))
        return {"crossattn": crossattn, "vector": torch.cat(vector, dim=1)}


def _default_size() -> SizeCondition:
    return SizeCondition((RESOLUTION, RESOLUTION), (0, 0), (RESOLUTION, RESOLUTION))


def _size_values(condition: SizeCondition, key: str) -> tuple[int, int]:
    if key == "original_size_as_tuple":
        return condition.original
    if key == "crop_coords_top_left":
        return condition.crop_top_left
    return condition.target


def _refuse_variants(sd_model: nn.Module, unet: nn.Module, label: str) -> None:
    in_channels = getattr(unet, "in_channels", 4)
    if getattr(sd_model, "is_sdxl_inpaint", False) or in_channels != 4:
        raise UnsupportedModelError(
            f"{label} is an SDXL inpainting or edit model (its UNet takes {in_channels} input channels); training "
            "needs a plain SDXL text-to-image checkpoint such as SDXL base"
        )
    if getattr(sd_model, "is_ssd", False):
        raise UnsupportedModelError(
            f"{label} is SSD-1B (a distilled SDXL with its own block layout), which the trainer does not support; "
            "load an SDXL base checkpoint"
        )


def _embedders(sd_model: nn.Module, label: str) -> tuple[tuple[nn.Module, nn.Module], list[tuple[str, nn.Module]]]:
    """The two text embedders (sgm modules, unwrapped) and the size embedders in conditioner order."""
    text, sizes, other = [], [], []
    for embedder in sd_model.conditioner.embedders:
        key = getattr(embedder, "input_key", None)
        if key == "txt":
            if sizes:
                other.append("text after size embedders")
            text.append(getattr(embedder, "wrapped", embedder))
        elif key in SIZE_KEYS:
            sizes.append((key, embedder))
        else:
            other.append(str(key))
    kinds = [_text_kind(e) for e in text]
    if kinds != ["clip_l", "clip_g"] or other or sorted(k for k, _ in sizes) != sorted(SIZE_KEYS):
        found = ", ".join([*kinds, *(k for k, _ in sizes), *other]) or "none"
        refiner = " (an SDXL refiner)" if kinds == ["clip_g"] or "aesthetic_score" in other else ""
        raise UnsupportedModelError(
            f"{label}{refiner} has conditioner inputs [{found}], not SDXL base's CLIP-L + OpenCLIP bigG text and "
            "original size / crop / target size; the trainer supports SDXL base-type checkpoints only"
        )
    if getattr(text[1], "legacy", False):
        raise UnsupportedModelError(
            f"{label}'s OpenCLIP encoder is in legacy mode (no pooled output), which SDXL base does not use; "
            "load an SDXL base-type checkpoint"
        )
    return (text[0], text[1]), sizes


def _text_kind(embedder: nn.Module) -> str:
    if hasattr(embedder, "transformer") and hasattr(embedder, "tokenizer"):
        return "clip_l"
    if hasattr(embedder, "model") and hasattr(embedder, "encode_with_transformer"):
        return "clip_g"
    return type(embedder).__name__


def _prediction(sd_model: nn.Module, label: str, checkpoint_keys: frozenset[str]) -> str:
    prediction = getattr(sd_model, "parameterization", None)
    if prediction is None:
        scaling = type(getattr(getattr(sd_model, "denoiser", None), "scaling", None)).__name__
        prediction = {"EpsScaling": "eps", "VScaling": "v"}.get(scaling)
    if prediction not in ("eps", "v"):
        raise UnsupportedModelError(
            f"{label}: cannot tell whether it predicts noise (eps) or v; only eps- and v-prediction SDXL "
            "models are supported"
        )
    if "v_pred" in checkpoint_keys and prediction != "v":
        raise UnsupportedModelError(
            f"{label} is marked as a v-prediction checkpoint (its 'v_pred' key), but this WebUI loaded it as "
            "eps-prediction, so neither its images nor training would be right. This WebUI version cannot tell "
            "from the file: put a .yaml beside the checkpoint whose denoiser uses VScaling (or use a WebUI that "
            "detects v_pred), then train"
        )
    if "ztsnr" in checkpoint_keys and not getattr(sd_model, "ztsnr", False):
        raise UnsupportedModelError(
            f"{label} is marked as trained with zero terminal SNR ('ztsnr'), which this WebUI does not apply; "
            "training on its schedule would not match. Use a WebUI that supports ztsnr checkpoints"
        )
    return prediction


def _alphas(sd_model: nn.Module) -> torch.Tensor:
    for name in ("alphas_cumprod_original", "alphas_cumprod"):
        value = getattr(sd_model, name, None)
        if value is not None:
            return torch.as_tensor(value).detach().float()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # sgm LegacyDDPMDiscretization
    return torch.cumprod(1.0 - betas, dim=0).float()


def vae_encode_fn(vae: nn.Module):
    """(mean, std) of the latent distribution; the SDXL VAE overflows in fp16, so a non-finite result is redone
    once in fp32 with a private copy of the encoder (the host's VAE keeps its dtype)."""
    fp32: list[nn.Module] = []

    def moments(modules: list[nn.Module], images: torch.Tensor) -> torch.Tensor:
        encoder, quant = modules
        param = next(encoder.parameters())
        with torch.no_grad():
            return quant(encoder(images.to(device=param.device, dtype=param.dtype))).float()

    def encode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not (hasattr(vae, "encoder") and hasattr(vae, "quant_conv")):
            param = next(vae.parameters())
            with torch.no_grad():
                z = vae.encode(images.to(device=param.device, dtype=param.dtype)).float()
            return z, torch.zeros_like(z)
        out = moments([vae.encoder, vae.quant_conv], images)
        if not torch.isfinite(out).all() and next(vae.parameters()).dtype != torch.float32:
            if not fp32:
                fp32.extend(copy.deepcopy(m).float() for m in (vae.encoder, vae.quant_conv))
            with torch.autocast(images.device.type, enabled=False):
                out = moments(fp32, images)
        mean, logvar = torch.chunk(out, 2, dim=1)
        return mean, torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))

    return encode
