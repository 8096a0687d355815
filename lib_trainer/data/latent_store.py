"""Latents on disk, reused across runs: one safetensors file per (image bytes, size, mirror, model)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from lib_trainer.config import DataConfig
from lib_trainer.formats.files import write_bytes_atomic
from lib_trainer.models.parts import LatentEncoder, ModelParts


def encoder_fingerprint(encoder: LatentEncoder) -> str:
    """A short hash of what this VAE makes of a fixed test pattern (another model, another key)."""
    ramp = torch.linspace(-1, 1, 64)
    pattern = torch.stack([ramp.expand(64, 64), ramp.expand(64, 64).T, ramp.expand(64, 64) * ramp[:, None]])
    mean, _ = encoder.encode(pattern.unsqueeze(0))
    rounded = (mean.float() * 1000).round().to(torch.int64).cpu().numpy().tobytes()
    return hashlib.sha256(rounded + str(encoder.scale_factor).encode()).hexdigest()[:16]


class LatentStore:
    """A folder of cached latent distributions keyed by file content, target size, mirroring and model."""

    def __init__(self, folder: Path, model_key: str):
        self.folder, self.model_key = Path(folder), model_key

    def key(self, path: Path, size: tuple[int, int], mirror: bool) -> str:
        """The cache key of one image."""
        digest = hashlib.sha256(Path(path).read_bytes())
        digest.update(f"{size[0]}x{size[1]}:{int(mirror)}:{self.model_key}".encode())
        return digest.hexdigest()[:32]

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached (mean, std), or None."""
        path = self.folder / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            tensors = safetensors.torch.load_file(str(path))
        except (OSError, safetensors.SafetensorError):
            return None
        return tensors["mean"], tensors["std"]

    def put(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store (mean, std) atomically."""
        data = safetensors.torch.save({"mean": mean.contiguous(), "std": std.contiguous()})
        write_bytes_atomic(self.folder / f"{key}.safetensors", data)


def latent_store(data: DataConfig, parts: ModelParts, log_dir: Path) -> LatentStore | None:
    """The on-disk store a data config asks for (``<log dir>/latent-cache``), or None for in-memory only."""
    if data.latent_cache != "disk":
        return None
    return LatentStore(Path(log_dir) / "latent-cache", parts.model_hash or encoder_fingerprint(parts.latent_encoder))
