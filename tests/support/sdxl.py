"""A tiny SDXL as the WebUI holds it, from the real classes where they exist on a registry.

``sgm`` is on no registry (TESTSTACK.md), so:
- the UNet is sdkit's ldm ``UNetModel`` (the class sgm's UNet was copied from) built with SDXL's settings
  (3 levels, no attention on level 0, linear proj, ``adm_in_channels``); its ``label_emb`` is replaced by sgm's
  "sequential" form, and per-level transformer depths (SDXL: 0/2/10, middle 10) are made by building depth
  ``max`` and keeping the first blocks of each SpatialTransformer. State-dict names then equal sgm's.
- CLIP-L is transformers' ``CLIPTextModel``, bigG an open_clip text model, VAE ldm's ``AutoencoderKL``
  (sgm's SDXL first stage is the same legacy class: ``encoder`` + ``quant_conv``).
- ``SgmCLIPEmbedder``, ``SgmOpenCLIPEmbedder2``, ``ConcatTimestepEmbedderND``, ``GeneralConditioner`` and
  ``DiffusionEngine`` below are small stand-ins written from sgm's documented behaviour with exactly the
  attributes ``lib_trainer.models.sgm`` reads (listed in its docstring); ``WebuiTextWrapper`` is the WebUI's
  hijack wrapper (``.wrapped``, ``.input_key``). tests/test_webui_real.py checks those names on the real modules.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from lib_trainer.models.clip_files import write_clip_tokenizer
from tests.support.models import _save_clip, _vae_config, register_openclip, reinit_zero_weights
from tests.support.stack import prepare_stack

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
TINY_TEXT = {"clip_l": {"width": 32, "layers": 3, "heads": 4}, "clip_g": {"width": 48, "layers": 3, "heads": 4}}
TINY_VAE = {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "resolution": 64}
LAYOUTS = {
    # tiny: SDXL's shape (no attention on level 0) at the smallest size that trains fast
    "tiny": {
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [2],
        "depths": [0, 1],
        "mid": 1,
        "channels": 32,
        "head_channels": 8,
        "text": TINY_TEXT,
        "size_outdim": 8,
        "vae": TINY_VAE,
    },
    # layout: SDXL's real block layout (3 levels, 2 res blocks, transformer depths 0/2/10, middle 10), tiny widths
    "layout": {
        "channel_mult": [1, 2, 4],
        "num_res_blocks": 2,
        "attention_resolutions": [4, 2],
        "depths": [0, 2, 10],
        "mid": 10,
        "channels": 32,
        "head_channels": 8,
        "text": TINY_TEXT,
        "size_outdim": 8,
        "vae": TINY_VAE,
    },
    # full: SDXL base's sizes (2.6 B UNet, CLIP-L 768 x 12, bigG 1280 x 32), random weights, for GPU benchmarks
    "full": {
        "channel_mult": [1, 2, 4],
        "num_res_blocks": 2,
        "attention_resolutions": [4, 2],
        "depths": [0, 2, 10],
        "mid": 10,
        "channels": 320,
        "head_channels": 64,
        "size_outdim": 256,
        "text": {
            "clip_l": {"width": 768, "layers": 12, "heads": 12},
            "clip_g": {"width": 1280, "layers": 32, "heads": 20},
        },
        "vae": {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "resolution": 256},
    },
}


class SgmCLIPEmbedder(nn.Module):
    """sgm ``FrozenCLIPEmbedder`` (SDXL's CLIP-L): ``transformer``, ``tokenizer``, ``layer``, ``layer_idx``."""

    def __init__(self, folder: Path, layer_idx: int):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        self.transformer = CLIPTextModel.from_pretrained(str(folder))
        self.layer, self.layer_idx, self.input_key = "hidden", layer_idx, "txt"


class SgmOpenCLIPEmbedder2(nn.Module):
    """sgm ``FrozenOpenCLIPEmbedder2`` (SDXL's bigG): penultimate layer + pooled projection of the last."""

    def __init__(self, arch: str):
        super().__init__()
        import open_clip

        model, _, _ = open_clip.create_model_and_transforms(arch, device="cpu", pretrained=None)
        del model.visual
        self.model, self.layer, self.legacy, self.always_return_pooled, self.input_key = (
            model,
            "penultimate",
            False,
            True,
            "txt",
        )

    def encode_with_transformer(self, text: torch.Tensor) -> dict:
        x = self.model.token_embedding(text) + self.model.positional_embedding
        x = x.permute(1, 0, 2)
        outputs = {}
        blocks = self.model.transformer.resblocks
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                outputs["penultimate"] = x.permute(1, 0, 2)
            x = block(x, attn_mask=self.model.attn_mask)
        outputs["last"] = x.permute(1, 0, 2)
        last = self.model.ln_final(outputs["last"])
        outputs["pooled"] = last[torch.arange(last.shape[0]), text.argmax(dim=-1)] @ self.model.text_projection
        return outputs


class WebuiTextWrapper(nn.Module):
    """The WebUI's hijack of an SDXL text embedder: the sgm module as ``wrapped``, its ``input_key``."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped, self.input_key = wrapped, wrapped.input_key


class ConcatTimestepEmbedderND(nn.Module):
    """sgm's size embedder: each of the ``[B, d]`` values through a sinusoidal embedding of ``outdim``."""

    def __init__(self, outdim: int, input_key: str):
        super().__init__()
        self.outdim, self.input_key = outdim, input_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, dims = x.shape
        flat = x.reshape(-1).float()
        half = self.outdim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(x.device)
        args = flat[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return emb.reshape(b, dims * self.outdim)


class GeneralConditioner(nn.Module):
    def __init__(self, embedders: list[nn.Module]):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)


class OpenAIWrapper(nn.Module):
    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = "crossattn"  # the WebUI's extend_sdxl sets it

    def forward(self, x, t, c):
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"))


class EpsScaling:
    pass


class VScaling:
    pass


class DiffusionEngine(nn.Module):
    """sgm ``DiffusionEngine`` after the WebUI's ``extend_sdxl``: parameterization, alphas_cumprod, is_sdxl."""

    def __init__(self, unet, conditioner, vae, prediction: str):
        super().__init__()
        self.model, self.conditioner, self.first_stage_model = OpenAIWrapper(unet), conditioner, vae
        self.scale_factor = 0.13025
        self.denoiser = nn.Module()
        self.denoiser.scaling = VScaling() if prediction == "v" else EpsScaling()
        self.parameterization = prediction
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()
        self.is_sdxl, self.is_sd1, self.is_sd2 = True, False, False

    @property
    def cond_stage_model(self):  # the WebUI sets cond_stage_model to the conditioner
        return self.conditioner

    def apply_model(self, x, t, cond):
        return self.model(x, t, cond)


def build_sdxl(size: str, workdir: Path, seed: int = 0, prediction: str = "eps") -> DiffusionEngine:
    """An SDXL ``DiffusionEngine`` stand-in at ``size`` ("tiny", "layout" or "full"), random weights, deterministic."""
    prepare_stack()
    from ldm.util import instantiate_from_config

    layout = LAYOUTS[size]
    clip_l, clip_g = layout["text"]["clip_l"], layout["text"]["clip_g"]
    folder = workdir / f"sdxl-clip-l-{clip_l['width']}-{clip_l['layers']}"
    if not (folder / "config.json").exists():
        write_clip_tokenizer(folder)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4321)
            _save_clip(folder, clip_l)
    arch = register_openclip("openclip-g", clip_g)
    context = clip_l["width"] + clip_g["width"]
    adm = clip_g["width"] + len(SIZE_KEYS) * 2 * layout["size_outdim"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _unet(layout, context, adm)
        vae = instantiate_from_config(_vae_config({"vae": layout["vae"]}))
        text = [SgmCLIPEmbedder(folder, layer_idx=clip_l["layers"] - 1), SgmOpenCLIPEmbedder2(arch)]
        sizes = [ConcatTimestepEmbedderND(layout["size_outdim"], key) for key in SIZE_KEYS]
        conditioner = GeneralConditioner([WebuiTextWrapper(e) for e in text] + sizes)
        model = DiffusionEngine(unet, conditioner, vae, prediction).eval()
    reinit_zero_weights(model, seed)
    with torch.no_grad():  # a random CLIP's final LayerNorm has zero bias; keep the pooled output informative
        model.conditioner.embedders[1].wrapped.model.ln_final.bias.normal_(
            0, 0.1, generator=torch.Generator().manual_seed(seed)
        )
    return model


def _unet(layout: dict, context: int, adm: int) -> nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(
        image_size=8,
        in_channels=4,
        out_channels=4,
        model_channels=layout["channels"],
        channel_mult=layout["channel_mult"],
        num_res_blocks=layout["num_res_blocks"],
        attention_resolutions=layout["attention_resolutions"],
        num_head_channels=layout["head_channels"],
        use_spatial_transformer=True,
        use_linear_in_transformer=True,
        transformer_depth=max(max(layout["depths"]), layout["mid"]),
        context_dim=[context] * max(max(layout["depths"]), layout["mid"]),  # sdkit: one entry per block
        num_classes=1,
        use_checkpoint=False,
        legacy=False,
    )
    embed = unet.time_embed[0].out_features
    unet.num_classes = "sequential"
    unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm, embed), nn.SiLU(), nn.Linear(embed, embed)))
    _prune_depths(unet, layout)
    return unet


