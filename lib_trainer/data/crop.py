"""Focal-point cropping to a training size: faces first, then image entropy and edges (weighted).

Faces come from OpenCV's bundled Haar cascade (opencv-python(-headless) < 5 ships it) or, when the host has
it on disk, the YuNet model. The crop window covers the target aspect ratio at the largest scale, centred on
the weighted focal point and then moved (if it can) so every detected face box lies inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

Box = tuple[int, int, int, int]  # x, y, width, height


@dataclass(frozen=True)
class FocalWeights:
    """How much each cue pulls the crop: detected faces, local entropy, edges."""

    face: float = 0.9
    entropy: float = 0.15
    edges: float = 0.5


def detect_faces(image: Image.Image, yunet_model: Path | None = None) -> list[Box]:
    """Face boxes (x, y, w, h); [] when OpenCV is not installed."""
    try:
        import cv2
    except ImportError:
        return []
    rgb = np.asarray(image.convert("RGB"))
    if yunet_model is not None and yunet_model.is_file() and hasattr(cv2, "FaceDetectorYN"):
        detector = cv2.FaceDetectorYN.create(str(yunet_model), "", (rgb.shape[1], rgb.shape[0]), 0.8)
        _, faces = detector.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        return [tuple(int(v) for v in face[:4]) for face in (faces if faces is not None else [])]
    cascade_dir = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if not cascade_dir:
        return []
    cascade = cv2.CascadeClassifier(str(Path(cascade_dir) / "haarcascade_frontalface_default.xml"))
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    side = max(24, min(gray.shape) // 20)
    return [tuple(int(v) for v in box) for box in cascade.detectMultiScale(gray, 1.1, 5, minSize=(side, side))]


def _weighted_centre(weights: np.ndarray) -> tuple[float, float] | None:
    total = float(weights.sum())
    if total <= 0:
        return None
    ys, xs = np.indices(weights.shape)
    return float((xs * weights).sum() / total), float((ys * weights).sum() / total)


def entropy_centre(gray: np.ndarray, block: int = 16) -> tuple[float, float] | None:
    """Centre of the blocks with the highest grey-level entropy (detail), in pixels."""
    h, w = (gray.shape[0] // block) * block, (gray.shape[1] // block) * block
    if h == 0 or w == 0:
        return None
    tiles = (
        gray[:h, :w]
        .reshape(h // block, block, w // block, block)
        .transpose(0, 2, 1, 3)
        .reshape(h // block, w // block, -1)
    )
    hist = np.stack([np.histogram(t, bins=32, range=(0, 256))[0] for t in tiles.reshape(-1, block * block)])
    p = hist / hist.sum(axis=1, keepdims=True)
    entropy = -(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0)).sum(axis=1).reshape(tiles.shape[:2])
    entropy = np.where(entropy >= np.quantile(entropy, 0.8), entropy, 0)
    centre = _weighted_centre(entropy)
    return None if centre is None else ((centre[0] + 0.5) * block, (centre[1] + 0.5) * block)


def edge_centre(gray: np.ndarray) -> tuple[float, float] | None:
    """Centre of gradient magnitude (edges), in pixels."""
    gy, gx = np.gradient(gray.astype(np.float32))
    magnitude = np.hypot(gx, gy)
    return _weighted_centre(np.where(magnitude >= np.quantile(magnitude, 0.9), magnitude, 0))


def focal_point(image: Image.Image, faces: list[Box], weights: FocalWeights) -> tuple[float, float]:
    """The weighted mean of the cues' centres (faces weighted by area); the image centre if none."""
    gray = np.asarray(image.convert("L"))
    cues: list[tuple[float, tuple[float, float]]] = []
    if faces and weights.face > 0:
        area = sum(w * h for _, _, w, h in faces)
        cx = sum((x + w / 2) * w * h for x, _, w, h in faces) / area
        cy = sum((y + h / 2) * w * h for _, y, w, h in faces) / area
        cues.append((weights.face, (cx, cy)))
    for weight, finder in ((weights.entropy, entropy_centre), (weights.edges, edge_centre)):
        centre = finder(gray) if weight > 0 else None
        if centre is not None:
            cues.append((weight, centre))
    if not cues:
        return image.width / 2, image.height / 2
    total = sum(w for w, _ in cues)
    return sum(w * c[0] for w, c in cues) / total, sum(w * c[1] for w, c in cues) / total


def crop_window(size: tuple[int, int], target: tuple[int, int], focal: tuple[float, float], faces: list[Box]) -> Box:
    """The largest window of the target aspect inside the image, centred on ``focal`` and moved to hold the faces."""
    width, height = size
    aspect = target[0] / target[1]
    win_w, win_h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
    win_w, win_h = min(win_w, width), min(win_h, height)
    left = round(min(max(focal[0] - win_w / 2, 0), width - win_w))
    top = round(min(max(focal[1] - win_h / 2, 0), height - win_h))
    if faces:
        fx0, fy0 = min(x for x, _, _, _ in faces), min(y for _, y, _, _ in faces)
        fx1, fy1 = max(x + w for x, _, w, _ in faces), max(y + h for _, y, _, h in faces)
        if fx1 - fx0 <= win_w:
            left = min(max(left, fx1 - win_w), fx0)
        if fy1 - fy0 <= win_h:
            top = min(max(top, fy1 - win_h), fy0)
    return left, top, win_w, win_h


def focal_crop(
    image: Image.Image,
    target: tuple[int, int],
    weights: FocalWeights = FocalWeights(),
    yunet_model: Path | None = None,
    debug: bool = False,
) -> tuple[Image.Image, Image.Image | None]:
    """Crop ``image`` around its focal point to the target aspect and resize to ``target``; optional debug view."""
    faces = detect_faces(image, yunet_model) if weights.face > 0 else []
    focal = focal_point(image, faces, weights)
    left, top, w, h = crop_window(image.size, target, focal, faces)
    cropped = image.crop((left, top, left + w, top + h)).resize(target, Image.Resampling.LANCZOS)
    if not debug:
        return cropped, None
    view = image.convert("RGB").copy()
    draw = ImageDraw.Draw(view)
    for x, y, fw, fh in faces:
        draw.rectangle((x, y, x + fw, y + fh), outline="red", width=3)
    draw.rectangle((left, top, left + w, top + h), outline="yellow", width=3)
    draw.ellipse((focal[0] - 6, focal[1] - 6, focal[0] + 6, focal[1] + 6), fill="yellow")
    return cropped, view
