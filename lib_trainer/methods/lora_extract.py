"""A LoRA of what full fine-tuning changed: rank-r SVD of (trained - base) per kohya target, in kohya format.

The targets are the ones our LoRA trainer uses (``lora.own_targets``: the UNet's SpatialTransformer Linears and
1x1 convs, and the HF CLIP text encoder's attention/MLP when it trained), under the same file names, so the file
loads wherever our LoRAs do. alpha = rank, so the stored ``up @ down`` is the change itself (kohya's
extract_lora_from_models convention). OpenCLIP text encoders (SD2, SDXL's bigG) keep their attention fused in one
matrix and are left out of the extracted file (said in a warning).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lib_trainer.formats.lora import network_metadata, save_network
from lib_trainer.methods.lora import own_targets, unet_names
from lib_trainer.models.kohya_names import UNET_PREFIX
from lib_trainer.models.parts import ModelParts


def low_rank(diff: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with ``up @ down`` the best rank-``rank`` approximation of the 2-D ``diff`` (truncated SVD)."""
    rank = min(rank, *diff.shape)
    if min(diff.shape) <= 4 * rank:
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
    else:  # randomized SVD (Halko et al. 2011) with oversampling: far faster on large matrices, same top values
        with torch.random.fork_rng(devices=[diff.device.index or 0] if diff.is_cuda else []):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(diff, q=min(rank + 10, *diff.shape), niter=4)
        vh = v.T
    return u[:, :rank] * s[:rank], vh[:rank]


def _module_targets(parts: ModelParts, with_text: bool) -> list[tuple[str, nn.Module]]:
    """(kohya name, module) for every target, UNet first."""
    table = unet_names(parts)
    found = []
    own = own_targets(parts.unet)
    for path, module in parts.unet.named_modules():
        if id(module) in own:
            name = table.get(UNET_PREFIX + path.replace(".", "_"))
            if name is not None:
                found.append((name, module))
    if with_text:
        roots = parts.text_encoder.lora_roots()
        prefixes = ["lora_te_"] if len(roots) == 1 else [f"lora_te{i + 1}_" for i in range(len(roots))]
        for prefix, root in zip(prefixes, roots, strict=True):
            own = own_targets(root)
            found += [(prefix + p.replace(".", "_"), m) for p, m in root.named_modules() if id(m) in own]
    return found


def lora_tensors(
    parts: ModelParts, base: dict[int, torch.Tensor], rank: int, with_text: bool
) -> tuple[dict[str, torch.Tensor], int]:
    """The LoRA tensors of every changed target, and how many trained targets had no base copy (fused views)."""
    tensors: dict[str, torch.Tensor] = {}
    skipped = 0
    for name, module in _module_targets(parts, with_text):
        weight = module.weight
        original = base.get(id(weight))
        if original is None:
            skipped += int(weight.requires_grad)
            continue
        diff = weight.detach().float() - original.to(weight.device, torch.float32)
        if not bool(diff.any()):
            continue
        up, down = low_rank(diff.reshape(diff.shape[0], -1), rank)
        r = up.shape[1]
        if diff.dim() == 4:  # conv: down keeps the kernel, up is 1x1 (kohya)
            down, up = down.reshape(r, *diff.shape[1:]), up.reshape(diff.shape[0], r, 1, 1)
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(r))
    return tensors, skipped


def extract_lora(
    parts: ModelParts, base: dict[int, torch.Tensor], rank: int, path: Path, extra: dict[str, str], precision: str
) -> tuple[Path, str]:
    """Write the extracted LoRA to ``path``; returns it and a warning ("" if everything trained is in it)."""
    with_text = any(id(p) in base for p in parts.host_modules["text_encoder"].parameters())
    tensors, skipped = lora_tensors(parts, base, rank, with_text)
    meta = network_metadata(
        name=path.stem,
        algo="lora",
        rank=rank,
        alpha=float(rank),
        network_args={},
        family=parts.family,
        prediction=parts.prediction,
        resolution=(parts.resolution, parts.resolution),
        extra=extra,
    )
    written = save_network(path, tensors, meta, precision)
    warning = (
        f"the extracted LoRA leaves out {skipped} text-encoder layer(s) of an OpenCLIP encoder (their attention is "
        "one fused matrix); the full checkpoint has them"
        if skipped
        else ""
    )
    return written, warning
