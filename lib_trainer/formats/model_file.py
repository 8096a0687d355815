"""Full model checkpoints: ``.safetensors`` in the LDM key layout the WebUI, ComfyUI and kohya load.

The keys are the model's ``state_dict`` paths with the WebUI's hijack wrappers removed: it wraps the text
encoder (``cond_stage_model.wrapped.transformer...``; SDXL ``conditioner.embedders.0.wrapped.transformer...``)
and the token embedding (``...token_embedding.wrapped.weight``), while a checkpoint file has
``cond_stage_model.transformer...`` and ``...token_embedding.weight``. When the loaded checkpoint's own key set is
known, exactly those keys are written (and a key that cannot be produced is refused), so the new file has the
same layout as the one the user loaded. Written atomically after a free-space check, values checked to be finite
after the cast to the save precision (docs/formats.md section 8).
"""

from __future__ import annotations

import shutil
from collections.abc import Collection
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from lib_trainer.errors import FormatError
from lib_trainer.formats.files import finite_for_saving, safetensors_keys, write_atomic

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
WRAPPER = "wrapped"  # the WebUI's hijack modules keep the original module under this attribute
SPACE_FACTOR, SPACE_EXTRA = 1.05, 64 * 2**20  # room beyond the payload: the header and the file system


def checkpoint_key(path: str) -> str:
    """A ``state_dict`` path as a checkpoint file names it (the hijack wrappers' ``wrapped`` segments removed)."""
    return ".".join(part for part in path.split(".") if part != WRAPPER)


def checkpoint_tensors(model: nn.Module, keys: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under checkpoint keys; with ``keys`` (the loaded file's), exactly those keys."""
    tensors: dict[str, torch.Tensor] = {}
    for path, value in model.state_dict(keep_vars=False).items():
        tensors.setdefault(checkpoint_key(path), value)
    if keys is None:
        return tensors
    missing = sorted(set(keys) - set(tensors))
    if missing:
        raise FormatError(
            f"the loaded model has no tensor for {len(missing)} key(s) of its checkpoint file (e.g. {missing[:3]}); "
            "a checkpoint written from it would not have the file's layout. Reload the checkpoint in the WebUI "
            "and train again"
        )
    return {key: tensors[key] for key in keys}


def estimated_size(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes a checkpoint of ``model`` takes with floating tensors in ``dtype`` (shared tensors counted once)."""
    seen, total = set(), 0
    for value in model.state_dict().values():
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        total += value.numel() * (dtype.itemsize if value.is_floating_point() else value.element_size())
    return total


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], precision: str) -> Path:
    """Write a full checkpoint atomically: floating tensors cast to ``precision``, all checked finite, after making
    sure the folder has room for the whole file (a 2-7 GB write must not fail half-way)."""
    dtype = DTYPES[precision]
    needed = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size()) for t in tensors.values())
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed * SPACE_FACTOR + SPACE_EXTRA:
        raise FormatError(
            f"{folder} has {free / 2**30:.2f} GiB free but the checkpoint needs {needed / 2**30:.2f} GiB; free some "
            "space or choose another save precision (fp16/bf16 halve the size); nothing was written",
            field="save_precision",
        )
    fix = "Set the save precision to 'bf16' or 'fp32'" if precision == "fp16" else "Lower the learning rate"
    cast = finite_for_saving(tensors, dtype, f"checkpoint {Path(path).stem}", fix, "save_precision")
    meta = {k: str(v) for k, v in metadata.items()}

    def write(tmp: Path) -> None:
        safetensors.torch.save_file(cast, str(tmp), metadata=meta)
        if safetensors_keys(tmp) != set(cast):  # read back before it replaces anything: the header is complete
            raise FormatError(
                f"checkpoint {Path(path).stem}: the written file does not hold every tensor; nothing "
                "was replaced. Check the disk and train again"
            )

    return write_atomic(Path(path), write)


def copy_model_config(source_checkpoint: str | None, written: Path) -> None:
    """The ``.yaml`` beside the loaded checkpoint (SD2-v and other configs the WebUI reads there), copied beside a
    checkpoint written from it, so the new file loads with the same config."""
    if not source_checkpoint:
        return
    source = Path(source_checkpoint).with_suffix(".yaml")
    if source.is_file():
        write_atomic(Path(written).with_suffix(".yaml"), lambda tmp: shutil.copyfile(source, tmp))
