"""Make the pinned CPU test stack importable: torchvision's operator schemas and offline flags.

torchvision from the registry is a CUDA build; with CPU torch its import fails on the missing
``torchvision::nms`` operator. ldm and open_clip import torchvision, so the schemas are defined
before the first import (compiled ops stay unavailable, which training never needs).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

_prepared = False


def prepare_stack(threads: int = 2) -> None:
    """Define torchvision's operator schemas if needed, set offline mode and torch threads."""
    global _prepared
    if _prepared:
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(threads)
    if _torchvision_needs_schemas():
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        prepare_stack._lib = lib  # keep the library object alive
    _prepared = True


def _torchvision_needs_schemas() -> bool:
    """True when an installed CUDA torchvision would fail to import on this CPU-only torch."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None or torch.version.cuda is not None:
        return False
    version_file = Path(spec.origin).parent / "version.py"
    text = version_file.read_text() if version_file.exists() else ""
    return "+cu" in text
