"""Presets and job files: settings that work for a kind of subject, the user's own saved presets, and jobs
exported to / imported from JSON or a trained file's metadata ("train again like this").

A job is the JSON the REST API takes: ``{"method": ..., "config": {...}, "preview": {...}}``. Presets are
partial configs; whatever they leave out keeps the method's defaults. No host and no gradio here.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Any

from lib_trainer.errors import ConfigError, FormatError
from lib_trainer.formats.files import check_name, path_in, write_atomic

PURPOSES = ("Character / person", "Style", "Object")
FAMILY_SIDES = {"sd1": 512, "sd2": 768, "sdxl": 1024}
TRAINED_METHODS = ("textual_inversion", "lora", "hypernetwork", "dreambooth", "embedding_finetune")

_COMMON = {"data": {"buckets": True}, "train": {"min_snr_gamma": 5.0}}
_BY_PURPOSE: dict[str, dict[str, Any]] = {
    # a person or character: its word first in every caption, tags shuffled after it, no mirroring of faces
    "Character / person": {
        "data": {"shuffle_tags": True, "keep_tags": 1, "flip": False, "caption_dropout": 0.05},
    },
    # a style: many varied images, captions describe content so the style goes into the weights
    "Style": {
        "data": {"shuffle_tags": True, "keep_tags": 0, "flip": True, "caption_dropout": 0.1, "tag_dropout": 0.1},
        "train": {"noise_offset": 0.05},
    },
    # an object: few images from several sides; mirroring doubles them
    "Object": {"data": {"shuffle_tags": True, "keep_tags": 1, "flip": True}},
}
_BY_METHOD: dict[str, dict[str, dict[str, Any]]] = {
    "textual_inversion": {
        "Character / person": {
            "embedding": {"num_vectors": 4, "init_text": "person"},
            "data": {"template": "subject_filewords"},
            "train": {"learning_rate": "5e-3:500, 2.5e-3:1500, 1e-3", "steps": 2000, "batch_size": 1},
        },
        "Style": {
            "embedding": {"num_vectors": 8, "init_text": "style"},
            "data": {"template": "style_filewords"},
            "train": {"learning_rate": "5e-3:1000, 2e-3", "steps": 3000, "batch_size": 1},
        },
        "Object": {
            "embedding": {"num_vectors": 2, "init_text": "object"},
            "data": {"template": "subject_filewords"},
            "train": {"learning_rate": "5e-3:500, 2e-3", "steps": 1500, "batch_size": 1},
        },
    },
    "lora": {
        "Character / person": {
            "network": {"algo": "lora", "rank": 16, "alpha": 8.0},
            "train": {"learning_rate": "1e-4", "steps": 1500, "lr_schedule": "cosine", "lr_warmup_steps": 50},
        },
        "Style": {
            "network": {"algo": "locon", "rank": 32, "alpha": 16.0, "conv_rank": 8, "conv_alpha": 4.0},
            "train": {"learning_rate": "1e-4", "steps": 3000, "lr_schedule": "cosine", "lr_warmup_steps": 100},
        },
        "Object": {
            "network": {"algo": "lora", "rank": 8, "alpha": 4.0},
            "train": {"learning_rate": "1e-4", "steps": 1200, "lr_schedule": "cosine", "lr_warmup_steps": 50},
        },
    },
    "hypernetwork": {purpose: {"train": {"learning_rate": "5e-6:2000, 2.5e-6", "steps": 4000}} for purpose in PURPOSES},
    "dreambooth": {
        purpose: {"train": {"learning_rate": "2e-6", "steps": 800 if purpose != "Style" else 2000}}
        for purpose in PURPOSES
    },
    "embedding_finetune": {purpose: {"train": {"learning_rate": "1e-4", "steps": 1000}} for purpose in PURPOSES},
}


def builtin_preset(method: str, purpose: str, family: str = "sd1") -> dict[str, Any]:
    """The partial config of a built-in preset for ``method``, sized for the model ``family``."""
    if method not in _BY_METHOD:
        raise ConfigError(f"presets exist for {', '.join(_BY_METHOD)}, not {method!r}", field="method")
    if purpose not in PURPOSES:
        raise ConfigError(f"preset {purpose!r} is unknown; built-in presets: {', '.join(PURPOSES)}", field="preset")
    side = FAMILY_SIDES.get(family, 512)
    sized = {"data": {"width": side, "height": side, "bucket_min_side": side // 2, "bucket_max_side": 2 * side}}
    config: dict[str, Any] = {}
    for part in (_COMMON, sized, _BY_PURPOSE[purpose], _BY_METHOD[method][purpose]):
        config = merge(config, part)
    if method == "textual_inversion" and family == "sdxl":
        config["train"]["learning_rate"] = "3e-3:500, 1e-3"
    return config


# values a config must have to be valid but a preset or an imported job may leave for the user to fill in
_REQUIRED: dict[str, dict[str, Any]] = {
    "textual_inversion": {"embedding.name": "x", "data.data_dir": "x"},
    "lora": {"network.name": "x", "data.data_dir": "x"},
    "hypernetwork": {"hypernetwork.name": "x", "data.data_dir": "x"},
    "dreambooth": {"dreambooth.name": "x", "concepts": [{"instance_dir": "x"}]},
    "embedding_finetune": {"finetune.name": "x", "finetune.tokens": "x", "data.data_dir": "x"},
    "preprocess": {"input_dir": "x", "output_dir": "y"},
}


def complete_config(cls: Any, method: str, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` checked and made whole (every setting, defaults where it has none) as a nested dict; the names
    and folders it leaves empty stay empty, for the user to fill in. A ConfigError names a wrong setting."""
    if not isinstance(config, dict):
        raise ConfigError(f"config must be an object (a dict), but is {type(config).__name__}", field="config")
    missing = {p: v for p, v in _REQUIRED.get(method, {}).items() if not _get(config, p)}
    probe = config
    for path, value in missing.items():
        probe = _put(probe, path, value)
    whole = dataclasses.asdict(cls.from_dict(probe))
    for path, value in missing.items():
        whole = _put(whole, path, [] if isinstance(value, list) else "")
    return whole


