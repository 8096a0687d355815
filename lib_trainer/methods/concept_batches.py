"""Batches for several concepts with prior preservation: each instance image paired with a class image.

Instance images of every concept are batched together (per bucket, shuffled: batches mix concepts); each one
brings a class image of its own concept in the same bucket, so every batch holds both halves of the DreamBooth
objective (Ruiz et al. 2023) and one forward computes them. Class images cycle in a reshuffled order, so all of
them are used before any repeats.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lib_trainer.data.dataset import LatentCache, PromptMaker, Sample, TrainingBatches, epoch_batches


class ConceptBatches(TrainingBatches):
    """``TrainingBatches`` over instance samples (first in ``samples``), each batch extended by class samples."""

    def __init__(
        self,
        samples: list[Sample],
        cache: LatentCache,
        prompts: PromptMaker,
        batch_size: int,
        seed: int,
        concept_of: list[int],
        warn: Callable[[str], None],
    ):
        super().__init__(samples, cache, prompts, batch_size, seed)
        self.concept_of = concept_of  # concept index of every sample
        self.instance_count = sum(1 for s in samples if not s.is_reg)
        self.pools: dict[tuple[int, tuple[int, int]], list[int]] = {}
        for i, sample in enumerate(samples):
            if sample.is_reg:
                self.pools.setdefault((concept_of[i], sample.size), []).append(i)
        self.order: dict[tuple[int, tuple[int, int]], list[int]] = {}
        self._warn_unpaired(warn)

    @classmethod
    def factory(cls, concepts: list[tuple[list[Sample], list[Sample]]], warn: Callable[[str], None]):
        """A builder with ``TrainingBatches``' arguments for ``samples`` = all instance samples, then all class
        samples (the order ``train_dreambooth`` passes them in)."""
        concept_of = [c for c, (inst, _) in enumerate(concepts) for _ in inst]
        concept_of += [c for c, (_, classes) in enumerate(concepts) for _ in classes]

        def build(samples, cache, prompts, batch_size, seed):
            return cls(samples, cache, prompts, batch_size, seed, concept_of, warn)

        return build

    def _warn_unpaired(self, warn: Callable[[str], None]) -> None:
        with_prior = {c for c, _ in self.pools}
        sizes = {(self.concept_of[i], s.size) for i, s in enumerate(self.samples[: self.instance_count])}
        lonely = sorted((c, size) for c, size in sizes if c in with_prior and (c, size) not in self.pools)
        if lonely:
            listed = ", ".join(f"concept {c + 1} at {w}x{h}" for c, (w, h) in lonely[:5])
            warn(
                f"no class images in the bucket of some instance images ({listed}); those batches train without "
                "prior preservation. Turn off data.buckets or add class images of those shapes"
            )

    def next_indices(self) -> list[int]:
        """Instance indices of one bucket, then one class index of the same concept and bucket for each."""
        if not self.queue:
            self.queue = epoch_batches(self.samples[: self.instance_count], self.batch_size, self.rng)
        instance = self.queue.pop(0)
        paired = []
        for i in instance:
            key = (self.concept_of[i], self.samples[i].size)
            if key in self.pools:
                paired.append(self._next_class(key))
        return instance + paired

    def _next_class(self, key: tuple[int, tuple[int, int]]) -> int:
        order = self.order.get(key)
        if not order:
            order = list(self.pools[key])
            self.rng.shuffle(order)
            self.order[key] = order
        return order.pop()

    def assemble(self, indices: list[int]) -> tuple:
        """(latents, prompts, extras): class samples flagged as ``prior`` with their concept's weight."""
        latents, prompts, samples, mirrored = self.pieces(indices)
        extras: dict[str, Any] = {}
        if any(s.is_reg for s in samples):
            extras["prior"] = torch.tensor([s.is_reg for s in samples])
            extras["weights"] = torch.tensor([s.loss_weight for s in samples])
        if self.prompts.config.alpha_mask:
            extras["mask"] = self.masks(samples, mirrored, latents.shape[2:])
        return (latents, prompts, extras) if extras else (latents, prompts)

    def rng_state(self) -> dict[str, Any]:
        """The base state plus where each class pool's order stands."""
        return {**super().rng_state(), "class_order": {f"{c}:{w}x{h}": v for (c, (w, h)), v in self.order.items()}}
