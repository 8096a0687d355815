"""Configuration: frozen dataclasses built from plain dicts (JSON), validated, versioned.

``build(cls, data)`` is the one way in from the UI, the API or a saved file: unknown keys are
rejected with the valid ones listed, values are type-checked, nested configs are built the same
way, and old config versions are upgraded through ``MIGRATIONS`` first.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

from lib_trainer.errors import ConfigError

CONFIG_VERSION = 1
T = TypeVar("T")

# version N -> function upgrading a version-N dict to version N+1 (none yet: version 1 is the first)
MIGRATIONS: dict[int, typing.Callable[[dict[str, Any]], dict[str, Any]]] = {}


def build(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``; reject unknown keys and values of the wrong type."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__} must be an object (a dict), got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(_join(path, k) for k in unknown)}; "
            f"valid settings here are: {', '.join(sorted(fields))}",
            field=_join(path, unknown[0]),
        )
    kwargs = {name: _coerce(hints[name], value, _join(path, name)) for name, value in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and _has_no_default(f)]
    if missing:
        raise ConfigError(
            f"missing required setting(s): {', '.join(_join(path, m) for m in missing)}", field=_join(path, missing[0])
        )
    return cls(**kwargs)


def build_versioned(cls: type[T], data: dict[str, Any]) -> T:
    """Upgrade ``data`` to the current config version, then ``build`` it."""
    data = dict(data)
    version = data.get("version", CONFIG_VERSION)
    if not isinstance(version, int) or version < 1 or version > CONFIG_VERSION:
        raise ConfigError(
            f"config version {version!r} is not supported; this trainer reads versions 1..{CONFIG_VERSION} "
            "(update the extension to read newer configs)"
        )
    while version < CONFIG_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
        data["version"] = version
    return build(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-dict form of a config (nested dataclasses become dicts)."""
    return dataclasses.asdict(config)


def to_json(config: Any) -> str:
    """Stable JSON form of a config, as embedded in saved files' metadata."""
    return json.dumps(to_dict(config), sort_keys=True)


def check_range(field: str, value: float, low: float | None, high: float | None, hint: str = "") -> None:
    """Raise a ConfigError naming ``field`` when ``value`` is outside [low, high]."""
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (
            f"between {low} and {high}"
            if low is not None and high is not None
            else (f"at least {low}" if low is not None else f"at most {high}")
        )
        raise ConfigError(f"{field} must be {bounds}, but is {value!r}" + (f"; {hint}" if hint else ""), field=field)


