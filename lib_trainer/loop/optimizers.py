"""The optimizers a run can use, built from ``TrainConfig.optimizer``; optional packages imported only when chosen.

- ``adamw``: torch's AdamW; on CUDA its fused kernel (one launch for all parameters), else foreach.
- ``adamw8bit``: bitsandbytes' AdamW8bit (Dettmers et al. 2022): optimizer state in 8 bits, a quarter of AdamW's
  memory. CUDA only.
- ``lion``: Lion (Chen et al. 2023, lion-pytorch): sign updates, one moment (half AdamW's state). Use a learning
  rate 3-10x smaller than AdamW's and a larger weight decay.
- ``prodigy``: Prodigy (Mishchenko & Defazio 2023, prodigyopt): estimates the step size itself; the learning rate
  is a multiplier of that estimate, so 1.0 is the usual value.
- ``adamw_schedulefree``: schedule-free AdamW (Defazio et al. 2024, schedulefree): no decay schedule needed (use
  ``constant``); it keeps two points and the saved weights are its averaged ("eval") point.
- ``adafactor``: transformers' Adafactor (Shazeer & Stern 2018): factored second moments, no first moment, so almost
  no optimizer memory. At the run's learning rate by default (relative step and parameter scaling off, as kohya's
  fine-tuning recommends); ``optimizer_args`` ``relative_step=True scale_parameter=True warmup_init=True`` gives
  its own time-dependent rate instead (the learning-rate setting is then unused).
- ``sgd``: torch's SGD with momentum 0.9 (``optimizer_args`` can set ``nesterov=True`` and other momentum).

The optional packages (bitsandbytes, lion-pytorch, prodigyopt, schedulefree) are never installed by default;
Settings -> Trainer lists those the WebUI's start-up should install (install.py).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from lib_trainer.errors import ConfigError


@dataclass(frozen=True)
class OptimizerSpec:
    """Where an optimizer class lives, which pip package has it, and the defaults the trainer sets."""

    module: str
    attribute: str
    package: str = ""  # pip name; empty for torch/transformers (always present with the WebUI)
    cuda_only: bool = False
    defaults: tuple[tuple[str, Any], ...] = ()

    @property
    def qualified(self) -> str:
        return f"{self.module}.{self.attribute}"


SPECS = {
    "adamw": OptimizerSpec("torch.optim", "AdamW"),
    "adamw8bit": OptimizerSpec("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", cuda_only=True),
    "lion": OptimizerSpec("lion_pytorch", "Lion", "lion-pytorch"),
    "prodigy": OptimizerSpec("prodigyopt", "Prodigy", "prodigyopt", defaults=(("safeguard_warmup", True),)),
    "adamw_schedulefree": OptimizerSpec("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "adafactor": OptimizerSpec(
        "transformers.optimization",
        "Adafactor",
        defaults=(("relative_step", False), ("scale_parameter", False), ("warmup_init", False)),
    ),
    "sgd": OptimizerSpec("torch.optim", "SGD", defaults=(("momentum", 0.9),)),
}
NAMES = {name: spec.qualified for name, spec in SPECS.items()}
OPTIONAL_PACKAGES = {name: spec.package for name, spec in SPECS.items() if spec.package}

FIELD = "train.optimizer"
FIELD_ARGS = "train.optimizer_args"
FIXED = {"self", "params", "lr"}  # set by the trainer
PLACEHOLDER_RATE = 1e-3  # construction only (Prodigy refuses 0): the loop sets every group's rate before each step


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
    spec = SPECS[name]
    return getattr(importlib.import_module(spec.module), spec.attribute)


def check_optimizer(name: str, device: torch.device, args_text: str = "") -> None:
    """Refuse at submit an optimizer this machine cannot run, or arguments it does not take (naming the fix)."""
    spec = SPECS[name]
    if spec.cuda_only and device.type != "cuda":
        raise ConfigError(
            f"{FIELD} {name!r} needs a CUDA GPU, but the model is on {device.type}; use 'adafactor' (almost no "
            "optimizer memory) or 'adamw'",
            field=FIELD,
        )
    top = spec.module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        how = (
            f"tick {name} in Settings -> Trainer -> optional optimizer packages and restart the WebUI, or install it "
            f"in the WebUI's Python (python -m pip install {spec.package})"
            if spec.package
            else f"install {top}"
        )
        raise ConfigError(
            f"{FIELD} {name!r} needs the {spec.package or top} package, which is not installed; {how}; or use "
            "'adamw' / 'adafactor'",
            field=FIELD,
        )
    args = parse_optimizer_args(args_text)
    accepted = set(inspect.signature(_optimizer_class(name).__init__).parameters) - FIXED
    unknown = sorted(set(args) - accepted)
    if unknown:
        raise ConfigError(
            f"{FIELD_ARGS}: {', '.join(unknown)} is not an argument of {spec.qualified}; it takes "
            f"{', '.join(sorted(accepted))}",
            field=FIELD_ARGS,
        )


def uses_own_rate(name: str, args: dict[str, Any]) -> bool:
    """True when the optimizer decides its learning rate itself (Adafactor's relative step)."""
    return name == "adafactor" and bool(args.get("relative_step"))


def build_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    weight_decay: float,
    args: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> torch.optim.Optimizer:
    """The optimizer over ``groups`` (each ``{"params": [...]}``); learning rates are set by the loop every step.
    ``args`` (from ``optimizer_args``) override the defaults."""
    args = args or {}
    options: dict[str, Any] = {"weight_decay": weight_decay, **dict(SPECS[name].defaults)}
    if name == "adamw" and device is not None and device.type == "cuda":
        options["fused"] = True
    options.update(args)
    if uses_own_rate(name, options):
        return _optimizer_class(name)([{"params": g["params"]} for g in groups], lr=None, **options)
    params = [{"params": g["params"]} for g in groups]
    return _optimizer_class(name)(params, lr=PLACEHOLDER_RATE, **options)


@dataclass
class OptimizerMode:
    """Schedule-free optimizers keep the weights at a training point during steps and at their average otherwise:
    ``train()`` before steps, ``evaluate()`` before anything reads the weights (saving, previews). A no-op for
    every other optimizer."""

    optimizer: torch.optim.Optimizer

    def train(self) -> None:
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()

    def evaluate(self) -> None:
        if hasattr(self.optimizer, "eval") and callable(self.optimizer.eval):
            self.optimizer.eval()
