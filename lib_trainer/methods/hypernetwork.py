"""Hypernetworks in the WebUI's own format: per attention width, a module pair transforming key/value inputs.

Applied as the WebUI applies them at inference: for every ldm attention layer, the pair for the width of its
context (cross-attention: the text encoder's width; self-attention: the feature width) transforms the inputs
of ``to_k`` and ``to_v`` (``x + f(x) * multiplier``). We do that with forward pre-hooks on those two
projections, removed when training ends, so the host model is never left changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lib_trainer.config import CONFIG_VERSION, DataConfig, TrainConfig, build_versioned, setting, to_json
from lib_trainer.data.dataset import check_image_folders, load_training_set
from lib_trainer.data.templates import load_template
from lib_trainer.errors import ConfigError, FormatError
from lib_trainer.formats.files import check_name, path_in
from lib_trainer.formats.hypernetwork import (
    HypernetworkModule,
    Structure,
    activations,
    hypernetwork_dict,
    initialize,
    read_hypernetwork,
    save_hypernetwork,
    structure_of,
)
from lib_trainer.loop.checkpoint import ResumeState, find_resume_state, save_sidecar, tensors_checksum
from lib_trainer.loop.hooks import TrainingHooks
from lib_trainer.loop.optimizers import check_optimizer
from lib_trainer.loop.precision import resolve_precision
from lib_trainer.loop.schedules import parse_learning_rate
from lib_trainer.loop.train import Objective, TrainResult
from lib_trainer.methods.common import check_log_folder, check_total_steps, resumed_step, train_on_dataset
from lib_trainer.models.parts import ModelParts

RISKY_LR = 1e-4


def _numbers(text: str, field: str) -> list[float]:
    try:
        values = [float(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"{field} {text!r} is not a comma-separated list of numbers, like '1, 2, 1'", field) from None
    if not values:
        raise ConfigError(f"{field} is empty; write a comma-separated list like '1, 2, 1'", field)
    return values


@dataclass(frozen=True)
class HypernetworkSpec:
    """A new hypernetwork's layout (the WebUI's create options)."""

    SECTION: ClassVar[str] = "hypernetwork"

    name: str = ""
    # context widths: 768 (SD1 text), 1024 (SD2 text), 2048 (SDXL text), 320/640/1280 (features); "auto": the
    # loaded model's text width and the feature widths 320/640/1280 it has (the WebUI's create default, per model)
    sizes: str = "auto"
    layer_structure: str = "1, 2, 1"
    activation: str = "linear"
    weight_init: Literal["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"] = "Normal"
    layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: str = ""  # e.g. "0, 0.3, 0"; empty: from use_dropout / last_layer_dropout
    last_layer_dropout: bool = False
    activate_output: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "hypernetwork.name")
        if self.name == "None":
            raise ConfigError(
                "hypernetwork.name 'None' is never listed by the WebUI; choose another", "hypernetwork.name"
            )
        structure = self.structure()
        ls = structure.layer_structure
        if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1 or any(x <= 0 for x in ls):
            raise ConfigError(
                f"hypernetwork.layer_structure {self.layer_structure!r} must start and end with 1 and "
                "have positive sizes, like '1, 2, 1'",
                "hypernetwork.layer_structure",
            )
        if self.activation not in activations():
            raise ConfigError(
                f"hypernetwork.activation {self.activation!r} is unknown; use one of "
                f"{', '.join(sorted(activations()))}",
                "hypernetwork.activation",
            )
        ds = structure.dropout_structure
        if len(ds) != len(ls):
            raise ConfigError(
                f"hypernetwork.dropout_structure {self.dropout_structure!r} has {len(ds)} values but the "
                f"layer structure has {len(ls)}; give one value per layer",
                "hypernetwork.dropout_structure",
            )
        if ds[0] != 0 or ds[-1] != 0 or any(not 0 <= p < 1 for p in ds):
            raise ConfigError(
                f"hypernetwork.dropout_structure {self.dropout_structure!r} must start and end with 0 and "
                "hold probabilities in [0, 1)",
                "hypernetwork.dropout_structure",
            )
        if not self.auto_sizes:
            self.size_list()

    @property
    def auto_sizes(self) -> bool:
        """Whether the sizes follow the model (``"auto"``)."""
        return self.sizes.strip().lower() == "auto"

    def size_list(self) -> list[int]:
        """The enabled widths as integers (``"auto"`` is resolved against the model first: ``for_model``)."""
        if self.auto_sizes:
            raise ConfigError("hypernetwork.sizes 'auto' needs a loaded model", "hypernetwork.sizes")
        sizes = _numbers(self.sizes, "hypernetwork.sizes")
        if any(s != int(s) or s <= 0 for s in sizes):
            raise ConfigError(f"hypernetwork.sizes {self.sizes!r} must be positive whole numbers", "hypernetwork.sizes")
        return sorted({int(s) for s in sizes}, key=sizes.index)

    def structure(self) -> Structure:
        """The module layout this spec describes."""
        ls = _numbers(self.layer_structure, "hypernetwork.layer_structure")
        if self.dropout_structure.strip():
            ds = _numbers(self.dropout_structure, "hypernetwork.dropout_structure")
        elif self.use_dropout:  # the WebUI's parse_dropout_structure
            ds = [0.0] + [0.3] * (len(ls) - 3) + [0.3 if self.last_layer_dropout else 0.0, 0.0]
        else:
            ds = [0.0] * len(ls)
        return Structure(ls, self.activation, self.weight_init, self.layer_norm, ds, self.activate_output)


@dataclass(frozen=True)
class HypernetworkConfig:
    """Everything a hypernetwork run needs."""

    hypernetwork: HypernetworkSpec
    data: DataConfig
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(learning_rate="1e-5"))
    resume_from: str = setting("", path="file")  # start from this .pt instead of <name>.pt in the hypernetworks folder
    version: int = CONFIG_VERSION

    @classmethod
    def from_dict(cls, data: dict) -> HypernetworkConfig:
        """Build from a plain dict (UI, API, saved metadata), upgrading old versions."""
        return build_versioned(cls, data)


@dataclass(frozen=True)
class OutputPaths:
    """The host's hypernetworks folder and the run-log folder."""

    hypernetwork_dir: Path
    log_dir: Path


