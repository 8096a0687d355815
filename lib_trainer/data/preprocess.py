"""Preparing a training folder: focal crop to the training size (or nearest bucket) and captions beside images.

The Extras-tab scripts and ``POST /trainer/v1/preprocess`` both use these functions; captioners come from the
host (BLIP, DeepBooru) or, in tests, stand-ins. Input files are never modified.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from PIL import Image

from lib_trainer.config import check_multiple, check_settings, setting
from lib_trainer.data.buckets import BucketSpec, assign_bucket, make_buckets
from lib_trainer.data.captions import read_caption
from lib_trainer.data.crop import FocalWeights, focal_crop
from lib_trainer.data.images import IMAGE_EXTENSIONS, load_rgb
from lib_trainer.errors import ConfigError, DatasetError
from lib_trainer.formats.files import write_atomic, write_bytes_atomic

CaptionPolicy = Literal["keep", "replace", "prepend", "append"]
Captioner = Callable[[Image.Image], str]
CAPTION_EXTENSIONS = (".txt", ".caption", ".tags", ".cap", ".text")


@dataclass(frozen=True)
class PreprocessConfig:
    """A folder-to-folder preparation run."""

    SECTION: ClassVar[str] = ""

    input_dir: str = setting("", path="dir")
    output_dir: str = setting("", path="out_dir")
    crop: bool = True
    width: int = setting(512, low=64, high=4096)
    height: int = setting(512, low=64, high=4096)
    buckets: bool = False  # crop each image to its nearest bucket of about width x height instead
    face_weight: float = setting(0.9, low=0.0, high=10.0)
    entropy_weight: float = setting(0.15, low=0.0, high=10.0)
    edges_weight: float = setting(0.5, low=0.0, high=10.0)
    debug_images: bool = False
    caption_blip: bool = False
    caption_deepbooru: bool = False
    trigger_word: str = setting("", free_text=True)
    existing_caption: CaptionPolicy = "keep"
    caption_extension: str = ".txt"

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessConfig:
        """Build from a plain dict (API, tab)."""
        from lib_trainer.config import build

        return build(cls, data)

    def __post_init__(self) -> None:
        for name in ("input_dir", "output_dir"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} is empty; give a folder", field=name)
        if Path(self.output_dir).expanduser().resolve() == Path(self.input_dir).expanduser().resolve():
            raise ConfigError(
                "output_dir must differ from input_dir (input files are never overwritten)", field="output_dir"
            )
        check_settings(self, self.SECTION)
        for name in ("width", "height"):
            check_multiple(name, getattr(self, name), 64)
        if self.caption_extension.lower() not in CAPTION_EXTENSIONS:  # written files: never a script extension
            raise ConfigError(
                f"caption_extension {self.caption_extension!r} is not a caption extension; use one of "
                f"{', '.join(CAPTION_EXTENSIONS)}",
                field="caption_extension",
            )


def input_images(folder: Path) -> list[Path]:
    """The image files of an input folder, sorted (not recursive)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def check_input_folder(config: PreprocessConfig) -> None:
    """Before a preparation run is queued: the input folder holds images and the output is not a file."""
    source = Path(config.input_dir).expanduser()
    if not source.is_dir():
        raise DatasetError(f"input_dir {str(source)!r} is not an existing folder", field="input_dir")
    if not input_images(source):
        raise DatasetError(
            f"input_dir {str(source)!r} holds no .jpg, .jpeg, .png, .webp or .bmp files", field="input_dir"
        )
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DatasetError(f"output_dir {str(out)!r} is a file, not a folder", field="output_dir")


def merge_caption(existing: str | None, new: str, policy: CaptionPolicy, trigger: str = "") -> str:
    """The caption to write given what the image already had: keep / replace / prepend / append."""
    existing = (existing or "").strip()
    new = new.strip()
    if policy == "keep" and existing:
        merged = existing
    elif policy == "prepend" and existing:
        merged = f"{new}, {existing}" if new else existing
    elif policy == "append" and existing:
        merged = f"{existing}, {new}" if new else existing
    else:
        merged = new or existing
    if trigger and not merged.startswith(trigger):
        merged = f"{trigger}, {merged}" if merged else trigger
    return merged


def target_size(image: Image.Image, config: PreprocessConfig) -> tuple[int, int]:
    """The fixed training size, or the image's nearest bucket."""
    if not config.buckets:
        return config.width, config.height
    min_side = max(64, min(config.width, config.height) // 2 // 64 * 64)  # buckets down to half the training side
    spec = BucketSpec(config.width, config.height, min_side, 2048, 64)
    return assign_bucket(image.size, make_buckets(spec), spec)


def caption_image(image: Image.Image, captioners: list[Captioner]) -> str:
    """The captioners' texts joined with ", " (BLIP sentence first, then tags)."""
    return ", ".join(text.strip() for text in (c(image) for c in captioners) if text and text.strip())


def preprocess_folder(
    config: PreprocessConfig, captioners: list[Captioner], progress: Callable[[int, int, str], bool] | None = None
) -> dict[str, list]:
    """Crop and caption every image of ``input_dir`` into ``output_dir``; returns written files and problems.

    ``progress(done, total, name)`` may return True to stop early.
    """
    source = Path(config.input_dir).expanduser()
    if not source.is_dir():
        raise DatasetError(f"input_dir {str(source)!r} is not an existing folder", field="input_dir")
    out = Path(config.output_dir).expanduser()
    files = input_images(source)
    result: dict[str, list] = {"written": [], "problems": []}
    weights = FocalWeights(config.face_weight, config.entropy_weight, config.edges_weight)
    for done, path in enumerate(files):
        if progress is not None and progress(done, len(files), path.name):
            break
        try:
            image = load_rgb(path)
            existing = read_caption(path, config.caption_extension)
        except (OSError, ValueError, SyntaxError, UnicodeDecodeError) as exc:
            result["problems"].append({"file": path.name, "reason": str(exc)})
            continue
        result["written"] += _prepare_one(image, path, existing, config, captioners, weights, out)
    return result


def _prepare_one(image, path, existing, config, captioners, weights, out: Path) -> list[str]:
    written = []
    if config.crop:
        image, debug = focal_crop(image, target_size(image, config), weights, debug=config.debug_images)
        if debug is not None:
            written.append(str(write_atomic(out / f"{path.stem}-focal-debug.png", lambda tmp: debug.save(tmp, "PNG"))))
    image_path = write_atomic(out / f"{path.stem}.png", lambda tmp: image.save(tmp, "PNG"))
    written.append(str(image_path))
    new = caption_image(image, captioners) if captioners else ""
    caption = merge_caption(existing, new, config.existing_caption, config.trigger_word)
    if caption:
        caption_path = image_path.with_suffix(config.caption_extension)
        written.append(str(write_bytes_atomic(caption_path, (caption + "\n").encode("utf-8"))))
    return written
