"""OpenCLIP text encoders (SD2, SDXL's bigG) seen through HF CLIP's module names, for kohya LoRA keys.

kohya names every text-encoder module after transformers' ``CLIPTextModel`` (docs/formats.md section 3.3):
``text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj`` and ``.mlp.fc1/fc2``. OpenCLIP has one
``nn.MultiheadAttention`` per layer with a fused ``in_proj_weight`` ``[3d, d]`` and an ``out_proj`` whose own
forward is never called (the attention uses its weight directly), and ``mlp.c_fc``/``mlp.c_proj`` Linears.

``hf_named_openclip`` builds a tree with those HF paths: the MLP entries are the real Linears; each attention
entry is a ``FusedAttentionTargets`` holding four Linear *views* (sharing storage with the host's weights) that
give a LoRA its shapes and name. ``fused_attention_patched`` then runs each attention with
``in_proj_weight + cat(dq, dk, dv)`` and ``out_proj.weight + do`` (the host's weights are never written), which is
what the WebUI's Lora extension computes for a file holding q, k, v and out of one layer together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

DeltaFn = Callable[[], torch.Tensor]


def _view(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


class FusedAttentionTargets(nn.Module):
    """q/k/v/out of one ``nn.MultiheadAttention`` as four ``nn.Linear`` views, named as HF CLIP names them."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        if not attention._qkv_same_embed_dim or attention.in_proj_weight is None:
            raise ValueError("only attentions with a fused in_proj_weight (OpenCLIP's) are supported")
        d = attention.embed_dim
        weight, bias = attention.in_proj_weight, attention.in_proj_bias
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            part_bias = bias[i * d : (i + 1) * d] if bias is not None else None
            setattr(self, name, _view(weight[i * d : (i + 1) * d], part_bias))
        self.out_proj = _view(attention.out_proj.weight, attention.out_proj.bias)
        self.attention = [attention]  # the host module, not a child (its parameters are not ours)


class OpenClipMlpTargets(nn.Module):
    """An OpenCLIP MLP's ``c_fc``/``c_proj`` under HF CLIP's names ``fc1``/``fc2`` (the real modules)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.fc1, self.fc2 = mlp.c_fc, mlp.c_proj


class _Layer(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.self_attn = FusedAttentionTargets(block.attn)
        self.mlp = OpenClipMlpTargets(block.mlp)


def hf_named_openclip(model: nn.Module, layers: int) -> nn.Module:
    """A tree over the first ``layers`` resblocks of an open_clip text model with HF CLIP module paths.

    Never move it with ``.to``: its MLP entries are the host's modules.
    """
    root = nn.Module()
    root.text_model = nn.Module()
    root.text_model.encoder = nn.Module()
    root.text_model.encoder.layers = nn.ModuleList([_Layer(b) for b in list(model.transformer.resblocks)[:layers]])
    return root


@contextlib.contextmanager
def fused_attention_patched(
    patches: Sequence[tuple[nn.MultiheadAttention, tuple[DeltaFn, DeltaFn, DeltaFn, DeltaFn]]],
) -> Iterator[None]:
    """Run each attention with its q/k/v/out weight deltas added; restore the forwards exactly on exit."""
    saved = [
        (attention, "forward" in attention.__dict__, attention.__dict__.get("forward")) for attention, _ in patches
    ]
    try:
        for attention, deltas in patches:
            attention.forward = _patched_forward(attention, deltas)
        yield
    finally:
        for attention, had, original in saved:
            if had:
                attention.forward = original
            else:
                attention.__dict__.pop("forward", None)


def _patched_forward(attention: nn.MultiheadAttention, deltas: tuple[DeltaFn, DeltaFn, DeltaFn, DeltaFn]):
    dq, dk, dv, do = deltas

    def forward(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = attention.in_proj_weight
        in_weight = base + torch.cat([dq(), dk(), dv()]).to(base.dtype)
        out_weight = attention.out_proj.weight + do().to(base.dtype)
        if attention.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            attention.embed_dim,
            attention.num_heads,
            in_weight,
            attention.in_proj_bias,
            attention.bias_k,
            attention.bias_v,
            attention.add_zero_attn,
            attention.dropout,
            out_weight,
            attention.out_proj.bias,
            training=attention.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        return (out.transpose(0, 1) if attention.batch_first else out), weights

    return forward
