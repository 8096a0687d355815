"""The training set: scanned images with captions, prompts from templates, cached latents, batches."""

from __future__ import annotations

import errno
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lib_trainer.config import DataConfig
from lib_trainer.data.buckets import BucketSpec, assign_bucket, make_buckets
from lib_trainer.data.captions import augment_tags, caption_from_filename, read_caption
from lib_trainer.data.images import (
    IMAGE_EXTENSIONS,
    cover_crop,
    load_alpha,
    load_rgb,
    mask_tensor,
    resize_crop,
    to_tensor,
)
from lib_trainer.data.latent_store import LatentStore
from lib_trainer.data.templates import fill_template, load_template, uses_filewords
from lib_trainer.errors import DatasetError
from lib_trainer.models.parts import LatentEncoder, Prompts, SizeCondition

ENCODE_BATCH = 4


REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya: "<repeats>_<class tokens>"


@dataclass
class Sample:
    """One training image: file, caption (None without a caption file), pixels in [-1, 1] at its bucket size,
    how often it is repeated per epoch, and the class tokens of its kohya folder (the caption fallback)."""

    path: Path
    caption: str | None
    pixels: torch.Tensor
    repeats: int = 1
    folder_caption: str | None = None
    mask: torch.Tensor | None = None  # [1, h/8, w/8] from the alpha channel (data.alpha_mask)
    loss_weight: float = 1.0
    is_reg: bool = False  # a regularisation (class) image: captioned as is, no template or trigger
    original_size: tuple[int, int] | None = None  # (width, height) of the image file (None: the bucket's)
    template: list[str] | None = None  # this sample's own prompt lines (a DreamBooth concept's instance prompt)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the prepared pixels: the bucket."""
        return int(self.pixels.shape[2]), int(self.pixels.shape[1])

    def size_condition(self, mirrored: bool = False) -> SizeCondition:
        """The image's SDXL size conditioning: original size, where the centre crop starts, the bucket (for a
        mirrored copy the crop's left edge is measured from the other side)."""
        width, height = self.size
        original = self.original_size or (width, height)
        resized, left, top = cover_crop(original, width, height)
        if mirrored:
            left = resized[0] - width - left
        return SizeCondition((original[1], original[0]), (top, left), (height, width))


@dataclass
class ScanResult:
    """Images that loaded, and the files that did not with the reason."""

    samples: list[Sample] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)
    small: list[tuple[Path, tuple[int, int]]] = field(default_factory=list)  # smaller than their bucket


