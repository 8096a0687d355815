"""The WebUI's hypernetwork format (docs/formats.md section 2): modules, the ``.pt`` dict, and a safetensors copy.

A hypernetwork holds, per enabled width, a pair of modules (for the attention's key and value inputs), each
``x + Sequential(...)(x) * multiplier``. The Sequential is built exactly as the WebUI builds it, because the
state-dict indices (``linear.<i>.weight``) depend on which activation / LayerNorm / Dropout layers exist.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from lib_trainer.errors import FormatError
from lib_trainer.formats.files import finite_for_saving, load_torch_weights, write_atomic, write_bytes_atomic

WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


def activations() -> dict[str, type[nn.Module]]:
    """Activation names the WebUI accepts ("swish" is Hardswish there) plus every torch.nn activation, lower-cased."""
    table: dict[str, type[nn.Module]] = {
        "linear": nn.Identity,
        "relu": nn.ReLU,
        "leakyrelu": nn.LeakyReLU,
        "elu": nn.ELU,
        "swish": nn.Hardswish,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }
    for name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass):
        if cls.__module__ == "torch.nn.modules.activation":
            table[name.lower()] = cls
    return table


@dataclass
class Structure:
    """Everything that decides a hypernetwork module's layout (written explicitly into every file)."""

    layer_structure: list[float]
    activation_func: str = "linear"
    weight_init: str = "Normal"
    layer_norm: bool = False
    dropout_structure: list[float] = field(default_factory=list)
    activate_output: bool = False

    def __post_init__(self) -> None:
        if not self.dropout_structure:
            self.dropout_structure = [0.0] * len(self.layer_structure)


class HypernetworkModule(nn.Module):
    """``x + linear(x) * multiplier`` (multiplier 1 while training, as in the WebUI)."""

    def __init__(self, dim: int, structure: Structure):
        super().__init__()
        self.multiplier = 1.0
        self.linear = nn.Sequential(*build_layers(dim, structure))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Transform a key/value input."""
        return x + self.linear(x) * (self.multiplier if not self.training else 1.0)


def build_layers(dim: int, s: Structure) -> list[nn.Module]:
    """The WebUI's layer order: Linear, activation (not after the last unless activate_output), LayerNorm, Dropout."""
    layers: list[nn.Module] = []
    ls, last = s.layer_structure, len(s.layer_structure) - 2
    for i in range(len(ls) - 1):
        layers.append(nn.Linear(int(dim * ls[i]), int(dim * ls[i + 1])))
        if s.activation_func not in ("linear", None) and not (i >= last and not s.activate_output):
            layers.append(activations()[s.activation_func]())
        if s.layer_norm:
            layers.append(nn.LayerNorm(int(dim * ls[i + 1])))
        if s.dropout_structure[i + 1] > 0:
            layers.append(nn.Dropout(p=s.dropout_structure[i + 1]))
    return layers


def initialize(module: HypernetworkModule, weight_init: str, activation: str, generator: torch.Generator) -> None:
    """The WebUI's initialisations (Normal: weights N(0, 0.01), biases 0; LayerNorm always Normal)."""
    nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
    with torch.no_grad():
        for layer in module.linear:
            if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
                continue
            w, b = layer.weight, layer.bias
            if weight_init == "Normal" or isinstance(layer, nn.LayerNorm):
                w.copy_(torch.randn(w.shape, generator=generator) * 0.01)
                b.zero_()
                continue
            fn = {
                "XavierUniform": nn.init.xavier_uniform_,
                "XavierNormal": nn.init.xavier_normal_,
                "KaimingUniform": lambda t: nn.init.kaiming_uniform_(t, nonlinearity=nonlinearity),
                "KaimingNormal": lambda t: nn.init.kaiming_normal_(t, nonlinearity=nonlinearity),
            }[weight_init]
            fn(w)
            b.zero_()


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}


def hypernetwork_dict(
    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]],
    structure: Structure,
    name: str,
    step: int,
    model_hash: str | None,
    model_name: str | None,
    info: str | None,
) -> dict[Any, Any]:
    """The ``.pt`` dict with every key the WebUI reads written explicitly (plain dicts, fp32 CPU tensors)."""
    data: dict[Any, Any] = {int(size): (_plain_state(k), _plain_state(v)) for size, (k, v) in layers.items()}
    data.update(
        {
            "step": int(step),
            "name": name,
            "layer_structure": list(structure.layer_structure),
            "activation_func": structure.activation_func,
            "is_layer_norm": bool(structure.layer_norm),
            "weight_initialization": structure.weight_init,
            "sd_checkpoint": model_hash,
            "sd_checkpoint_name": model_name,
            "activate_output": bool(structure.activate_output),
            "use_dropout": any(p > 0 for p in structure.dropout_structure),
            "dropout_structure": list(structure.dropout_structure),
            "last_layer_dropout": structure.dropout_structure[-2] != 0
            if len(structure.dropout_structure) > 1
            else False,
            "optional_info": info,
        }
    )
    return data


def save_hypernetwork(path: Path, data: dict[Any, Any], metadata: dict[str, str]) -> list[Path]:
    """``<name>.pt`` in torch's legacy format (the WebUI's safe unpickler accepts it) + a ``.safetensors`` copy."""
    tensors = {
        f"{size}.{'kv'[i]}.{key}": value
        for size, pair in data.items()
        if isinstance(size, int)
        for i, state in enumerate(pair)
        for key, value in state.items()
    }
    tensors = finite_for_saving(
        tensors, torch.float32, f"hypernetwork {path.stem}", "Lower train.learning_rate (1e-5 is a safe start)"
    )
    written = [write_atomic(path, lambda tmp: torch.save(data, tmp, _use_new_zipfile_serialization=False))]
    header = {k: json.dumps(v) for k, v in data.items() if not isinstance(k, int)}
    blob = safetensors.torch.save(tensors, metadata={**header, **metadata})
    written.append(write_bytes_atomic(path.with_suffix(".safetensors"), blob))
    return written


def read_hypernetwork(path: Path, field: str | None = None) -> dict[Any, Any]:
    """A WebUI hypernetwork ``.pt`` read with ``weights_only=True`` (for resuming); FormatError naming ``field``."""
    data = load_torch_weights(path, "a hypernetwork", field)
    if not isinstance(data, dict) or not any(isinstance(k, int) for k in data):
        raise FormatError(f"{Path(path).name} is not a hypernetwork (no per-size layer pairs)", field)
    for size, pair in ((k, v) for k, v in data.items() if isinstance(k, int)):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(sd, dict) for sd in pair)):
            raise FormatError(f"{Path(path).name}: the {size} entry is not a (key, value) pair of layers", field)
    return data


def structure_of(data: dict[Any, Any]) -> Structure:
    """The layout recorded in a hypernetwork dict, with the WebUI's defaults for keys old files lack."""
    layer_structure = data.get("layer_structure") or [1, 2, 1]
    dropout = data.get("dropout_structure")
    if not dropout:
        use, last = data.get("use_dropout", False), data.get("last_layer_dropout", False)
        dropout = [0.0] * len(layer_structure)
        if use:
            dropout = [0.0] + [0.3] * (len(layer_structure) - 3) + [0.3 if last else 0.0, 0.0]
    return Structure(
        list(layer_structure),
        data.get("activation_func") or "linear",
        data.get("weight_initialization") or "Normal",
        bool(data.get("is_layer_norm", False)),
        list(dropout),
        bool(data.get("activate_output", True)),
    )
