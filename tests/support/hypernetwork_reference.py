"""A hypernetwork loader written only from docs/formats.md section 2 (not from our code), for the format test."""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {
    "linear": None,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "mish": nn.Mish,
    "softsign": nn.Softsign,
}


def build_sequential(dim: int, data: dict) -> nn.Sequential:
    """For each i: Linear; the activation unless linear or (last and not activate_output); LayerNorm; Dropout."""
    ls, ds = data["layer_structure"], data["dropout_structure"]
    layers: list[nn.Module] = []
    for i in range(len(ls) - 1):
        layers.append(nn.Linear(int(dim * ls[i]), int(dim * ls[i + 1])))
        is_last = i == len(ls) - 2
        if ACTIVATIONS[data["activation_func"]] is not None and not (is_last and not data["activate_output"]):
            layers.append(ACTIVATIONS[data["activation_func"]]())
        if data["is_layer_norm"]:
            layers.append(nn.LayerNorm(int(dim * ls[i + 1])))
        if ds[i + 1] > 0:
            layers.append(nn.Dropout(ds[i + 1]))
    return nn.Sequential(*layers)


def load_pair(path, size: int) -> tuple[nn.Sequential, nn.Sequential, dict]:
    """The (k, v) Sequentials for ``size`` from a saved .pt, loaded strictly."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    pair = []
    for state in data[size]:
        seq = build_sequential(size, data)
        seq.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()}, strict=True)
        pair.append(seq.eval())
    return pair[0], pair[1], data