def check_choice(field: str, value: str, choices: typing.Iterable[str]) -> None:
    """Raise a ConfigError naming ``field`` when ``value`` is not one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{field} must be one of {', '.join(choices)}, but is {value!r}", field=field)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _has_no_default(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(f"{path} must be one of {', '.join(map(repr, choices))}, but is {value!r}", field=path)
        return value
    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be an object (a dict), but is {type(value).__name__}", field=path)
        return build(hint, value, path)
    return _coerce_scalar(hint, value, path)


def _coerce_scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{path} must be of type {hint.__name__}, but is {value!r} ({type(value).__name__})", field=path)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images are and how prompts are made from them."""

    data_dir: str = ""
    template: str = "subject_filewords"  # a built-in template name or the path of a .txt template
    width: int = 512
    height: int = 512
    caption_extension: str = ".txt"
    missing_caption: Literal["error", "filename", "empty"] = "error"
    shuffle_tags: bool = False
    keep_tags: int = 0
    tag_dropout: float = 0.0
    latent_sampling: Literal["once", "deterministic", "random"] = "once"
    caption_dropout: float = 0.0  # probability that an image is trained with an empty caption
    trigger_word: str = ""  # put in front of every caption (e.g. the LoRA's activation word)
    flip: bool = False  # also train on horizontally mirrored images (latents cached for both)
    buckets: bool = False  # aspect-ratio buckets of about width x height pixels instead of one fixed size
    bucket_min_side: int = 256
    bucket_max_side: int = 1024
    bucket_step: int = 64
    bucket_no_upscale: bool = False
    alpha_mask: bool = False  # images with transparency: transparent pixels do not count in the loss
    reg_dir: str = ""  # regularisation (class) images, captioned or in kohya N_class folders
    prior_loss_weight: float = 1.0  # loss weight of the regularisation images
    latent_cache: Literal["memory", "disk"] = "memory"  # disk: reuse latents across runs (keyed by file + model)

    def __post_init__(self) -> None:
        if not self.data_dir.strip():
            raise ConfigError(
                "data.data_dir is empty; give the folder that holds the training images", field="data.data_dir"
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            check_range(f"data.{name}", value, 64, 4096)
            if value % 64:
                raise ConfigError(
                    f"data.{name} must be a multiple of 64, but is {value}; try {round(value / 64) * 64}",
                    field=f"data.{name}",
                )
        if not self.caption_extension.startswith(".") or len(self.caption_extension) < 2:
            raise ConfigError(
                f"data.caption_extension must start with a dot, like '.txt', but is {self.caption_extension!r}",
                field="data.caption_extension",
            )
        check_range("data.keep_tags", self.keep_tags, 0, None)
        check_range("data.tag_dropout", self.tag_dropout, 0.0, 0.95)
        check_range("data.caption_dropout", self.caption_dropout, 0.0, 1.0)
        check_range("data.prior_loss_weight", self.prior_loss_weight, 0.0, 100.0)
        check_range("data.bucket_min_side", self.bucket_min_side, 64, 4096)
        check_range(
            "data.bucket_max_side",
            self.bucket_max_side,
            self.bucket_min_side,
            4096,
            "it must be at least data.bucket_min_side",
        )
        first = -(-self.bucket_min_side // max(self.bucket_step, 1)) * max(self.bucket_step, 1)
        if self.buckets and (first**2 > self.width * self.height or first > self.bucket_max_side):
            raise ConfigError(
                f"data.bucket_min_side {self.bucket_min_side} leaves no bucket within {self.width}x{self.height} "
                f"pixels; lower it to at most {int((self.width * self.height) ** 0.5) // 64 * 64}",
                field="data.bucket_min_side",
            )
        if self.bucket_step % 64 or self.bucket_step <= 0:
            raise ConfigError(
                f"data.bucket_step must be a positive multiple of 64, but is {self.bucket_step}",
                field="data.bucket_step",
            )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: steps, batches, learning rate, precision, saving and previews."""

    steps: int = 1000
    batch_size: int = 1
    gradient_accumulation: int = 1
    learning_rate: str = "0.005"  # a number, or the WebUI's schedule syntax "0.005:100, 1e-3:1000, 1e-5"
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = 0
    optimizer: Literal["adamw"] = "adamw"
    weight_decay: float = 0.0
    clip_grad: Literal["off", "norm", "value"] = "off"
    clip_grad_value: float = 1.0
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    seed: int = 0
    clip_skip: int = 1
    save_every: int = 500  # 0 = only at the end
    preview_every: int = 500  # 0 = never
    noise_offset: float = 0.0  # Guttenberg's offset noise: adds offset * N(0, 1) per channel
    min_snr_gamma: float = 0.0  # Min-SNR-gamma loss weighting (Hang et al. 2023); 0 = off

    def __post_init__(self) -> None:
        check_range("train.steps", self.steps, 1, 10_000_000)
        check_range("train.batch_size", self.batch_size, 1, 1024)
        check_range("train.gradient_accumulation", self.gradient_accumulation, 1, 1024)
        check_range("train.lr_warmup_steps", self.lr_warmup_steps, 0, None)
        check_range("train.weight_decay", self.weight_decay, 0.0, 10.0)
        check_range("train.clip_grad_value", self.clip_grad_value, 1e-12, None)
        check_range("train.clip_skip", self.clip_skip, 1, 12)
        check_range("train.save_every", self.save_every, 0, None)
        check_range("train.preview_every", self.preview_every, 0, None)
        check_range("train.noise_offset", self.noise_offset, 0.0, 1.0)
        check_range("train.min_snr_gamma", self.min_snr_gamma, 0.0, 100.0)
        from lib_trainer.loop.schedules import parse_learning_rate

        segments = parse_learning_rate(self.learning_rate)
        if len(segments) > 1 and self.lr_schedule != "constant":
            raise ConfigError(
                f"train.learning_rate {self.learning_rate!r} is a stepped schedule, which already decides the rate "
                f"at every step; set train.lr_schedule to 'constant' (it is {self.lr_schedule!r}) or give one number",
                field="train.lr_schedule",
            )


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def json_schema(cls: type) -> dict[str, Any]:
    """JSON Schema of a config dataclass (for the API docs and the UI/API drift test)."""
    hints = typing.get_type_hints(cls)
    properties, required = {}, []
    for f in dataclasses.fields(cls):
        properties[f.name] = _schema_of(hints[f.name])
        if _has_no_default(f):
            required.append(f.name)
        elif f.default is not dataclasses.MISSING:
            properties[f.name]["default"] = f.default
    schema: dict[str, Any] = {
        "type": "object",
        "title": cls.__name__,
        "properties": properties,
        "additionalProperties": False,
    }
    if cls.__doc__:
        schema["description"] = cls.__doc__.strip().splitlines()[0]
    if required:
        schema["required"] = required
    return schema


def _schema_of(hint: Any) -> dict[str, Any]:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(hint) if a is not type(None)]
        return {**_schema_of(inner[0]), "nullable": True}
    if origin is Literal:
        return {"type": "string", "enum": list(get_args(hint))}
    if dataclasses.is_dataclass(hint):
        return json_schema(hint)
    return {"type": _JSON_TYPES.get(hint, "string")}
