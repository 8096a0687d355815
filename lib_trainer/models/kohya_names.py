"""kohya LoRA key names for ldm modules: lookup tables built from the real module list (docs/formats.md section 4).

SD1/SD2 files use diffusers-style UNet paths (``lora_unet_down_blocks_0_attentions_0_...``), which the WebUI,
Forge, ComfyUI and diffusers all load; text-encoder paths follow HF CLIP (``lora_te_text_model_encoder_...``).
Underscore-joined keys are never parsed back: both directions go through tables made from ``named_modules``.
"""

from __future__ import annotations

from torch import nn

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "input_blocks.0.0": "conv_in",
}


def _resnet_suffix(rest: list[str]) -> str:
    joined = ".".join(rest)
    for ldm, diffusers in _RESNET.items():
        if joined == ldm or joined.startswith(ldm + "."):
            return diffusers + joined[len(ldm) :]
    return joined


def _has_attention(block: nn.Module) -> bool:
    return len(block) > 1 and type(block[1]).__name__ in ("SpatialTransformer", "SpatialTransformer3D")


def ldm_to_diffusers(path: str, unet: nn.Module) -> str:
    """The diffusers path of an ldm UNet module path (SD1/SD2 layout)."""
    for ldm, diffusers in _TOP.items():
        if path == ldm or path.startswith(ldm + "."):
            return diffusers + path[len(ldm) :]
    parts = path.split(".")
    per_level = _layers_per_block(unet) + 1
    kind, index, sub, rest = parts[0], int(parts[1]), parts[2], parts[3:]
    if kind == "input_blocks":
        level, pos = divmod(index - 1, per_level)
        if pos == per_level - 1:
            return f"down_blocks.{level}.downsamplers.0.conv"
        if sub == "0":
            return f"down_blocks.{level}.resnets.{pos}.{_resnet_suffix(rest)}"
        return f"down_blocks.{level}.attentions.{pos}." + ".".join(rest)
    if kind == "middle_block":
        name = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}[parts[1]]
        rest = parts[2:]
        return f"mid_block.{name}." + (_resnet_suffix(rest) if "resnets" in name else ".".join(rest))
    if kind == "output_blocks":
        level, pos = divmod(index, per_level)
        if sub == "0":
            return f"up_blocks.{level}.resnets.{pos}.{_resnet_suffix(rest)}"
        if sub == "1" and _has_attention(unet.output_blocks[index]):
            return f"up_blocks.{level}.attentions.{pos}." + ".".join(rest)
        return f"up_blocks.{level}.upsamplers.0.conv"
    raise ValueError(f"no diffusers name for ldm module {path!r}")


def _layers_per_block(unet: nn.Module) -> int:
    value = unet.num_res_blocks
    return value[0] if isinstance(value, (list, tuple)) else int(value)


def unet_key_table(unet: nn.Module) -> dict[str, str]:
    """``lora_unet_<ldm path>`` (lycoris' names) -> ``lora_unet_<diffusers path>`` (kohya's SD1/SD2 names)."""
    table = {}
    for name, _module in unet.named_modules():
        if not name or name.split(".")[0] not in ("input_blocks", "middle_block", "output_blocks", "time_embed", "out"):
            continue
        try:
            table[UNET_PREFIX + name.replace(".", "_")] = UNET_PREFIX + ldm_to_diffusers(name, unet).replace(".", "_")
        except (ValueError, KeyError, IndexError):
            continue
    return table


def module_key_table(root: nn.Module, prefix: str) -> dict[str, str]:
    """``prefix + path with '_'`` -> the module path, for every module under ``root`` (reverse lookups)."""
    return {prefix + name.replace(".", "_"): name for name, _ in root.named_modules() if name}


def ldm_key_table(unet: nn.Module) -> dict[str, str]:
    """SDXL's kohya names are the LDM/sgm paths themselves (``lora_unet_input_blocks_4_1_...``): an identity table
    over the UNet's modules, so a module outside the UNet still has no name."""
    names = (UNET_PREFIX + name.replace(".", "_") for name, _ in unet.named_modules() if name)
    return {name: name for name in names}