def job_name(method: str, config: dict[str, Any]) -> str:
    """The name a job's files get (its embedding / LoRA / ... name), else the method's name."""
    paths = [p for p in _REQUIRED.get(method, {}) if p.endswith(".name")]
    name = _get(config, paths[0]) if paths else None
    return name if isinstance(name, str) and name else method


def _get(config: dict[str, Any], path: str) -> Any:
    node: Any = config
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node.strip() if isinstance(node, str) else node


def _put(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    head, _, rest = path.partition(".")
    inner = config.get(head) if isinstance(config.get(head), dict) else {}
    return {**config, head: _put(inner, rest, value) if rest else value}


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` laid over it, sections merged key by key (neither is changed)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def job_document(method: str, config: dict[str, Any], preview: dict[str, Any] | None) -> dict[str, Any]:
    """The job as the API takes it."""
    job: dict[str, Any] = {"method": method, "config": config}
    if preview is not None:
        job["preview"] = preview
    return job


def user_presets(folder: Path) -> list[str]:
    """Names of the presets saved in ``folder``."""
    return sorted(p.stem for p in Path(folder).glob("*.json")) if Path(folder).is_dir() else []


def save_job(folder: Path, name: str, job: dict[str, Any], overwrite: bool = True, field: str = "name") -> Path:
    """Write ``job`` as ``folder/<name>.json`` atomically (a preset or an exported job); returns the path."""
    check_name(name, field)
    path = path_in(Path(folder), f"{name}.json")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; choose another {field} or allow overwriting", field=field)
    text = json.dumps(job, indent=2, sort_keys=True)
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def load_user_preset(folder: Path, name: str) -> dict[str, Any]:
    """A saved preset, as a job document."""
    check_name(name, "preset")
    path = path_in(Path(folder), f"{name}.json")
    if not path.is_file():
        raise ConfigError(f"there is no saved preset {name!r} in {folder}", field="preset")
    return parse_job_text(path.read_text(encoding="utf-8"), str(path))


def import_job(source: str) -> dict[str, Any]:
    """A job document from pasted JSON, a ``.json`` job file, or a trained ``.safetensors`` file's metadata
    (our own saved config, else kohya's ``ss_*`` keys)."""
    text = (source or "").strip()
    if not text:
        raise ConfigError("nothing to import; paste a job's JSON or give the path of a .json or .safetensors file")
    if text.startswith("{"):
        return parse_job_text(text, "the pasted text")
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"{text!r} is neither JSON nor an existing file; paste JSON or give a file's path")
    if path.suffix.lower() == ".json":
        return parse_job_text(path.read_text(encoding="utf-8"), str(path))
    if path.suffix.lower() == ".safetensors":
        return job_from_metadata(read_metadata(path), str(path))
    raise ConfigError(f"{path.name} is not a .json job or a .safetensors file; those two can be imported")


def parse_job_text(text: str, where: str) -> dict[str, Any]:
    """A job document from JSON text: ``{"method", "config", "preview"?}``; a bare config needs its method."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where} holds {type(data).__name__}, not a job object {{'method': ..., 'config': ...}}")
    if "config" not in data or "method" not in data:
        raise ConfigError(f"{where} is not a job: it needs 'method' and 'config' (as exported by the tab)")
    if data["method"] not in (*TRAINED_METHODS, "preprocess"):
        raise ConfigError(f"{where}: method {data['method']!r} is unknown", field="method")
    if not isinstance(data["config"], dict):
        raise ConfigError(f"{where}: 'config' must be an object", field="config")
    return job_document(data["method"], data["config"], data.get("preview"))


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (its header only; no tensors are read)."""
    try:
        with Path(path).open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                raise ValueError(f"header size {size}")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path} is not a readable .safetensors file ({exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def job_from_metadata(meta: dict[str, str], where: str) -> dict[str, Any]:
    """The job that made a file: our ``trainer_config`` when it has one, else a LoRA config from kohya's keys."""
    method = _method_of(meta)
    if "trainer_config" in meta:
        try:
            config = json.loads(meta["trainer_config"])
        except json.JSONDecodeError as exc:
            raise FormatError(f"{where}: its trainer_config metadata is not JSON ({exc.msg})") from exc
        if method is None:
            raise FormatError(f"{where}: cannot tell which method wrote it (no LoRA or embedding metadata)")
        return job_document(method, config, None)
    if "ss_network_dim" in meta:
        return job_document("lora", config_from_kohya(meta), None)
    raise FormatError(
        f"{where} has no training settings in its metadata (neither this trainer's nor kohya's ss_* keys)"
    )


def _method_of(meta: dict[str, str]) -> str | None:
    architecture = meta.get("modelspec.architecture", "")
    if "ss_network_dim" in meta or architecture.endswith("/lora"):
        return "lora"
    if architecture.endswith("/textual-inversion"):
        return "textual_inversion"
    try:
        config = json.loads(meta.get("trainer_config", "{}"))
    except json.JSONDecodeError:
        return None
    for key, method in (("embedding", "textual_inversion"), ("hypernetwork", "hypernetwork")):
        if isinstance(config, dict) and key in config:
            return method
    return None


def config_from_kohya(meta: dict[str, str]) -> dict[str, Any]:
    """A LoRA config from kohya sd-scripts' ``ss_*`` metadata (what it can express; the rest keeps defaults)."""
    data = _mapped(meta, _KOHYA_DATA)
    size = _size(meta.get("ss_resolution", ""))
    if size:
        data["width"], data["height"] = size
    return {"network": _kohya_network(meta), "train": _kohya_train(meta), "data": data}


# our setting: (kohya's key, its type); bool keys count only when "True"
_KOHYA_TRAIN = {
    "lr_warmup_steps": ("ss_lr_warmup_steps", int),
    "noise_offset": ("ss_noise_offset", float),
    "min_snr_gamma": ("ss_min_snr_gamma", float),
    "clip_skip": ("ss_clip_skip", int),
    "seed": ("ss_seed", int),
    "gradient_checkpointing": ("ss_gradient_checkpointing", bool),
    "batch_size": ("ss_batch_size_per_device", int),
    "gradient_accumulation": ("ss_gradient_accumulation_steps", int),
}
_KOHYA_DATA = {
    "buckets": ("ss_enable_bucket", bool),
    "flip": ("ss_flip_aug", bool),
    "shuffle_tags": ("ss_shuffle_caption", bool),
    "keep_tags": ("ss_keep_tokens", int),
    "caption_dropout": ("ss_caption_dropout_rate", float),
}
_KOHYA_SCHEDULES = {
    "constant": "constant",
    "constant_with_warmup": "constant",
    "linear": "linear",
    "cosine": "cosine",
    "cosine_with_restarts": "cosine_with_restarts",
    "polynomial": "polynomial",
}
_MINIMUM_ONE = ("batch_size", "gradient_accumulation", "steps")


def _mapped(meta: dict[str, str], table: dict[str, tuple[str, type]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ours, (theirs, kind) in table.items():
        value = meta.get(theirs)
        if value in (None, "", "None"):
            continue
        if kind is bool:
            if value in ("True", "true"):
                out[ours] = True
        else:
            out[ours] = _int(value, 0) if kind is int else _float(value, 0.0)
            if ours in _MINIMUM_ONE:
                out[ours] = max(1, out[ours])
    return out


def _kohya_network(meta: dict[str, str]) -> dict[str, Any]:
    network: dict[str, Any] = {"rank": _int(meta.get("ss_network_dim"), 16)}
    network["alpha"] = _float(meta.get("ss_network_alpha"), float(network["rank"]))
    args = _json_dict(meta.get("ss_network_args"))
    algo = str(args.get("algo", "")).lower()
    if algo in ("loha", "lokr", "locon", "lora"):
        network["algo"] = algo
    if args.get("conv_dim"):
        network["conv_rank"] = _int(args["conv_dim"], 0)
        network["conv_alpha"] = _float(args.get("conv_alpha"), float(network["conv_rank"]))
        network.setdefault("algo", "locon")
    for key in ("dropout", "rank_dropout", "module_dropout"):
        if args.get(key):
            network[key] = _float(args[key], 0.0)
    if meta.get("ss_network_dropout") not in (None, "", "None"):
        network["dropout"] = _float(meta["ss_network_dropout"], 0.0)
    te_lr = meta.get("ss_text_encoder_lr", "")
    network["train_text_encoder"] = te_lr not in ("", "0", "0.0", "None")
    if network["train_text_encoder"]:
        network["text_encoder_lr"] = _float(te_lr, 0.0)
    if meta.get("ss_output_name"):
        network["name"] = meta["ss_output_name"]
    return network


def _kohya_train(meta: dict[str, str]) -> dict[str, Any]:
    train = _mapped(meta, _KOHYA_TRAIN)
    unet_lr = meta.get("ss_unet_lr", "")
    lr = unet_lr if unet_lr not in ("", "None") else meta.get("ss_learning_rate", "")
    if lr not in ("", "None"):
        train["learning_rate"] = str(lr)
    steps = meta.get("ss_max_train_steps") or meta.get("ss_steps")
    if steps:
        train["steps"] = max(1, _int(steps, 1000))
    schedule = _KOHYA_SCHEDULES.get(meta.get("ss_lr_scheduler", ""))
    if schedule:
        train["lr_schedule"] = schedule
    return train


def _int(value: Any, default: int) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def _float(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _json_dict(text: str | None) -> dict[str, Any]:
    try:
        data = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _size(text: str) -> tuple[int, int] | None:
    """kohya's ss_resolution: "(512, 512)" or "512"."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, int):
        return value, value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value
    return None
