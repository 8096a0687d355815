"""A reference reader of kohya LoRA/LyCORIS files written only from the format spec (docs/formats.md section 3).

It merges each module's delta into a copy of the model's weights the way the WebUI/ComfyUI do, so tests can
check that what we save means what our training network computed.
"""

from __future__ import annotations

import collections

import torch


def delta_weight(tensors: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Delta W of one module from its kohya tensors (lora_*, hada_*, lokr_*), reshaped to ``shape``."""
    t = {k: v.float() for k, v in tensors.items()}
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        rank = down.shape[0]
        delta = up.flatten(1) @ down.flatten(1)
    elif "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        rank = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None
        delta = torch.kron(w1, w2.flatten(1) if w2.dim() > 2 else w2)
    alpha = t.get("alpha")
    scale = 1.0 if alpha is None or rank is None else float(alpha) / rank
    return (delta * scale).reshape(shape)


def merge_into(
    model_modules: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor], key_to_module: dict[str, str]
) -> list[str]:
    """Add every delta to the matching module's weight in place; return the keys that matched nothing."""
    grouped: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        name, _, tensor = key.partition(".")
        grouped[name][tensor] = value
    unmatched = []
    with torch.no_grad():
        for name, parts in grouped.items():
            module = model_modules.get(key_to_module.get(name, ""))
            if module is None:
                unmatched.append(name)
                continue
            module.weight += delta_weight(parts, module.weight.shape).to(module.weight.dtype)
    return unmatched


RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def kohya_unet_names(unet: torch.nn.Module, layers_per_block: int) -> dict[str, str]:
    """``lora_unet_<diffusers path>`` -> ldm path, generated from docs/formats.md 4.1's diffusers -> LDM rules."""
    names = dict(unet.named_modules())
    per_level = layers_per_block + 1
    levels = len(unet.input_blocks[1:]) // per_level + 1
    attn_subs = [n[len("input_blocks.1.1.") :] for n in names if n.startswith("input_blocks.1.1.")]
    pairs: list[tuple[str, str]] = []

    def block(diffusers: str, ldm: str, subs: dict[str, str] | list[str]) -> None:
        items = subs.items() if isinstance(subs, dict) else ((s, s) for s in subs)
        pairs.extend((f"{diffusers}.{d}", f"{ldm}.{m}") for d, m in items)

    for x in range(levels):
        for i in range(layers_per_block):
            n = 1 + x * per_level + i
            block(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0", RESNET)
            block(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", attn_subs)
        pairs.append((f"down_blocks.{x}.downsamplers.0.conv", f"input_blocks.{(x + 1) * per_level}.0.op"))
    block("mid_block.resnets.0", "middle_block.0", RESNET)
    block("mid_block.attentions.0", "middle_block.1", attn_subs)
    block("mid_block.resnets.1", "middle_block.2", RESNET)
    for y in range(levels):
        for j in range(per_level):
            block(f"up_blocks.{y}.resnets.{j}", f"output_blocks.{y * per_level + j}.0", RESNET)
            block(f"up_blocks.{y}.attentions.{j}", f"output_blocks.{y * per_level + j}.1", attn_subs)
        last = y * per_level + layers_per_block
        upsampler = 2 if f"output_blocks.{last}.1.proj_in" in names else 1
        pairs.append((f"up_blocks.{y}.upsamplers.0.conv", f"output_blocks.{last}.{upsampler}.conv"))
    return {"lora_unet_" + d.replace(".", "_"): m for d, m in pairs if m in names}


def count_kohya_targets(unet: torch.nn.Module, conv: bool) -> int:
    """kohya's target count: Linear/Conv2d inside transformers, plus (conv) ResBlock/Down/Upsample convs."""
    count = 0
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        inside_transformer = ".transformer_blocks." in name or name.endswith((".proj_in", ".proj_out"))
        in_resblock = any(s in name for s in (".in_layers.", ".out_layers.", ".emb_layers.", ".skip_connection"))
        sampler = name.endswith(".op") or (name.endswith(".conv") and name.startswith("output_blocks"))
        count += inside_transformer or (conv and (in_resblock or sampler))
    return count
