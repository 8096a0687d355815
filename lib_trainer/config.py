"""Configuration: frozen dataclasses built from plain dicts (JSON), validated, versioned.

``build(cls, data)`` is the one way in from the UI, the API or a saved file: unknown keys are
rejected with the valid ones listed, values are type-checked, nested configs are built the same
way, and old config versions are upgraded through ``MIGRATIONS`` first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

from lib_trainer.errors import ConfigError

CONFIG_VERSION = 1
T = TypeVar("T")
PathKind = Literal["dir", "file", "out_dir", "template"]

# version N -> function upgrading a version-N dict to version N+1 (none yet: version 1 is the first)
MIGRATIONS: dict[int, typing.Callable[[dict[str, Any]], dict[str, Any]]] = {}


def build(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``; reject unknown keys and values of the wrong type."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"{path or cls.__name__} must be an object (a dict), but is {type(data).__name__}", field=path or None
        )
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(_join(path, str(k)) for k in unknown)}; "
            f"valid settings here are: {', '.join(sorted(fields))}",
            field=_join(path, str(unknown[0])),
        )
    for name, value in data.items():  # a section given in part keeps the method's own defaults for the rest
        if isinstance(value, dict) and fields[name].default_factory is not dataclasses.MISSING:
            defaults = fields[name].default_factory()
            if dataclasses.is_dataclass(defaults):
                own = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults) if f.init}
                data[name] = {**own, **value}
    kwargs = {name: _coerce(hints[name], value, _join(path, name)) for name, value in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and _has_no_default(f)]
    if missing:
        raise ConfigError(
            f"missing required setting(s): {', '.join(_join(path, m) for m in missing)}", field=_join(path, missing[0])
        )
    return cls(**kwargs)


def build_versioned(cls: type[T], data: dict[str, Any]) -> T:
    """Upgrade ``data`` to the current config version, then ``build`` it."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be an object (a dict), but is {type(data).__name__}", field="config")
    data = dict(data)
    version = data.get("version", CONFIG_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1 or version > CONFIG_VERSION:
        raise ConfigError(
            f"config version {version!r} is not supported; this trainer reads versions 1..{CONFIG_VERSION} "
            "(update the extension to read newer configs)",
            field="version",
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


def setting(
    default: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    hint: str = "",
    path: PathKind | None = None,
    free_text: bool = False,
) -> Any:
    """A config field with its rules declared where it is defined.

    ``low``/``high`` bound numbers (checked by ``check_settings``, and used by the bad-input tests); ``path``
    marks a file-system path the host may confine ("dir", "file", "out_dir", or "template": a built-in name or
    a file); ``free_text`` marks text where any string is valid (a prompt, a trigger word).
    """
    meta = {"low": low, "high": high, "hint": hint, "path": path, "free_text": free_text}
    return dataclasses.field(default=default, metadata=meta)


def check_settings(config: Any, section: str) -> None:
    """Check every field's declared bounds (``setting(low=, high=)``); errors name ``<section>.<field>``."""
    for f in dataclasses.fields(config):
        low, high = f.metadata.get("low"), f.metadata.get("high")
        if low is None and high is None:
            continue
        value = getattr(config, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            check_range(_join(section, f.name), value, low, high, f.metadata.get("hint", ""))


def path_settings(config: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(field path, kind, value)`` for every non-empty path setting of a config, nested configs included."""
    found = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            found += path_settings(value, _join(prefix, f.name))
        elif isinstance(value, tuple) and value and all(dataclasses.is_dataclass(v) for v in value):
            for i, item in enumerate(value):
                found += path_settings(item, _join(prefix, f"{f.name}.{i}"))
        elif f.metadata.get("path") and isinstance(value, str) and value.strip():
            found.append((_join(prefix, f.name), f.metadata["path"], value))
    return found


def check_range(field: str, value: float, low: float | None, high: float | None, hint: str = "") -> None:
    """Raise a ConfigError naming ``field`` when ``value`` is outside [low, high] (or not a finite number)."""
    if (
        (isinstance(value, float) and not math.isfinite(value))
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        bounds = (
            f"between {low} and {high}"
            if low is not None and high is not None
            else (f"at least {low}" if low is not None else f"at most {high}")
        )
        raise ConfigError(f"{field} must be {bounds}, but is {value!r}" + (f"; {hint}" if hint else ""), field=field)


def check_multiple(field: str, value: int, step: int) -> None:
    """Raise a ConfigError naming ``field`` when ``value`` is not a multiple of ``step``."""
    if value % step:
        raise ConfigError(
            f"{field} must be a multiple of {step}, but is {value}; try {max(step, round(value / step) * step)}",
            field=field,
        )


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
        for arm in inner[:-1]:  # the first arm the value fits (e.g. a learning rate: text or a number)
            try:
                return _coerce(arm, value, path)
            except ConfigError:
                continue
        return _coerce(inner[-1], value, path)
    if origin is Literal:
        choices = get_args(hint)
        if isinstance(value, (list, dict)) or value not in choices:
            raise ConfigError(f"{path} must be one of {', '.join(map(repr, choices))}, but is {value!r}", field=path)
        return value
    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be an object (a dict), but is {type(value).__name__}", field=path)
        return build(hint, value, path)
    if origin in (list, tuple):  # a list setting (e.g. DreamBooth's concepts), kept as a tuple: configs are frozen
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, but is {type(value).__name__}", field=path)
        (item,) = get_args(hint)[:1]
        return tuple(_coerce_item(item, v, f"{path}.{i}") for i, v in enumerate(value))
    return _coerce_scalar(hint, value, path)


def _coerce_item(hint: Any, value: Any, path: str) -> Any:
    """One list item; an item's own checks name their field relative to it, so their errors get its path."""
    try:
        return _coerce(hint, value, path)
    except ConfigError as exc:
        if exc.field is None or exc.field.startswith(path):
            raise
        raise type(exc)(f"{path}.{exc}", field=f"{path}.{exc.field}") from None


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
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            if "\x00" in value:
                raise ConfigError(f"{path} contains a NUL character; remove it", field=path)
            return value
    else:
        return value
    name = {bool: "a boolean (true/false)", int: "a whole number", float: "a finite number", str: "text"}[hint]
    raise ConfigError(f"{path} must be {name}, but is {value!r} ({type(value).__name__})", field=path)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images are and how prompts are made from them."""

    SECTION: ClassVar[str] = "data"

    data_dir: str = setting("", path="dir")
    template: str = setting("subject_filewords", path="template")  # a built-in template name or a .txt path
    width: int = setting(512, low=64, high=4096)
    height: int = setting(512, low=64, high=4096)
    caption_extension: str = ".txt"
    missing_caption: Literal["error", "filename", "empty"] = "error"
    shuffle_tags: bool = False
    keep_tags: int = setting(0, low=0, high=1000)
    tag_dropout: float = setting(0.0, low=0.0, high=0.95)
    latent_sampling: Literal["once", "deterministic", "random"] = "once"
    caption_dropout: float = setting(0.0, low=0.0, high=1.0)  # probability that an image trains with no caption
    trigger_word: str = setting("", free_text=True)  # put in front of every caption (e.g. the LoRA's activation word)
    flip: bool = False  # also train on horizontally mirrored images (latents cached for both)
    buckets: bool = False  # aspect-ratio buckets of about width x height pixels instead of one fixed size
    bucket_min_side: int = setting(256, low=64, high=4096)
    bucket_max_side: int = setting(1024, low=64, high=4096)
    bucket_step: int = setting(64, low=64, high=1024)
    bucket_no_upscale: bool = False
    alpha_mask: bool = False  # images with transparency: transparent pixels do not count in the loss
    reg_dir: str = setting("", path="dir")  # regularisation (class) images, captioned or in kohya N_class folders
    prior_loss_weight: float = setting(1.0, low=0.0, high=100.0)  # loss weight of the regularisation images
    latent_cache: Literal["memory", "disk"] = "memory"  # disk: reuse latents across runs (keyed by file + model)

    def __post_init__(self) -> None:
        check_settings(self, self.SECTION)
        self._check_folders()
        for name in ("width", "height", "bucket_step"):
            check_multiple(f"data.{name}", getattr(self, name), 64)
        if not re.fullmatch(r"\.[A-Za-z0-9_-]{1,16}", self.caption_extension):
            raise ConfigError(
                f"data.caption_extension must be a dot and up to 16 letters or digits, like '.txt' or '.caption', "
                f"but is {self.caption_extension!r}",
                field="data.caption_extension",
            )
        check_range(
            "data.bucket_max_side",
            self.bucket_max_side,
            self.bucket_min_side,
            4096,
            "it must be at least data.bucket_min_side",
        )
        first = -(-self.bucket_min_side // self.bucket_step) * self.bucket_step
        if self.buckets and (first**2 > self.width * self.height or first > self.bucket_max_side):
            raise ConfigError(
                f"data.bucket_min_side {self.bucket_min_side} leaves no bucket within {self.width}x{self.height} "
                f"pixels; lower it to at most {int((self.width * self.height) ** 0.5) // 64 * 64}",
                field="data.bucket_min_side",
            )

    def _check_folders(self) -> None:
        if not self.data_dir.strip():
            raise ConfigError(
                "data.data_dir is empty; give the folder that holds the training images", field="data.data_dir"
            )


PER_CONCEPT = ("data_dir", "template", "trigger_word", "reg_dir", "prior_loss_weight")  # DreamBooth: per concept


def _shared_post_init(self) -> None:
    self.for_folder("concept")  # DataConfig's own checks, with a stand-in folder


def _for_folder(self, data_dir: str, reg_dir: str = "", prior_loss_weight: float = 1.0) -> DataConfig:
    """A plain DataConfig of these rules for one concept's folder (prompts come from the concept)."""
    values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return DataConfig(
        **values,
        data_dir=data_dir,
        template="none",
        trigger_word="",
        reg_dir=reg_dir,
        prior_loss_weight=prior_loss_weight,
    )


# The dataset rules of a run whose folders and prompts come per concept (DreamBooth): DataConfig's settings
# without the folder, template, trigger word and regularisation folder, which each concept gives instead.
SharedDataConfig = dataclasses.make_dataclass(
    "SharedDataConfig",
    [
        (f.name, typing.get_type_hints(DataConfig)[f.name], dataclasses.field(default=f.default, metadata=f.metadata))
        for f in dataclasses.fields(DataConfig)
        if f.name not in PER_CONCEPT
    ],
    namespace={
        "SECTION": "data",
        "__post_init__": _shared_post_init,
        "for_folder": _for_folder,
        "__doc__": "The dataset rules shared by every concept (folders and prompts are per concept).",
    },
    frozen=True,
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: steps, batches, learning rate, precision, saving and previews."""

    SECTION: ClassVar[str] = "train"

    steps: int = setting(1000, low=1, high=10_000_000)
    batch_size: int = setting(1, low=1, high=1024)
    gradient_accumulation: int = setting(1, low=1, high=1024)
    # a number, or the WebUI's schedule syntax "0.005:100, 1e-3:1000, 1e-5" (numbers are stored as text)
    learning_rate: str | float = "0.005"
    lr_schedule: Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial"] = "constant"
    lr_warmup_steps: int = setting(0, low=0, high=10_000_000)
    lr_cycles: int = setting(1, low=1, high=1000)  # cosine_with_restarts: how many cosine cycles (hard restarts)
    lr_power: float = setting(1.0, low=0.1, high=10.0)  # polynomial: rate x (1 - progress) ** power
    # loop/optimizers.py: adamw8bit (bitsandbytes, CUDA), lion, prodigy, adamw_schedulefree need optional packages
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "sgd", "lion", "prodigy", "adamw_schedulefree"] = "adamw"
    optimizer_args: str = ""  # key=value items passed to the optimizer, e.g. "betas=(0.9,0.99) eps=1e-6"
    weight_decay: float = setting(0.0, low=0.0, high=10.0)
    clip_grad: Literal["off", "norm", "value"] = "off"
    clip_grad_value: float = setting(1.0, low=1e-12, high=1e6)
    # full_bf16: the UNet's weights stored in bf16 for the run (restored exactly) and the trained parameters in
    # bf16 with fp32 masters: no weight casts under autocast (less memory, faster); TI and LoRA/LyCORIS
    mixed_precision: Literal["auto", "no", "fp16", "bf16", "full_bf16"] = "auto"
    gradient_checkpointing: bool = False  # recompute UNet-block (and trained text-encoder) activations: less memory
    # sdpa: train attention with torch's scaled_dot_product_attention (flash / memory-efficient kernels) whatever
    # the WebUI's optimisation for inference (xformers stays if the WebUI uses it); host: the WebUI's own forward
    attention: Literal["sdpa", "host"] = "sdpa"
    # when the text encoder does not train and captions never change (no tag shuffle / drop-out): encode every
    # prompt once before training instead of at every step
    cache_text_encoder_outputs: bool = True
    offload_idle_models: bool = True  # CUDA: the VAE (and a cached text encoder) wait on the CPU while the UNet trains
    compile: bool = False  # torch.compile the UNet forward (slow first steps; faster after on recent GPUs)
    seed: int = setting(0, low=0, high=2**32 - 1)
    clip_skip: int = setting(0, low=0, high=12, hint="0 uses the WebUI's Clip skip setting")  # 0 = the host's
    save_every: int = setting(500, low=0, high=10_000_000)  # 0 = only at the end
    preview_every: int = setting(500, low=0, high=10_000_000)  # 0 = never
    noise_offset: float = setting(0.0, low=0.0, high=1.0)  # Guttenberg's offset noise: offset * N(0, 1) per channel
    min_snr_gamma: float = setting(0.0, low=0.0, high=100.0)  # Min-SNR-gamma weighting (Hang et al. 2023); 0 = off

    def __post_init__(self) -> None:
        if not isinstance(self.learning_rate, str):  # a plain number: kept as text like the schedule syntax
            object.__setattr__(self, "learning_rate", repr(float(self.learning_rate)))
        check_settings(self, self.SECTION)
        from lib_trainer.loop.optimizers import parse_optimizer_args
        from lib_trainer.loop.schedules import parse_learning_rate

        parse_optimizer_args(self.optimizer_args)
        segments = parse_learning_rate(self.learning_rate)
        if self.optimizer == "prodigy" and max(rate for rate, _ in segments) < 0.1:
            raise ConfigError(
                f"train.learning_rate {self.learning_rate!r} is far below 1 with train.optimizer 'prodigy', which "
                "estimates the step size itself and multiplies it by the learning rate; use 1.0 (0.5: gentler)",
                field="train.learning_rate",
            )
        if len(segments) > 1 and self.lr_schedule != "constant":
            raise ConfigError(
                f"train.learning_rate {self.learning_rate!r} is a stepped schedule, which already decides the rate "
                f"at every step; set train.lr_schedule to 'constant' (it is {self.lr_schedule!r}) or give one number",
                field="train.lr_schedule",
            )


@dataclasses.dataclass(frozen=True)
class PreviewConfig:
    """Preview images during training, rendered by the host's txt2img (``[name]`` stands for what is trained)."""

    SECTION: ClassVar[str] = "preview"

    enabled: bool = True
    prompt: str = setting("a photo of [name]", free_text=True)
    negative_prompt: str = setting("", free_text=True)
    steps: int = setting(20, low=1, high=150)
    sampler: str = "Euler a"  # checked against the host's sampler list when a job is submitted
    cfg_scale: float = setting(7.0, low=1.0, high=30.0)
    seed: int = setting(-1, low=-1, high=2**32 - 1, hint="-1 = a random seed for every preview")
    width: int = setting(512, low=64, high=2048)
    height: int = setting(512, low=64, high=2048)

    def __post_init__(self) -> None:
        check_settings(self, self.SECTION)
        for name in ("width", "height"):
            check_multiple(f"preview.{name}", getattr(self, name), 8)
        if not self.sampler.strip():
            raise ConfigError("preview.sampler is empty; pick a sampler such as 'Euler a'", field="preview.sampler")

    @classmethod
    def from_dict(cls, data: dict | None) -> PreviewConfig:
        """Build from the job's ``preview`` object (an empty or missing one gives the defaults)."""
        return build(cls, data, "preview")


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
        schema = _schema_of(inner[0]) if len(inner) == 1 else {"anyOf": [_schema_of(a) for a in inner]}
        return {**schema, "nullable": True} if type(None) in get_args(hint) else schema
    if origin is Literal:
        return {"type": "string", "enum": list(get_args(hint))}
    if dataclasses.is_dataclass(hint):
        return json_schema(hint)
    if origin in (list, tuple):
        return {"type": "array", "items": _schema_of(get_args(hint)[0])}
    return {"type": _JSON_TYPES.get(hint, "string")}
