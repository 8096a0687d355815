"""Build Stable Diffusion models from the REAL ldm classes the WebUI runs, with random weights.

``tiny`` models (4x8x8 latents, ~1M-parameter UNet) are for tests; ``full`` models have the SD1.5 /
SD2.1 layer sizes (random weights, no download) for benchmarks on a GPU. ldm zero-initialises the
UNet's output convolutions, which would make every gradient zero: all-zero weights are re-drawn.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from lib_trainer.models.clip_files import write_clip_tokenizer
from tests.support.stack import prepare_stack

TINY_UNET = {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [1, 2]}
# The real SD1/SD2 block layout (4 levels, 2 res blocks, attention on levels 0-2) with tiny widths.
LAYOUT_UNET = {
    "model_channels": 32,
    "channel_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attention_resolutions": [4, 2, 1],
}
FULL_UNET = {
    "model_channels": 320,
    "channel_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attention_resolutions": [4, 2, 1],
}

TINY_VAE = {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "resolution": 64}
FULL_VAE = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "resolution": 256}

SIZES = {
    "tiny": {"unet": TINY_UNET, "vae": TINY_VAE, "width": 32, "layers": 3, "heads": 4, "image": 64},
    "layout": {"unet": LAYOUT_UNET, "vae": TINY_VAE, "width": 32, "layers": 3, "heads": 4, "image": 64},
    "full": {"unet": FULL_UNET, "vae": FULL_VAE, "width": None, "layers": None, "heads": None, "image": 512},
}
FULL_TEXT = {"sd1": {"width": 768, "layers": 12, "heads": 12}, "sd2": {"width": 1024, "layers": 24, "heads": 16}}


def build_model(family: str, size: str, workdir: Path, seed: int = 0) -> torch.nn.Module:
    """Build an ldm ``LatentDiffusion`` for ``family`` ("sd1" or "sd2") at ``size`` (tiny/layout/full)."""
    prepare_stack()
    from ldm.util import instantiate_from_config

    config = model_config(family, size, workdir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # after the CLIP files exist, so a cached work folder gives the same draws
        model = instantiate_from_config(config).eval()
    reinit_zero_weights(model, seed)
    return model


def save_checkpoint(model: torch.nn.Module, path: Path, config: dict | None = None) -> Path:
    """Write ``model`` as a checkpoint file (.safetensors, or a weights-only .ckpt) and, given its ``config``, the
    ``.yaml`` beside it that the WebUI (and the headless loader) read as its config."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    if config is not None:
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.create({"model": config}), path.with_suffix(".yaml"))
    return path


def model_config(family: str, size: str, workdir: Path) -> dict:
    """The ldm config ``build_model`` instantiates (the text encoder's files written to ``workdir``)."""
    spec = copy.deepcopy(SIZES[size])
    if size == "full":
        spec.update(FULL_TEXT[family])
    cond = _clip_config(spec, workdir) if family == "sd1" else _openclip_config(spec)
    config = {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085,
            "linear_end": 0.0120,
            "num_timesteps_cond": 1,
            "log_every_t": 200,
            "timesteps": 1000,
            "first_stage_key": "jpg",
            "cond_stage_key": "txt",
            "image_size": spec["image"] // 8,
            "channels": 4,
            "cond_stage_trainable": False,
            "conditioning_key": "crossattn",
            "scale_factor": 0.18215,
            "use_ema": False,
            "parameterization": "eps" if family == "sd1" else "v",
            "unet_config": _unet_config(family, spec),
            "first_stage_config": _vae_config(spec),
            "cond_stage_config": cond,
        },
    }
    return config


def reinit_zero_weights(model: torch.nn.Module, seed: int) -> None:
    """Redraw every all-zero weight matrix/kernel (ldm zero-initialises output convs)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() > 1 and not param.any():
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)


def _unet_config(family: str, spec: dict) -> dict:
    width = spec["width"]
    params = {
        "image_size": spec["image"] // 8,
        "in_channels": 4,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": width,
        "use_checkpoint": False,
        "legacy": False,
        **spec["unet"],
    }
    if family == "sd1":
        params["num_heads"] = 8 if width >= 768 else 2
    else:
        params.update({"num_head_channels": 64 if width >= 1024 else 16, "use_linear_in_transformer": True})
    return {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params}


def _vae_config(spec: dict) -> dict:
    ddconfig = {
        "double_z": True,
        "z_channels": 4,
        "in_channels": 3,
        "out_ch": 3,
        "attn_resolutions": [],
        "dropout": 0.0,
        **spec["vae"],
    }
    return {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {"embed_dim": 4, "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}},
    }


def _clip_config(spec: dict, workdir: Path) -> dict:
    folder = workdir / f"clip-{spec['width']}-{spec['layers']}"
    if not (folder / "config.json").exists():
        write_clip_tokenizer(folder)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)  # the saved text model is the same in every work folder
            _save_clip(folder, spec)
    return {
        "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
        "params": {"version": str(folder), "device": "cpu"},
    }


def _save_clip(folder: Path, spec: dict) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=spec["width"],
        intermediate_size=spec["width"] * 4,
        projection_dim=spec["width"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    CLIPTextModel(text_config).save_pretrained(folder)


def register_openclip(name: str, spec: dict) -> str:
    """Register a random-init open_clip config (text width/heads/layers from ``spec``) and return its arch."""
    import open_clip

    arch = f"trainer-test-{name}-{spec['width']}-{spec['layers']}"
    open_clip.factory._MODEL_CONFIGS[arch] = {
        "embed_dim": spec["width"],
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": spec["width"],
            "heads": spec["heads"],
            "layers": spec["layers"],
        },
    }
    return arch


def _openclip_config(spec: dict) -> dict:
    arch = register_openclip("openclip", spec)
    return {
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"arch": arch, "version": None, "device": "cpu", "freeze": True, "layer": "penultimate"},
    }
