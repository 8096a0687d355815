"""Training attention through PyTorch's ``scaled_dot_product_attention`` whatever the WebUI uses for inference.

The WebUI replaces ``CrossAttention.forward`` (class level) by the optimisation chosen in its settings: Doggettx's
split attention, sub-quadratic, InvokeAI, SDP or xformers. The split and sub-quadratic ones save memory at
inference but are slow in training (many small kernels, and their backward keeps every slice). While gradients
are on, each cross-attention of the UNet (ldm's and sgm's ``CrossAttention``: ``heads``, ``to_q/k/v``,
``to_out``) runs SDPA instead, which picks the flash or memory-efficient kernel on CUDA; its projections are still
called as modules, so LoRA wrappers and hypernetwork hooks on ``to_k``/``to_v`` act as before. Without gradients
(previews) and for arguments SDPA cannot express (a mask, sgm's extra tokens), the host's forward runs. If the
WebUI uses xformers, its forward stays (xformers' kernels train fine).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lib_trainer.models.guard import wrapped_forwards

ATTENTION_PARTS = ("heads", "to_q", "to_k", "to_v", "to_out")


def cross_attentions(unet: nn.Module) -> list[nn.Module]:
    """The UNet's attention modules SDPA can run (xformers ones excluded)."""
    found = []
    for module in unet.modules():
        if not all(hasattr(module, name) for name in ATTENTION_PARTS):
            continue
        host = type(module).forward
        if "xformers" in getattr(host, "__name__", "").lower() or "MemoryEfficient" in type(module).__name__:
            continue
        found.append(module)
    return found


def sdpa_attention(unet: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager:
    """For the block: the UNet's cross-attentions compute with SDPA while gradients are on; restored on exit."""
    return wrapped_forwards(cross_attentions(unet) if enabled else [], _sdpa_forward)


def _sdpa_forward(module: nn.Module, host_forward: Callable) -> Callable:
    def forward(x, context=None, mask=None, **kwargs):
        extra = kwargs.get("additional_tokens") is not None or kwargs.get("n_times_crossframe_attn_in_self")
        extra = extra or kwargs.get("value") is not None  # Forge's separate value input (its attention patches)
        if not torch.is_grad_enabled() or mask is not None or extra:
            return host_forward(x, context=context, mask=mask, **kwargs)
        heads = module.heads
        context = x if context is None else context
        q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
        batch, length = q.shape[0], q.shape[1]
        q, k, v = (t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return module.to_out(out.transpose(1, 2).reshape(batch, length, -1))

    return forward