def image_folders(
    config: DataConfig, folder: str | None = None, field: str | None = None
) -> list[tuple[Path, int, str | None]]:
    """(folder, repeats, class tokens): the data folder itself, then kohya ``N_name`` subfolders. ``field`` names
    the setting in errors (default ``data.data_dir``, or ``data.reg_dir`` for ``folder``)."""
    field = field or ("data.data_dir" if folder is None else "data.reg_dir")
    root = Path(folder if folder is not None else config.data_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"{field} {str(root)!r} is not an existing folder; give the folder of your images", field=field
        )
    folders: list[tuple[Path, int, str | None]] = [(root, 1, None)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        match = REPEAT_FOLDER.match(sub.name)
        if match:
            folders.append((sub, int(match.group(1)), match.group(2).replace("_", " ")))
    return folders


def bucket_spec(config: DataConfig) -> BucketSpec:
    """The bucket settings of a data config."""
    return BucketSpec(
        config.width,
        config.height,
        config.bucket_min_side,
        config.bucket_max_side,
        config.bucket_step,
        config.bucket_no_upscale,
    )


def _sources(
    config: DataConfig, data_field: str | None = None
) -> list[tuple[list[tuple[Path, int, str | None]], bool]]:
    sources = [(image_folders(config, field=data_field), False)]
    if config.reg_dir.strip():
        sources.append((image_folders(config, config.reg_dir), True))
    return sources


def folder_entries(folder: Path, problems: list[tuple[Path, str]]) -> list[Path]:
    """The visible image files of ``folder``, sorted; broken links and link loops go to ``problems``."""
    images = []
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        broken = broken_link(path)
        if broken:
            problems.append((path, broken))
        elif path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
    return images


def broken_link(path: Path) -> str:
    """Why a symbolic link cannot be followed ("" for anything else)."""
    if not path.is_symlink():
        return ""
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop (it leads back to itself); remove or fix the link"
        return f"is a broken symbolic link to {str(path.readlink())!r}, which does not exist; remove or fix the link"
    return ""


def scan_folder(config: DataConfig) -> ScanResult:
    """Load every image of the data folder and its ``N_name`` subfolders with captions; record what fails."""
    spec = bucket_spec(config)
    buckets = make_buckets(spec) if config.buckets else [(config.width, config.height)]
    result = ScanResult()
    for folders, is_reg in _sources(config):
        for folder, repeats, folder_caption in folders:
            for path in folder_entries(folder, result.problems):
                _load_sample(path, config, spec, buckets, (repeats, folder_caption, is_reg), result)
    return result


def check_image_folders(config: DataConfig, data_field: str = "data.data_dir") -> None:
    """Before a run is queued: the data (and regularisation) folder exists and holds at least one readable image.

    Only file headers are read; problems with single files are left for the dataset report and the run's warnings.
    ``data_field`` names the data folder's setting in errors (a DreamBooth concept's ``concepts.N.instance_dir``).
    """
    for folders, is_reg in _sources(config, data_field):
        field, root = ("data.reg_dir", config.reg_dir) if is_reg else (data_field, config.data_dir)
        images = [path for folder, _, _ in folders for path in folder_entries(folder, [])]
        if not images:
            raise DatasetError(
                f"{field} {root!r} holds no images; put .jpg, .jpeg, .png, .webp or .bmp files in it (or in kohya "
                "'N_name' subfolders)",
                field=field,
            )
        reasons = []
        for path in images:
            try:
                with Image.open(path):
                    break
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                reasons.append(f"{path.name}: {exc}")
        else:
            raise DatasetError(
                f"{field} {root!r}: none of its {len(images)} image file(s) can be read as an image "
                f"({'; '.join(reasons[:3])}); replace them with real images",
                field=field,
            )


def _load_sample(
    path: Path,
    config: DataConfig,
    spec: BucketSpec,
    buckets: list[tuple[int, int]],
    folder: tuple[int, str | None, bool],  # repeats, class tokens, regularisation folder
    result: ScanResult,
) -> None:
    try:
        image = load_rgb(path)
        size = assign_bucket(image.size, buckets, spec) if config.buckets else buckets[0]
        pixels = to_tensor(resize_crop(image, *size))
        alpha = load_alpha(path) if config.alpha_mask else None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # corrupt / non-image files
        result.problems.append((path, f"cannot be read as an image ({exc})"))
        return
    try:
        caption = read_caption(path, config.caption_extension)
    except (OSError, UnicodeDecodeError) as exc:
        result.problems.append((path.with_suffix(config.caption_extension), f"caption is not UTF-8 text ({exc})"))
        return
    if image.size[0] < size[0] or image.size[1] < size[1]:
        result.small.append((path, image.size))
    mask = mask_tensor(alpha, *size) if alpha is not None else None
    repeats, folder_caption, is_reg = folder
    weight = config.prior_loss_weight if is_reg else 1.0
    result.samples.append(Sample(path, caption, pixels, repeats, folder_caption, mask, weight, is_reg, image.size))


def load_training_set(config: DataConfig, warn: Callable[[str], None] | None = None) -> tuple[list[Sample], list[str]]:
    """Scan the folder and read the template for training.

    Files that cannot be used are skipped and reported through ``warn`` (one message listing them); no usable
    image at all, or missing captions the template needs, raise DatasetError.
    """
    template = load_template(config.template)
    scan = scan_folder(config)
    if scan.problems and warn is not None:
        listed = "; ".join(f"{p.name}: {reason}" for p, reason in scan.problems[:10])
        more = f" (and {len(scan.problems) - 10} more)" if len(scan.problems) > 10 else ""
        warn(f"{len(scan.problems)} file(s) in {config.data_dir!r} were skipped: {listed}{more}")
    if not scan.samples:
        found = f"; skipped: {scan.problems[0][0].name}: {scan.problems[0][1]}" if scan.problems else ""
        raise DatasetError(
            f"no usable images found in {config.data_dir!r}{found}; put .jpg, .jpeg, .png, .webp or .bmp files "
            "in that folder",
            field="data.data_dir",
        )
    missing = [s.path.name for s in scan.samples if s.caption is None and s.folder_caption is None and not s.is_reg]
    if missing and uses_filewords(template) and config.missing_caption == "error":
        listed = ", ".join(missing[:10]) + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
        raise DatasetError(
            f"{len(missing)} image(s) have no caption file ({config.caption_extension}) but template "
            f"{config.template!r} uses [filewords]: {listed}; add the caption files, set data.missing_caption "
            "to 'filename' or 'empty', or choose a template without [filewords]",
            field="data.missing_caption",
        )
    return scan.samples, template


class PromptMaker:
    """Makes a prompt for a sample: a random template line with [name] and the (augmented) caption."""

    def __init__(self, template: list[str], name: str, config: DataConfig, rng: random.Random):
        self.template, self.name, self.config, self.rng = template, name, config, rng

    def prompt(self, sample: Sample) -> str:
        """A prompt for ``sample``; the caption falls back per ``missing_caption``."""
        if sample.is_reg:  # class images keep their own caption (kohya): no template, no trigger word
            return self._reg_prompt(sample)
        return fill_template(self.rng.choice(sample.template or self.template), self.name, self._caption(sample, True))

    @property
    def varies(self) -> bool:
        """True when captions change between epochs (tag shuffling, tag or caption drop-out)."""
        cfg = self.config
        return bool(cfg.shuffle_tags or cfg.tag_dropout or cfg.caption_dropout)

    def variants(self, sample: Sample) -> list[str]:
        """Every prompt ``prompt`` can give ``sample`` when captions do not vary (one per template line)."""
        if sample.is_reg:
            return [self._reg_prompt(sample)]
        caption = self._caption(sample, False)
        return list(dict.fromkeys(fill_template(line, self.name, caption) for line in sample.template or self.template))

    @staticmethod
    def _reg_prompt(sample: Sample) -> str:
        return sample.caption or sample.folder_caption or caption_from_filename(sample.path)

    def _caption(self, sample: Sample, augment: bool) -> str:
        cfg = self.config
        caption = sample.caption if sample.caption is not None else sample.folder_caption
        if caption is None:
            caption = caption_from_filename(sample.path) if cfg.missing_caption == "filename" else ""
        if augment:
            caption = augment_tags(caption, self.rng, cfg.shuffle_tags, cfg.keep_tags, cfg.tag_dropout)
            if cfg.caption_dropout and self.rng.random() < cfg.caption_dropout:
                caption = ""
        trigger = getattr(cfg, "trigger_word", "")  # DreamBooth's shared rules have none (prompts are per concept)
        if trigger:
            caption = f"{trigger}, {caption}" if caption else trigger
        return caption


class LatentCache:
    """VAE latents of every sample (and of its mirror image with ``flip``), encoded once and kept per sample so
    buckets of different sizes can coexist; ``random`` sampling keeps mean and std and redraws each time."""

    def __init__(
        self,
        samples: list[Sample],
        encoder: LatentEncoder,
        method: str,
        generator: torch.Generator,
        flip: bool = False,
        store: LatentStore | None = None,
    ):
        self.method, self.scale, self.flip = method, encoder.scale_factor, flip
        self.mean, self.std = _encode_all(samples, encoder, False, store)
        if flip:
            self.flip_mean, self.flip_std = _encode_all(samples, encoder, True, store)
        if method == "once":
            self.mean = [
                m + s * torch.randn(m.shape, generator=generator) for m, s in zip(self.mean, self.std, strict=True)
            ]
            if flip:
                self.flip_mean = [
                    m + s * torch.randn(m.shape, generator=generator)
                    for m, s in zip(self.flip_mean, self.flip_std, strict=True)
                ]

    def latents(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        """Scaled latents ``[B, 4, h, w]`` for ``indices`` of one bucket (fresh draws for ``random``/``flip``)."""
        out = []
        self.last_mirrored = []
        for i in indices:
            mirrored = self.flip and bool(torch.rand(1, generator=generator) < 0.5)
            self.last_mirrored.append(mirrored)
            mean = (self.flip_mean if mirrored else self.mean)[i]
            if self.method == "random":
                std = (self.flip_std if mirrored else self.std)[i]
                mean = mean + std * torch.randn(mean.shape, generator=generator)
            out.append(mean)
        return torch.stack(out) * self.scale


def _encode_all(
    samples: list[Sample], encoder: LatentEncoder, mirror: bool, store: LatentStore | None
) -> tuple[list, list]:
    means: list[torch.Tensor | None] = [None] * len(samples)
    stds: list[torch.Tensor | None] = [None] * len(samples)
    keys = [store.key(s.path, s.size, mirror) if store else "" for s in samples]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, sample in enumerate(samples):
        cached = store.get(keys[i]) if store else None
        if cached is not None:
            means[i], stds[i] = cached
        else:
            by_size.setdefault(sample.size, []).append(i)
    for indices in by_size.values():
        for start in range(0, len(indices), ENCODE_BATCH):
            chunk = indices[start : start + ENCODE_BATCH]
            pixels = torch.stack([samples[i].pixels for i in chunk])
            mean, std = encoder.encode(torch.flip(pixels, dims=[3]) if mirror else pixels)
            for j, i in enumerate(chunk):
                means[i], stds[i] = mean[j].cpu(), std[j].cpu()
                if store:
                    store.put(keys[i], means[i], stds[i])
    return means, stds


def epoch_batches(samples: list[Sample], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch: every sample ``repeats`` times, batches drawn within one bucket, batch order shuffled."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, sample in enumerate(samples):
        by_bucket.setdefault(sample.size, []).extend([i] * sample.repeats)
    batches: list[list[int]] = []
    for size in sorted(by_bucket):
        items = by_bucket[size]
        rng.shuffle(items)
        batches += [items[j : j + batch_size] for j in range(0, len(items), batch_size)]
    rng.shuffle(batches)
    return batches


def batches_per_epoch(samples: list[Sample], batch_size: int) -> int:
    """How many batches one epoch has (per bucket, counting repeats)."""
    counts: dict[tuple[int, int], int] = {}
    for sample in samples:
        counts[sample.size] = counts.get(sample.size, 0) + sample.repeats
    return sum(math.ceil(n / batch_size) for n in counts.values())


class TrainingBatches:
    """Endless batches (latents, prompts), epoch after epoch of ``epoch_batches``; resumable random state."""

    def __init__(self, samples: list[Sample], cache: LatentCache, prompts: PromptMaker, batch_size: int, seed: int):
        self.samples, self.cache, self.prompts, self.batch_size = samples, cache, prompts, batch_size
        self.rng = random.Random(seed)
        self.prompts.rng = self.rng
        self.latent_generator = torch.Generator().manual_seed(seed)
        self.queue: list[list[int]] = []

    def next_batch(self) -> tuple[torch.Tensor, list[str]]:
        """The next batch: scaled latents ``[B, 4, h, w]`` (CPU, one bucket) and one prompt per image (a
        ``Prompts`` list carrying each image's size conditioning)."""
        return self.assemble(self.next_indices())

    def next_indices(self) -> list[int]:
        """The sample indices of the next batch (one bucket)."""
        if not self.queue:
            self.queue = epoch_batches(self.samples, self.batch_size, self.rng)
        return self.queue.pop(0)

    def assemble(self, indices: list[int]) -> tuple:
        """(latents, prompts[, extras]) for the samples at ``indices``."""
        latents, prompts, samples, mirrored = self.pieces(indices)
        extras = {}
        if any(s.loss_weight != 1.0 for s in samples):
            extras["weights"] = torch.tensor([s.loss_weight for s in samples])
        if self.prompts.config.alpha_mask:
            extras["mask"] = self.masks(samples, mirrored, latents.shape[2:])
        return (latents, prompts, extras) if extras else (latents, prompts)

    def pieces(self, indices: list[int]) -> tuple[torch.Tensor, Prompts, list[Sample], list[bool]]:
        """Latents, prompts, the samples and which of them were mirrored, for ``indices``."""
        texts = [self.prompts.prompt(self.samples[i]) for i in indices]
        latents = self.cache.latents(indices, self.latent_generator)
        samples = [self.samples[i] for i in indices]
        mirrored = getattr(self.cache, "last_mirrored", None) or [False] * len(samples)
        prompts = Prompts(texts, [s.size_condition(m) for s, m in zip(samples, mirrored, strict=True)])
        return latents, prompts, samples, mirrored

    @staticmethod
    def masks(samples: list[Sample], mirrored: list[bool], size: tuple[int, ...]) -> torch.Tensor:
        """Loss masks ``[B, 1, h, w]`` (all ones for an image without transparency), mirrored with their image."""
        masks = [s.mask if s.mask is not None else torch.ones(1, *size) for s in samples]
        return torch.stack(
            [torch.flip(m, dims=[2]) if flipped else m for m, flipped in zip(masks, mirrored, strict=True)]
        )

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
        self.queue = [list(batch) for batch in state.get("queue", [])]
        if "latent" in state:
            self.latent_generator.set_state(state["latent"])