def attention_widths(parts: ModelParts) -> set[int]:
    """Widths of every attention layer's key/value input in this model (what hypernetwork sizes may be)."""
    return {m.to_k.in_features for m in _attentions(parts.unet)}


def for_model(spec: HypernetworkSpec, parts: ModelParts) -> HypernetworkSpec:
    """``spec`` with sizes "auto" resolved: the text width (cross-attention's context: 768 SD1, 1024 SD2, 2048
    SDXL) and the feature widths 320/640/1280 this model has (the WebUI's create default, per model)."""
    if not spec.auto_sizes:
        return spec
    widths, text = attention_widths(parts), parts.text_encoder.dim
    sizes = [text] + [w for w in (320, 640, 1280) if w in widths and w != text]
    return dataclasses.replace(spec, sizes=", ".join(map(str, sizes)))


def _attentions(unet: nn.Module) -> list[nn.Module]:
    return [m for m in unet.modules() if all(hasattr(m, a) for a in ("to_q", "to_k", "to_v", "to_out"))]


class Hypernetwork:
    """Module pairs per width, their layout, and how they hook into the model."""

    def __init__(self, structure: Structure, layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]]):
        self.structure, self.layers = structure, layers

    @classmethod
    def create(cls, spec: HypernetworkSpec, seed: int = 0) -> Hypernetwork:
        """Fresh modules initialised as the WebUI does, from ``seed`` (the host's random state is left alone)."""
        structure, generator = spec.structure(), torch.Generator().manual_seed(seed)
        layers = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # torch.nn.init's Xavier/Kaiming draw from the global generator
            for size in spec.size_list():
                pair = (HypernetworkModule(size, structure), HypernetworkModule(size, structure))
                for module in pair:
                    initialize(module, structure.weight_init, structure.activation_func, generator)
                layers[size] = pair
        return cls(structure, layers)

    @classmethod
    def from_dict(cls, data: dict[Any, Any], source: str) -> Hypernetwork:
        """Modules rebuilt from a hypernetwork dict (the layout decides the Sequential)."""
        structure = structure_of(data)
        layers = {}
        for size, pair in ((k, v) for k, v in data.items() if isinstance(k, int)):
            modules = (HypernetworkModule(size, structure), HypernetworkModule(size, structure))
            for module, state in zip(modules, pair, strict=True):
                try:
                    module.load_state_dict({k: v.float() for k, v in state.items()})
                except RuntimeError as exc:
                    raise FormatError(
                        f"{source}: the {size} layers do not fit their recorded structure ({exc})"
                    ) from exc
            layers[size] = modules
        return cls(structure, layers)

    def modules(self) -> list[HypernetworkModule]:
        """Every module (k and v for each width)."""
        return [m for pair in self.layers.values() for m in pair]

    def parameters(self) -> list[torch.Tensor]:
        """Every trainable tensor."""
        return [p for m in self.modules() for p in m.parameters()]

    def to(self, device: torch.device) -> Hypernetwork:
        """Move the modules."""
        for module in self.modules():
            module.to(device)
        return self

    def set_mode(self, training: bool, multiplier: float = 1.0) -> None:
        """Train/eval mode and the inference multiplier of every module."""
        for module in self.modules():
            module.train(training)
            module.multiplier = multiplier

    @contextlib.contextmanager
    def attached(self, unet: nn.Module) -> Iterator[None]:
        """Pre-hooks on every attention's to_k / to_v whose input width has a module pair; removed on exit."""
        handles = []
        try:
            for attention in _attentions(unet):
                pair = self.layers.get(attention.to_k.in_features)
                if pair is None:
                    continue
                handles.append(attention.to_k.register_forward_pre_hook(_transform_input(pair[0])))
                handles.append(attention.to_v.register_forward_pre_hook(_transform_input(pair[1])))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _transform_input(module: HypernetworkModule):
    def hook(_layer: nn.Module, inputs: tuple) -> tuple:
        x = inputs[0]
        return (module(x.float()).to(x.dtype), *inputs[1:])  # computed in fp32, like devices.cond_cast_float

    return hook


