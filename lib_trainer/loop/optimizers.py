"""The optimizers a run can use, built from ``TrainConfig.optimizer``; optional packages imported only when chosen.

- ``adamw``: torch's AdamW (fused/foreach kernels where torch picks them).
- ``adamw8bit``: bitsandbytes' AdamW8bit (Dettmers et al. 2022): optimizer state in 8 bits, a quarter of AdamW's
  memory. CUDA only; bitsandbytes is optional (never installed by default).
- ``adafactor``: transformers' Adafactor (Shazeer & Stern 2018) at the run's learning rate (relative step and
  parameter scaling off, as kohya's fine-tuning recommends): factored second moments, no first moment, so almost no
  optimizer memory. transformers comes with the WebUI (its CLIP), so this is the torch-only fallback.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from lib_trainer.errors import ConfigError

NAMES = {
    "adamw": "torch.optim.AdamW",
    "adamw8bit": "bitsandbytes.optim.AdamW8bit",
    "adafactor": "transformers.optimization.Adafactor",
}


def check_optimizer(name: str, device: torch.device) -> None:
    """Refuse at submit an optimizer this machine cannot run (naming the fix)."""
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


def build_optimizer(name: str, groups: list[dict[str, Any]], weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer over ``groups`` (each ``{"params": [...]}``); learning rates are set by the loop every step."""
    params = [{"params": g["params"], "lr": 0.0} for g in groups]
    if name == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=0.0, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=0.0, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=weight_decay
        )
    return torch.optim.AdamW(params, lr=0.0, weight_decay=weight_decay)
