"""Text-encoder outputs computed once before training, when they cannot change during the run.

That holds when the text encoder does not train (a UNet-only LoRA or DreamBooth, a hypernetwork, which acts on the
UNet's attention inputs) and captions do not vary (no tag shuffling or drop-out): every prompt a sample can get is
known beforehand, one per template line (with SDXL, with each image's size conditioning, also mirrored). Each is
encoded alone; a batch is put together from them as the text encoder would have encoded it: prompts shorter than
the longest one are filled up with the encoding of an empty chunk, which is what the WebUI's chunking gives in a
batch. The text encoder is then idle during training and may leave the GPU (``train.offload_idle_models``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from lib_trainer.data.dataset import PromptMaker, Sample
from lib_trainer.loop.precision import autocast
from lib_trainer.models.parts import ModelParts, Prompts, SizeCondition

Key = tuple[str, SizeCondition | None]


class CachedConditions:
    """``(parts, prompts) -> conditioning`` from a table filled before training; a prompt missing from it (none
    should be) is encoded by ``live``."""

    def __init__(self, parts: ModelParts, keys: Iterable[Key], precision: str):
        self.parts, self.precision = parts, precision
        self.table: dict[Key, Any] = {}
        self.live: Callable[[Callable[[], Any]], Any] = lambda encode: encode()
        for key in dict.fromkeys(keys):
            self.table[key] = _to_cpu(self._encode([key]))
        self.empty = _to_cpu(self._encode([("", next(iter(self.table))[1] if self.table else None)]))

    @classmethod
    def build(
        cls, parts: ModelParts, samples: list[Sample], prompts: PromptMaker, flip: bool, precision: str
    ) -> CachedConditions | None:
        """The cache for every prompt the samples can get, or None when captions vary."""
        if prompts.varies:
            return None
        keys = []
        for sample in samples:
            sizes = [sample.size_condition(m) for m in ((False, True) if flip else (False,))]
            for text in prompts.variants(sample):
                keys += [(text, size if parts.size_conditioned else None) for size in sizes]
        return cls(parts, keys, precision)

    def _encode(self, keys: list[Key]) -> Any:
        sizes = [size for _, size in keys]
        prompts = Prompts([text for text, _ in keys], sizes if all(sizes) else None)
        with torch.no_grad(), autocast(self.parts.device, self.precision):
            return self.parts.condition(prompts)

    def __call__(self, parts: ModelParts, prompts: list[str]) -> Any:
        sizes = getattr(prompts, "sizes", None) if parts.size_conditioned else None
        keys = [(text, sizes[i] if sizes else None) for i, text in enumerate(prompts)]
        for key in keys:
            if key not in self.table:
                self.table[key] = _to_cpu(self.live(lambda k=key: self._encode([k])))
        return _batch([self.table[k] for k in keys], self.empty, parts.device)


def _to_cpu(cond: Any) -> Any:
    if isinstance(cond, dict):
        return {k: v.detach().cpu() for k, v in cond.items()}
    return cond.detach().cpu()


def _batch(conds: list[Any], empty: Any, device: torch.device) -> Any:
    """One batch from single-prompt conditionings; token sequences padded with empty chunks to the longest."""
    if isinstance(conds[0], dict):
        return {k: _cat([c[k] for c in conds], empty[k], device) for k in conds[0]}
    return _cat(conds, empty, device)


def _cat(tensors: list[torch.Tensor], empty: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensors[0].dim() == 3:
        longest = max(t.shape[1] for t in tensors)
        chunk = empty.shape[1]
        tensors = [torch.cat([t, *[empty] * ((longest - t.shape[1]) // chunk)], dim=1) for t in tensors]
    return torch.cat(tensors).to(device, non_blocking=True)
