"""Gradient checkpointing on the host's blocks: ``torch.utils.checkpoint`` with ``use_reentrant=False``.

The ldm/sgm ``use_checkpoint`` flag is not used: its reentrant function only gives gradients to the parameters it
is handed, so injected modules (LoRA) get none, and the WebUI switches it off anyway (TESTSTACK.md). Instead each
block's forward is wrapped for the run (activations inside the block are recomputed in backward: less memory, about
a third more compute) and the block's own forward is restored exactly afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.utils.checkpoint
from torch import nn

from lib_trainer.models.guard import wrapped_forwards
from lib_trainer.models.parts import ModelParts

UNET_BLOCK_LISTS = ("input_blocks", "middle_block", "output_blocks")


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's input, middle and output blocks (ldm and sgm UNetModel alike)."""
    blocks: list[nn.Module] = []
    for name in UNET_BLOCK_LISTS:
        found = getattr(unet, name, None)
        if isinstance(found, nn.ModuleList):
            blocks += list(found)
        elif isinstance(found, nn.Module):
            blocks.append(found)
    return blocks


def checkpoint_targets(parts: ModelParts, text_encoder: bool) -> list[nn.Module]:
    """The blocks to checkpoint: the UNet's, and the text encoder layers when the text encoder trains."""
    return unet_blocks(parts.unet) + (parts.text_encoder.layers() if text_encoder else [])


def checkpointed(blocks: Iterable[nn.Module]) -> contextlib.AbstractContextManager:
    """Run each block's forward under ``torch.utils.checkpoint`` while gradients are on; restore on exit."""
    return wrapped_forwards(blocks, lambda _block, forward: _checkpointed_forward(forward))


def _checkpointed_forward(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # previews and other no-grad calls run as usual
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
