"""Aspect-ratio buckets (as in kohya sd-scripts / NovelAI): sizes of about the training area, sides a multiple
of ``step``, and each image assigned to the bucket nearest its aspect ratio. A single fixed size is the case
``enabled=False``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BucketSpec:
    """How buckets are made: the target area (width x height), side limits, step, and no-upscale."""

    width: int
    height: int
    min_side: int = 256
    max_side: int = 1024
    step: int = 64
    no_upscale: bool = False

    @property
    def area(self) -> int:
        """The pixel budget every bucket stays within."""
        return self.width * self.height


def make_buckets(spec: BucketSpec) -> list[tuple[int, int]]:
    """Every (w, h) with sides in [min_side, max_side], multiples of ``step``, the largest h for each w within
    the area; sorted by aspect ratio."""
    buckets = set()
    first = -(-spec.min_side // spec.step) * spec.step  # the smallest multiple of step >= min_side
    for w in range(first, spec.max_side + 1, spec.step):
        h = min(spec.max_side, (spec.area // w) // spec.step * spec.step)
        if h >= spec.min_side:
            buckets.add((w, h))
            buckets.add((h, w))
    buckets = {(w, h) for w, h in buckets if w * h <= spec.area and spec.min_side <= min(w, h)}
    if not buckets:  # the area is too small for min_side: the training size itself is the only bucket
        return [
            (max(spec.step, spec.width // spec.step * spec.step), max(spec.step, spec.height // spec.step * spec.step))
        ]
    return sorted(buckets, key=lambda b: b[0] / b[1])


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]], spec: BucketSpec) -> tuple[int, int]:
    """The bucket for an image of ``size``: nearest aspect ratio (log distance); with ``no_upscale`` a smaller
    image gets its own size rounded down to the step (never enlarged)."""
    width, height = size
    if spec.no_upscale and width * height < spec.area:
        scale = 1.0
        w = max(spec.step, int(width * scale) // spec.step * spec.step)
        h = max(spec.step, int(height * scale) // spec.step * spec.step)
        return w, h
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