class HypernetworkTrainable:
    """The hypernetwork's parameters, attachment and saving for the training loop."""

    fixed_condition = True  # the modules act on the UNet's attention inputs: text-encoder outputs may be cached

    def __init__(
        self, config: HypernetworkConfig, parts: ModelParts, paths: OutputPaths, net: Hypernetwork, start_step: int
    ):
        self.config, self.parts, self.paths, self.net = config, parts, paths, net.to(parts.device)
        self.name = config.hypernetwork.name
        self.start_step, self.resume = start_step, None
        self.main_path = path_in(paths.hypernetwork_dir, f"{self.name}.pt")
        self.run_dir = paths.log_dir / self.name

    def parameters(self) -> list[torch.Tensor]:
        """Every module's weights."""
        return self.net.parameters()

    def attach(self, parts: ModelParts) -> contextlib.AbstractContextManager:
        """Hook the attention inputs for the run (training mode: dropout on, multiplier 1)."""
        self.net.set_mode(True)
        for p in self.parameters():
            p.requires_grad_(True)
        return self.net.attached(parts.unet)

    @contextlib.contextmanager
    def for_preview(self) -> Iterator[None]:
        """While the host renders previews: hooks stay on, modules in eval mode with multiplier 1."""
        self.net.set_mode(False)
        try:
            yield
        finally:
            self.net.set_mode(True)

    def condition(self, parts: ModelParts, prompts: list[str]) -> torch.Tensor:
        """Plain prompt conditioning."""
        return parts.condition(prompts)

    def file_dict(self, step: int) -> dict[Any, Any]:
        """The WebUI's dict for the current weights."""
        p = self.parts
        return hypernetwork_dict(
            self.net.layers,
            self.net.structure,
            self.name,
            step,
            p.model_hash,
            p.model_name,
            f"trained with sd-webui-trainer; config: {to_json(self.config)}",
        )

    def save(self, step: int, resume: ResumeState) -> list[Path]:
        """Numbered copy in the run folder, the resume sidecar, then the main ``.pt`` (+ a .safetensors copy)."""
        data, meta = self.file_dict(step), {"trainer": "sd-webui-trainer", "trainer_config": to_json(self.config)}
        numbered = numbered_path(self.paths, self.name, step)
        written = save_hypernetwork(numbered, data, meta)
        save_sidecar(self.main_path, resume, _checksum_of(numbered))  # read back: checked as written
        written += save_hypernetwork(self.main_path, data, meta)
        return written


def create_hypernetwork(spec: HypernetworkSpec, parts: ModelParts, hypernetwork_dir: Path, seed: int = 0) -> Path:
    """Write a new hypernetwork file (step 0); refuse an existing one unless ``overwrite``."""
    spec = for_model(spec, parts)
    _check_sizes(spec, parts)
    path = path_in(hypernetwork_dir, f"{spec.name}.pt")
    if path.exists() and not spec.overwrite:
        raise ConfigError(
            f"{path} already exists; turn on hypernetwork.overwrite or choose another name", "hypernetwork.name"
        )
    net = Hypernetwork.create(spec, seed)
    data = hypernetwork_dict(net.layers, net.structure, spec.name, 0, parts.model_hash, parts.model_name, None)
    save_hypernetwork(path, data, {"trainer": "sd-webui-trainer"})
    return path


