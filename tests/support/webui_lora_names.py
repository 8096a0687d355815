"""The WebUI 1.10 Lora extension's key rules, written independently of lib_trainer (docs/formats.md 4.2).

The built-in Lora extension turns a kohya key into a module name with fixed rules that assume the SD1/SD2
block layout (two res blocks per level: ``1 + level * 3 + index``), then looks it up in
``network_layer_mapping`` (every module's ``named_modules`` path with '.' -> '_'). A name it cannot place is
dropped. This module reimplements those rules from the documented behaviour, so the fake host can check our
files the way the WebUI does, without using our own ldm -> diffusers table.
"""

from __future__ import annotations

import re
from collections.abc import Callable

RESNET_SUFFIX = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}
X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")  # SD2's q/k/v keys land on the fused MultiheadAttention module


def _suffix(kind: str, rest: str) -> str:
    return RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest


def _openclip(rest: str) -> str:
    return rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")


Rule = tuple[re.Pattern, Callable[[re.Match, bool], str]]
RULES: list[Rule] = [
    (re.compile(r"lora_unet_conv_in(.*)"), lambda m, _: f"diffusion_model_input_blocks_0_0{m[1]}"),
    (re.compile(r"lora_unet_conv_out(.*)"), lambda m, _: f"diffusion_model_out_2{m[1]}"),
    (
        re.compile(r"lora_unet_time_embedding_linear_(\d+)(.*)"),
        lambda m, _: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}",
    ),
    (
        re.compile(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"),
        lambda m, _: (
            f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{int(m[2] == 'attentions')}_"
            f"{_suffix(m[2], m[4])}"
        ),
    ),
    (
        re.compile(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"),
        lambda m, _: (
            f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{_suffix(m[1], m[3])}"
        ),
    ),
    (
        re.compile(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"),
        lambda m, _: (
            f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{int(m[2] == 'attentions')}_"
            f"{_suffix(m[2], m[4])}"
        ),
    ),
    (
        re.compile(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"),
        lambda m, _: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op",
    ),
    (
        re.compile(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"),
        lambda m, _: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv",
    ),
    (
        re.compile(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"),
        lambda m, sd2: (
            f"model_transformer_resblocks_{m[1]}_{_openclip(m[2])}"
            if sd2
            else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
        ),
    ),
    (
        re.compile(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"),
        lambda m, _: f"1_model_transformer_resblocks_{m[1]}_{_openclip(m[2])}",
    ),
]


def convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
    """The module name the WebUI looks a kohya key up by (the key itself when no rule applies)."""
    for pattern, build in RULES:
        match = pattern.match(key)
        if match:
            return build(match, is_sd2)
    return key


def network_layer_mapping(sd_model) -> dict[str, object]:
    """``assign_network_names_to_compvis_modules``: text-encoder and UNet-wrapper module paths; on SDXL each
    wrapped text embedder's paths get its conditioner index as prefix (``0_transformer_...``, ``1_model_...``)."""
    if hasattr(sd_model, "conditioner"):
        mapping = {
            f"{i}_{name.replace('.', '_')}": module
            for i, embedder in enumerate(sd_model.conditioner.embedders)
            if hasattr(embedder, "wrapped")
            for name, module in embedder.wrapped.named_modules()
        }
        mapping.update({name.replace(".", "_"): module for name, module in sd_model.model.named_modules()})
        return mapping
    cond = getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model)
    mapping = {name.replace(".", "_"): module for name, module in cond.named_modules()}
    mapping.update({name.replace(".", "_"): module for name, module in sd_model.model.named_modules()})
    return mapping


def unmatched(keys: list[str], mapping: dict[str, object], is_sd2: bool, sdxl: bool = False) -> list[str]:
    """The module names of ``keys`` the WebUI would drop (its LDM-name fallback only with ``sdxl``, where SDXL
    files rely on it: ``lora_unet`` -> ``diffusion_model``, ``lora_te1_text_model`` -> ``0_transformer_text_model``)."""
    missing = []
    for name in sorted({key.partition(".")[0] for key in keys}):
        converted = convert_diffusers_name_to_compvis(name, is_sd2)
        proj = X_PROJ.match(converted)
        if converted in mapping or (proj and proj[1] in mapping):
            continue
        fallback = name.replace("lora_unet", "diffusion_model").replace(
            "lora_te1_text_model", "0_transformer_text_model"
        )
        if not (sdxl and fallback in mapping):
            missing.append(name)
    return missing