def _prune_depths(unet: nn.Module, layout: dict) -> None:
    """Keep each level's transformer depth (sgm builds per-level depths; sdkit's ldm only one for all)."""
    levels = len(layout["channel_mult"])
    per_level = layout["num_res_blocks"]
    for index, block in enumerate(unet.input_blocks):
        if index and len(block) > 1 and hasattr(block[1], "transformer_blocks"):
            _keep(block[1], layout["depths"][(index - 1) // (per_level + 1)])
    _keep(unet.middle_block[1], layout["mid"])
    for index, block in enumerate(unet.output_blocks):
        if len(block) > 1 and hasattr(block[1], "transformer_blocks"):
            _keep(block[1], layout["depths"][levels - 1 - index // (per_level + 1)])


def _keep(transformer: nn.Module, depth: int) -> None:
    transformer.transformer_blocks = nn.ModuleList(list(transformer.transformer_blocks)[:depth])
    transformer.__class__ = _sgm_spatial_transformer(type(transformer))


def _sgm_spatial_transformer(base: type) -> type:
    """sgm's SpatialTransformer: one context tensor serves every block (sdkit's wants a list, one per block)."""
    from einops import rearrange

    def forward(self, x, context=None):
        context = context if isinstance(context, list) else [context]
        _, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "b c h w -> b (h w) c").contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, context=context[0 if len(context) == 1 else i])
        if self.use_linear:
            x = self.proj_out(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in

    return type("SpatialTransformer", (base,), {"forward": forward})