def _check_sizes(spec: HypernetworkSpec, parts: ModelParts) -> None:
    widths = attention_widths(parts)
    missing = [s for s in spec.size_list() if s not in widths]
    if missing:
        raise ConfigError(
            f"hypernetwork.sizes {missing} do not occur in this model's attention layers; this model "
            f"has {', '.join(map(str, sorted(widths)))}",
            "hypernetwork.sizes",
        )


def numbered_path(paths: OutputPaths, name: str, step: int) -> Path:
    """The run folder's copy of the hypernetwork at ``step``."""
    return paths.log_dir / name / "hypernetworks" / f"{name}-{step}.pt"


def _checksum_of(path: Path) -> str:
    return tensors_checksum(Hypernetwork.from_dict(read_hypernetwork(path), path.name).parameters())


def check(config: HypernetworkConfig, parts: ModelParts, paths: OutputPaths) -> None:
    """Everything knowable before training, without loading the images (run when a job is queued and at its start)."""
    check_log_folder(paths.log_dir, paths.hypernetwork_dir, "hypernetwork")
    resolve_precision(
        config.train.mixed_precision, parts.device, "hypernetwork modules compute in fp32 as in the WebUI; use 'bf16'"
    )
    check_optimizer(config.train.optimizer, parts.device, config.train.optimizer_args)
    load_template(config.data.template)
    check_image_folders(config.data)
    _, start_step, _ = _starting_point(config, parts, paths)
    check_total_steps(start_step, config, f"hypernetwork {config.hypernetwork.name!r}")


def _starting_point(
    config: HypernetworkConfig, parts: ModelParts, paths: OutputPaths
) -> tuple[Hypernetwork, int, Path | None]:
    """The hypernetwork to train (read from ``resume_from`` or ``<name>.pt``, else new), its step, its file."""
    spec, main = (
        for_model(config.hypernetwork, parts),
        path_in(paths.hypernetwork_dir, f"{config.hypernetwork.name}.pt"),
    )
    source = Path(config.resume_from).expanduser() if config.resume_from else main
    if config.resume_from and not source.is_file():
        raise ConfigError(f"resume_from {config.resume_from!r} is not an existing file", "resume_from")
    if source.is_file() and not (source == main and spec.overwrite):
        field = "resume_from" if config.resume_from else "hypernetwork.name"
        data = read_hypernetwork(source, field)
        net = Hypernetwork.from_dict(data, source.name)
        missing = [s for s in net.layers if s not in attention_widths(parts)]
        if missing:
            raise FormatError(
                f"{source.name} has layers for widths {missing} this model does not have "
                "(a hypernetwork for another model family?)",
                field,
            )
        step = data.get("step")
        return net, step if isinstance(step, int) and step > 0 else 0, source
    _check_sizes(spec, parts)
    return Hypernetwork.create(spec, config.train.seed), 0, None


def prepare(config: HypernetworkConfig, parts: ModelParts, paths: OutputPaths, hooks: TrainingHooks):
    """Validate everything before writing; returns the starting hypernetwork, its step, its file and the data."""
    check(config, parts, paths)
    top = max(rate for rate, _ in parse_learning_rate(config.train.learning_rate))
    if top > RISKY_LR:
        hooks.on_warning(
            f"learning rate {top:g} is above {RISKY_LR:g}; hypernetworks often diverge there "
            "(the WebUI's users lose runs to NaN). 1e-5 is a safe start"
        )
    samples, template = load_training_set(config.data, hooks.on_warning)
    net, start_step, source = _starting_point(config, parts, paths)
    return net, start_step, source, samples, template


def train_hypernetwork(
    config: HypernetworkConfig,
    parts: ModelParts,
    paths: OutputPaths,
    hooks: TrainingHooks | None = None,
    objective: Objective | None = None,
) -> TrainResult:
    """Train (or continue) the hypernetwork ``config.hypernetwork.name``."""
    hooks = hooks or TrainingHooks()
    config = dataclasses.replace(config, hypernetwork=for_model(config.hypernetwork, parts))  # saved as resolved
    net, start_step, source, samples, template = prepare(config, parts, paths, hooks)
    trainable = HypernetworkTrainable(config, parts, paths, net, start_step)
    if source is not None:
        trainable.resume = find_resume_state(
            source,
            tensors_checksum(trainable.parameters()),
            lambda step: numbered_path(paths, config.hypernetwork.name, step),
            _checksum_of,
        )
        trainable.start_step = resumed_step(start_step, trainable.resume, hooks)
    data = (samples, template, config.hypernetwork.name)
    return train_on_dataset(config, parts, trainable, data, paths.log_dir, hooks, objective)
