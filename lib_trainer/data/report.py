"""What the dataset holds, before training: counts, repeats, buckets, tags, caption lengths, problem files.

The same numbers go into LoRA metadata (``ss_dataset_dirs``, ``ss_tag_frequency``, ``ss_bucket_info``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib_trainer.config import DataConfig
from lib_trainer.data.captions import split_tags
from lib_trainer.data.dataset import Sample, scan_folder

MAX_TOKENS = 75  # one prompt chunk; longer captions spill into a second chunk


def _folder_name(sample: Sample, root: Path) -> str:
    parent = sample.path.parent
    return root.name if parent == root else parent.name


def folder_stats(samples: list[Sample], data_dir: str) -> dict[str, dict[str, int]]:
    """``{folder: {"n_repeats": r, "img_count": n}}`` in kohya's ``ss_dataset_dirs`` form."""
    root = Path(data_dir).expanduser()
    stats: dict[str, dict[str, int]] = {}
    for sample in samples:
        entry = stats.setdefault(_folder_name(sample, root), {"n_repeats": sample.repeats, "img_count": 0})
        entry["img_count"] += 1
    return stats


def tag_frequency(samples: list[Sample], data_dir: str) -> dict[str, dict[str, int]]:
    """``{folder: {tag: count}}`` over the captions (folder class tokens where there is no caption)."""
    root = Path(data_dir).expanduser()
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for sample in samples:
        caption = sample.caption if sample.caption is not None else sample.folder_caption or ""
        counts[_folder_name(sample, root)].update(split_tags(caption))
    return {folder: dict(counter.most_common()) for folder, counter in counts.items()}


def bucket_histogram(samples: list[Sample]) -> dict[str, int]:
    """``{"WxH": images}``, largest first."""
    counts = collections.Counter(f"{s.size[0]}x{s.size[1]}" for s in samples)
    return dict(counts.most_common())


def bucket_info(samples: list[Sample]) -> dict[str, Any]:
    """kohya's ``ss_bucket_info``: ``{"buckets": {"0": {"resolution": [w, h], "count": n}}, ...}``."""
    counts = collections.Counter(s.size for s in samples)
    buckets = {str(i): {"resolution": list(size), "count": n} for i, (size, n) in enumerate(sorted(counts.items()))}
    return {"buckets": buckets, "mean_img_ar_error": 0.0}


def dataset_report(config: DataConfig, count_tokens: Callable[[str], int] | None = None) -> dict[str, Any]:
    """Everything the tab shows before training; never raises for bad files, it lists them."""
    scan = scan_folder(config)
    samples = scan.samples
    report: dict[str, Any] = {
        "images": len(samples),
        "images_with_repeats": sum(s.repeats for s in samples),
        "folders": folder_stats(samples, config.data_dir),
        "buckets": bucket_histogram(samples),
        "tag_frequency": tag_frequency(samples, config.data_dir),
        "missing_captions": [s.path.name for s in samples if s.caption is None and s.folder_caption is None],
        "too_small": [{"file": p.name, "size": list(size)} for p, size in scan.small],
        "unreadable": [{"file": p.name, "reason": reason} for p, reason in scan.problems],
        "over_length_captions": [],
    }
    if count_tokens is not None:
        for sample in samples:
            tokens = count_tokens(sample.caption or "")
            if tokens > MAX_TOKENS:
                report["over_length_captions"].append({"file": sample.path.name, "tokens": tokens})
    return report
