"""The training set: scanned images with captions, prompts from templates, cached latents, batches."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lib_trainer.config import DataConfig
from lib_trainer.data.captions import augment_tags, caption_from_filename, read_caption
from lib_trainer.data.images import IMAGE_EXTENSIONS, load_rgb, resize_crop, to_tensor
from lib_trainer.data.templates import fill_template, load_template, uses_filewords
from lib_trainer.errors import DatasetError
from lib_trainer.models.parts import LatentEncoder

ENCODE_BATCH = 4


@dataclass
class Sample:
    """One training image: its file, caption (None when it has no caption file) and pixels in [-1, 1]."""

    path: Path
    caption: str | None
    pixels: torch.Tensor


@dataclass
class ScanResult:
    """Images that loaded, and the files that did not with the reason."""

    samples: list[Sample] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)


def scan_folder(config: DataConfig) -> ScanResult:
    """Load every image in ``config.data_dir`` (not recursive) with its caption; record unreadable files."""
    folder = Path(config.data_dir).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"data.data_dir {str(folder)!r} is not an existing folder; give the folder of your images")
    result = ScanResult()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        try:
            pixels = to_tensor(resize_crop(load_rgb(path), config.width, config.height))
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for corrupt and non-image files
            result.problems.append((path, f"cannot be read as an image ({exc})"))
            continue
        try:
            caption = read_caption(path, config.caption_extension)
        except (OSError, UnicodeDecodeError) as exc:
            result.problems.append((path.with_suffix(config.caption_extension), f"caption is not UTF-8 text ({exc})"))
            continue
        result.samples.append(Sample(path, caption, pixels))
    return result


def load_training_set(config: DataConfig) -> tuple[list[Sample], list[str]]:
    """Scan and validate the folder and template for training; raise DatasetError listing every problem."""
    template = load_template(config.template)
    scan = scan_folder(config)
    if scan.problems:
        listed = "; ".join(f"{p.name}: {reason}" for p, reason in scan.problems[:10])
        more = f" (and {len(scan.problems) - 10} more)" if len(scan.problems) > 10 else ""
        raise DatasetError(
            f"{len(scan.problems)} file(s) in {config.data_dir!r} cannot be used: {listed}{more}; fix or remove them"
        )
    if not scan.samples:
        raise DatasetError(
            f"no images found in {config.data_dir!r}; put .jpg, .jpeg, .png, .webp or .bmp files in that folder"
        )
    missing = [s.path.name for s in scan.samples if s.caption is None]
    if missing and uses_filewords(template) and config.missing_caption == "error":
        listed = ", ".join(missing[:10]) + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
        raise DatasetError(
            f"{len(missing)} image(s) have no caption file ({config.caption_extension}) but template "
            f"{config.template!r} uses [filewords]: {listed}; add the caption files, set data.missing_caption "
            "to 'filename' or 'empty', or choose a template without [filewords]"
        )
    return scan.samples, template


class PromptMaker:
    """Makes a prompt for a sample: a random template line with [name] and the (augmented) caption."""

    def __init__(self, template: list[str], name: str, config: DataConfig, rng: random.Random):
        self.template, self.name, self.config, self.rng = template, name, config, rng

    def prompt(self, sample: Sample) -> str:
        """A prompt for ``sample``; the caption falls back per ``missing_caption``."""
        caption = sample.caption
        if caption is None:
            caption = caption_from_filename(sample.path) if self.config.missing_caption == "filename" else ""
        cfg = self.config
        caption = augment_tags(caption, self.rng, cfg.shuffle_tags, cfg.keep_tags, cfg.tag_dropout)
        return fill_template(self.rng.choice(self.template), self.name, caption)


class LatentCache:
    """VAE latents of every sample, encoded once; ``random`` sampling keeps mean and std and redraws."""

    def __init__(self, samples: list[Sample], encoder: LatentEncoder, method: str, generator: torch.Generator):
        self.method = method
        self.scale = encoder.scale_factor
        means, stds = [], []
        for start in range(0, len(samples), ENCODE_BATCH):
            pixels = torch.stack([s.pixels for s in samples[start : start + ENCODE_BATCH]])
            mean, std = encoder.encode(pixels)
            means.append(mean.cpu())
            stds.append(std.cpu())
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        if method == "once":
            self.mean = self.mean + self.std * torch.randn(self.mean.shape, generator=generator)
        if method != "random":
            self.std = torch.zeros(0)

    def latents(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        """Scaled latents ``[B, 4, h, w]`` for ``indices`` (a fresh draw per call for ``random``)."""
        mean = self.mean[indices]
        if self.method == "random":
            mean = mean + self.std[indices] * torch.randn(mean.shape, generator=generator)
        return mean * self.scale


class TrainingBatches:
    """Endless batches (latents, prompts): each epoch a fresh permutation; resumable random state."""

    def __init__(self, samples: list[Sample], cache: LatentCache, prompts: PromptMaker, batch_size: int, seed: int):
        self.samples, self.cache, self.prompts, self.batch_size = samples, cache, prompts, batch_size
        self.rng = random.Random(seed)
        self.prompts.rng = self.rng
        self.latent_generator = torch.Generator().manual_seed(seed)
        self.queue: list[int] = []

    def next_batch(self) -> tuple[torch.Tensor, list[str]]:
        """The next batch: scaled latents ``[B, 4, h, w]`` (CPU) and one prompt per image."""
        while len(self.queue) < self.batch_size:
            order = list(range(len(self.samples)))
            self.rng.shuffle(order)
            self.queue += order
        indices, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size :]
        prompts = [self.prompts.prompt(self.samples[i]) for i in indices]
        return self.cache.latents(indices, self.latent_generator), prompts

    def rng_state(self) -> dict[str, Any]:
        """Random state for a resume sidecar (JSON values and tensors)."""
        version, internal, gauss = self.rng.getstate()
        return {
            "python": [version, list(internal), gauss],
            "queue": list(self.queue),
            "latent": self.latent_generator.get_state(),
        }

    def set_rng_state(self, state: dict[str, Any]) -> None:
        """Restore what ``rng_state`` returned."""
        if "python" in state:
            version, internal, gauss = state["python"]
            self.rng.setstate((version, tuple(internal), gauss))
        self.queue = list(state.get("queue", []))
        if "latent" in state:
            self.latent_generator.set_state(state["latent"])
