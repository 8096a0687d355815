"""Captions: reading ``<image stem><ext>`` files, the filename fallback, tag shuffle and tag drop-out."""

from __future__ import annotations

import random
import re
from pathlib import Path

_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")


def read_caption(image_path: Path, extension: str) -> str | None:
    """First line of the caption file beside ``image_path`` (None when there is none).

    Raises UnicodeDecodeError / OSError for unreadable files; the scanner reports those.
    """
    path = image_path.with_suffix(extension)
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8-sig")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def caption_from_filename(image_path: Path) -> str:
    """The WebUI's fallback caption: the file stem without leading numbers."""
    return _LEADING_NUMBERS.sub("", image_path.stem).replace("_", " ").strip()


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def augment_tags(caption: str, rng: random.Random, shuffle: bool, keep: int, dropout: float) -> str:
    """Shuffle and/or drop tags after the first ``keep`` ones, which stay in place."""
    if not shuffle and dropout <= 0:
        return caption
    tags = split_tags(caption)
    head, tail = tags[:keep], tags[keep:]
    if dropout > 0:
        tail = [tag for tag in tail if rng.random() >= dropout]
    if shuffle:
        rng.shuffle(tail)
    return ", ".join(head + tail)
