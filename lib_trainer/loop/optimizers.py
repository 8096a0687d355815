"""The optimizers a run can use, built from ``TrainConfig.optimizer``; optional packages imported only when chosen.

- ``adamw``: torch's AdamW (fused/foreach kernels where torch picks them).
- ``adamw8bit``: bitsandbytes' AdamW8bit (Dettmers et al. 2022): optimizer state in 8 bits, a quarter of AdamW's
  memory. CUDA only; bitsandbytes is optional (never installed by default).
- ``sgd``: torch's SGD (momentum 0.9 unless ``optimizer_args`` says otherwise).
- ``adafactor``: transformers' Adafactor (Shazeer & Stern 2018) at the run's learning rate (relative step and
  parameter scaling off, as kohya's fine-tuning recommends): factored second moments, no first moment, so almost no
  optimizer memory. transformers comes with the WebUI (its CLIP), so this is the torch-only fallback.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
from typing import Any

import torch

from lib_trainer.errors import ConfigError

NAMES = {
    "adamw": "torch.optim.AdamW",
    "sgd": "torch.optim.SGD",
    "adamw8bit": "bitsandbytes.optim.AdamW8bit",
    "adafactor": "transformers.optimization.Adafactor",
}


FIELD_ARGS = "train.optimizer_args"
FIXED = {"self", "params", "lr"}  # set by the trainer


def parse_optimizer_args(text: str) -> dict[str, Any]:
    """``"momentum=0.9 betas=(0.9,0.99) nesterov=True"`` -> a dict; values are Python literals (never evaluated
    code: ``ast.literal_eval``)."""
    args: dict[str, Any] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(
                f"{FIELD_ARGS} item {token!r} is not key=value; write e.g. 'momentum=0.9 betas=(0.9,0.99)'",
                field=FIELD_ARGS,
            )
        try:
            args[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConfigError(
                f"{FIELD_ARGS} value {value!r} of {key} is not a number, True/False, text in quotes or a tuple",
                field=FIELD_ARGS,
            ) from None
    return args


def _optimizer_class(name: str) -> type:
    if name == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    return torch.optim.SGD if name == "sgd" else torch.optim.AdamW


def check_optimizer(name: str, device: torch.device, args_text: str = "") -> None:
    """Refuse at submit an optimizer this machine cannot run, or arguments it does not take (naming the fix)."""
    if name == "adamw8bit":
        if device.type != "cuda":
            raise ConfigError(
                f"train.optimizer 'adamw8bit' needs a CUDA GPU, but the model is on {device.type}; use 'adafactor' "
                "(almost no optimizer memory) or 'adamw'",
                field="train.optimizer",
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                "train.optimizer 'adamw8bit' needs the bitsandbytes package, which is not installed; install it in "
                "the WebUI's Python (python -m pip install bitsandbytes) or use 'adafactor'",
                field="train.optimizer",
            )
    if name == "adafactor" and importlib.util.find_spec("transformers") is None:
        raise ConfigError(
            "train.optimizer 'adafactor' needs the transformers package; use 'adamw'", field="train.optimizer"
        )
    args = parse_optimizer_args(args_text)
    accepted = set(inspect.signature(_optimizer_class(name).__init__).parameters) - FIXED
    unknown = sorted(set(args) - accepted)
    if unknown:
        raise ConfigError(
            f"{FIELD_ARGS}: {', '.join(unknown)} is not an argument of {NAMES[name]}; it takes "
            f"{', '.join(sorted(accepted))}",
            field=FIELD_ARGS,
        )


def build_optimizer(
    name: str, groups: list[dict[str, Any]], weight_decay: float, args: dict[str, Any] | None = None
) -> torch.optim.Optimizer:
    """The optimizer over ``groups`` (each ``{"params": [...]}``); learning rates are set by the loop every step.
    ``args`` (from ``optimizer_args``) override the defaults below."""
    params = [{"params": g["params"], "lr": 0.0} for g in groups]
    defaults: dict[str, Any] = {"weight_decay": weight_decay}
    if name == "adafactor":
        defaults.update(relative_step=False, scale_parameter=False, warmup_init=False)
    if name == "sgd":
        defaults["momentum"] = 0.9
    return _optimizer_class(name)(params, lr=0.0, **{**defaults, **(args or {})})
