"""Textual-inversion embedding files.

Written: ``.safetensors`` holding one fp32 tensor ``emb_params [n_vectors, dim]`` (kohya's key), or for SDXL
exactly ``clip_l [n, 768]`` and ``clip_g [n, 1280]`` (docs/formats.md section 3.1), which the WebUI (>= 1.1;
SDXL >= 1.6, with its safe loader on), ComfyUI and diffusers load; metadata strings carry the name, step, base
model and our resolved config. Read for resume: those formats, the WebUI's ``.pt`` (``string_to_param`` with one
entry, loaded with ``weights_only=True``) and single-tensor files. In memory an SDXL embedding is one
``[n, 768 + 1280]`` tensor (CLIP-L's part first), the width the WebUI checks SDXL embeddings against.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from lib_trainer.errors import FormatError
from lib_trainer.formats.files import finite_for_saving, load_torch_weights, write_bytes_atomic

TENSOR_KEY = "emb_params"
EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")
ARCHITECTURES = {
    ("sd1", "eps"): "stable-diffusion-v1",
    ("sd2", "eps"): "stable-diffusion-v2-512",
    ("sd2", "v"): "stable-diffusion-v2-768-v",
    ("sdxl", "eps"): "stable-diffusion-xl-v1-base",
    ("sdxl", "v"): "stable-diffusion-xl-v1-base",
}
SDXL_KEYS = ("clip_l", "clip_g")


@dataclass
class EmbeddingFile:
    """An embedding as read from disk."""

    vectors: torch.Tensor  # fp32 CPU [n_vectors, dim] (SDXL: clip_l and clip_g side by side)
    step: int = 0
    name: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def embedding_metadata(
    name: str,
    step: int,
    family: str,
    prediction: str,
    model_name: str | None,
    model_hash: str | None,
    config_json: str,
) -> dict[str, str]:
    """Metadata strings for a saved embedding (ignored by the WebUI's loader, shown by model browsers)."""
    meta = {
        "name": name,
        "step": str(step),
        "trainer": "sd-webui-trainer",
        "trainer_config": config_json,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{ARCHITECTURES.get((family, prediction), 'stable-diffusion-v1')}/textual-inversion",
        "modelspec.title": name,
        "modelspec.prediction_type": "v" if prediction == "v" else "epsilon",
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if model_name:
        meta["sd_checkpoint_name"] = model_name
    if model_hash:
        meta["sd_checkpoint"] = model_hash
    return meta


def save_embedding(path: Path, vectors: torch.Tensor | Mapping[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write an embedding as a WebUI-loadable ``.safetensors`` file, atomically.

    ``vectors``: one ``[n, dim]`` tensor (saved as ``emb_params``) or the file's tensors by key (SDXL: ``clip_l``
    and ``clip_g``, as ``TextEncoder.split_vectors`` gives them).
    """
    if path.suffix != ".safetensors":
        raise FormatError(f"embeddings are written as .safetensors, not {path.suffix!r} ({path})")
    parts = dict(vectors) if isinstance(vectors, Mapping) else {TENSOR_KEY: vectors}
    tensors = finite_for_saving(
        parts, torch.float32, f"embedding {path.stem}", "Lower train.learning_rate and train again"
    )
    data = safetensors.torch.save(tensors, metadata={k: str(v) for k, v in metadata.items()})
    return write_bytes_atomic(path, data)


def read_embedding(path: Path, field: str | None = None) -> EmbeddingFile:
    """Read a ``.safetensors`` / ``.pt`` / ``.bin`` embedding (for resuming); FormatError naming ``field`` if not."""
    path = Path(path)
    if path.suffix.lower() not in EMBEDDING_EXTENSIONS:
        raise FormatError(f"{path.name}: embeddings are read from {', '.join(EMBEDDING_EXTENSIONS)} files", field)
    if path.suffix.lower() == ".safetensors":
        try:
            return _read_safetensors(path)
        except (OSError, RuntimeError, ValueError, safetensors.SafetensorError) as exc:
            raise FormatError(f"{path.name} cannot be read as an embedding (damaged file?): {exc}", field) from exc
    data = load_torch_weights(path, "an embedding", field)
    return _from_dict(
        path,
        data,
        step=_int(data.get("step")) if isinstance(data, dict) else 0,
        name=data.get("name") if isinstance(data, dict) else None,
        metadata={},
    )


def _read_safetensors(path: Path) -> EmbeddingFile:
    with safetensors.safe_open(str(path), framework="pt", device="cpu") as fh:
        metadata = dict(fh.metadata() or {})
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    params = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("string_to_param.")}
    data = {"string_to_param": params} if params else tensors
    return _from_dict(path, data, step=_int(metadata.get("step")), name=metadata.get("name"), metadata=metadata)


def _from_dict(path: Path, data: object, step: int, name: str | None, metadata: dict[str, str]) -> EmbeddingFile:
    if not isinstance(data, dict):
        raise FormatError(f"{path.name} holds a {type(data).__name__}, not an embedding dict")
    if "clip_l" in data and "clip_g" in data:
        parts = [data[key] for key in SDXL_KEYS]
        if (
            not all(isinstance(p, torch.Tensor) and p.dim() == 2 for p in parts)
            or parts[0].shape[0] != parts[1].shape[0]
        ):
            raise FormatError(f"{path.name}: clip_l and clip_g must be [n_vectors, width] tensors with the same n")
        vec = torch.cat([p.float() for p in parts], dim=1)
    elif "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise FormatError(f"{path.name}: string_to_param must hold exactly one tensor")
        vec = next(iter(params.values()))
    else:
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise FormatError(f"{path.name} holds {len(tensors)} tensors; an embedding file holds exactly one")
        vec = tensors[0]
    if not isinstance(vec, torch.Tensor) or vec.dim() not in (1, 2):
        raise FormatError(f"{path.name}: the embedding tensor must be [n_vectors, dim]")
    vec = vec.unsqueeze(0) if vec.dim() == 1 else vec
    return EmbeddingFile(vec.detach().float().cpu().clone(), step, name, metadata)


def _int(value: object) -> int:
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0


def metadata_config(metadata: dict[str, str]) -> dict | None:
    """The resolved trainer config stored in a file's metadata, if any."""
    text = metadata.get("trainer_config")
    return json.loads(text) if text else None
