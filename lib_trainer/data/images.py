"""Image loading: any mode to RGB with EXIF orientation applied, resized to cover and centre-cropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_rgb(path: Path) -> Image.Image:
    """Decode the whole image (truncated files raise OSError), apply EXIF orientation, convert to RGB."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            img = img.point(lambda v: v / 256).convert("L")
        return img.convert("RGB")


def load_alpha(path: Path) -> Image.Image | None:
    """The image's transparency as an "L" image (EXIF orientation applied), or None when it has none."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode not in ("RGBA", "LA", "PA") and not (img.mode == "P" and "transparency" in img.info):
            return None
        return img.convert("RGBA").getchannel("A")


def mask_tensor(alpha: Image.Image, width: int, height: int) -> torch.Tensor:
    """Alpha cropped like the pixels, averaged down to latent resolution: ``[1, h/8, w/8]`` in [0, 1]."""
    small = resize_crop(alpha, width, height).resize((width // 8, height // 8), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).unsqueeze(0)


def cover_crop(size: tuple[int, int], width: int, height: int) -> tuple[tuple[int, int], int, int]:
    """Where ``resize_crop`` cuts: the resized (w, h) that covers ``width``x``height``, and the crop's left, top."""
    scale = max(width / size[0], height / size[1])
    resized = (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))
    return resized, (resized[0] - width) // 2, (resized[1] - height) // 2


def resize_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers ``width``x``height``, then crop the centre."""
    size, left, top = cover_crop(img.size, width, height)
    img = img.resize(size, Image.Resampling.LANCZOS)
    return img.crop((left, top, left + width, top + height))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor ``[3, H, W]`` in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
