"""LoRA and LyCORIS (LoCon, LoHa, LoKr) on the loaded model, with lycoris-lora's math, saved in kohya format.

lycoris-lora's built-in presets target diffusers class names, which do not exist in the WebUI's ldm UNet, so
a preset naming ldm classes is passed explicitly every time (presets are class-level state). Targets follow
kohya's defaults: every Linear / 1x1 conv inside the UNet's SpatialTransformers (proj_in/out, attn1/attn2
q/k/v/out, ff); with ``conv_rank`` > 0 also the ResBlock, Downsample and Upsample convs; the text encoder's
CLIP attention and MLP, and OpenCLIP's (SD2, SDXL's bigG) through HF-named views of its fused attention
(``models.fused_attention``). The network wraps module forwards (bypass) and never writes into host weights;
detaching restores every wrapped module exactly. UNet keys are saved with kohya's names for the family
(diffusers-style for SD1/SD2, LDM paths for SDXL); text encoders as ``lora_te_`` or SDXL's ``lora_te1_``/``lora_te2_``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lib_trainer.config import (
    CONFIG_VERSION,
    DataConfig,
    TrainConfig,
    build_versioned,
    check_settings,
    setting,
    to_json,
)
from lib_trainer.data.dataset import Sample, check_image_folders, load_training_set
from lib_trainer.data.report import bucket_info, folder_stats, tag_frequency
from lib_trainer.data.templates import load_template
from lib_trainer.errors import ConfigError, FormatError, UnsupportedModelError
from lib_trainer.formats.files import check_name, path_in
from lib_trainer.formats.lora import network_metadata, read_network, save_network
from lib_trainer.loop.checkpoint import ResumeState, find_resume_state, save_sidecar, tensors_checksum
from lib_trainer.loop.hooks import TrainingHooks
from lib_trainer.loop.optimizers import NAMES as OPTIMIZER_NAMES
from lib_trainer.loop.optimizers import check_optimizer
from lib_trainer.loop.precision import resolve_precision
from lib_trainer.loop.schedules import parse_learning_rate
from lib_trainer.loop.train import Objective, TrainResult
from lib_trainer.methods.common import (
    check_log_folder,
    check_total_steps,
    resolve_epochs,
    resumed_step,
    train_on_dataset,
)
from lib_trainer.models.fused_attention import FusedAttentionTargets, fused_attention_patched
from lib_trainer.models.kohya_names import UNET_PREFIX, unet_key_table
from lib_trainer.models.parts import ModelParts

ALGOS = ("lora", "locon", "loha", "lokr")
UNET_TRANSFORMER = ["SpatialTransformer"]
UNET_CONV_BLOCKS = ["ResBlock", "Downsample", "Upsample"]
TEXT_ENCODER_MODULES = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "FusedAttentionTargets", "OpenClipMlpTargets"]


@dataclass(frozen=True)
class NetworkConfig:
    """The network: algorithm, size, regularisation, what it trains, how it is saved."""

    SECTION: ClassVar[str] = "network"

    name: str = ""
    algo: Literal["lora", "locon", "loha", "lokr"] = "lora"
    rank: int = setting(16, low=1, high=1024, hint="4-32 is typical")
    alpha: float = setting(8.0, low=0.0, high=1e6, hint="alpha scales the update by alpha/rank; try rank/2")
    conv_rank: int = setting(0, low=0, high=1024)  # > 0 also trains ResBlock/Down/Upsample convs (LoCon, LoHa, LoKr)
    conv_alpha: float = setting(1.0, low=0.0, high=1e6)
    dropout: float = setting(0.0, low=0.0, high=0.95)
    rank_dropout: float = setting(0.0, low=0.0, high=0.95)
    module_dropout: float = setting(0.0, low=0.0, high=0.95)
    train_unet: bool = True
    train_text_encoder: bool = False
    text_encoder_lr: float = setting(0.0, low=0.0, high=1.0)  # 0 = the same as train.learning_rate
    stop_text_encoder_at: int = setting(0, low=0, high=10_000_000)  # stop training the TE after this step; 0 = never
    save_precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "network.name")
        if self.name.lower() in ("none", "addams"):
            raise ConfigError(f"network.name {self.name!r} is reserved by the WebUI; choose another", "network.name")
        check_settings(self, self.SECTION)
        if self.algo == "lora" and self.conv_rank:
            raise ConfigError(
                "network.conv_rank needs algo 'locon', 'loha' or 'lokr' (plain 'lora' trains no "
                f"ResBlock convs), but algo is 'lora' with conv_rank {self.conv_rank}",
                "network.conv_rank",
            )
        if not (self.train_unet or self.train_text_encoder):
            raise ConfigError(
                "network.train_unet and network.train_text_encoder are both off; nothing would train",
                "network.train_unet",
            )


@dataclass(frozen=True)
class LoraConfig:
    """Everything a LoRA run needs; embedded in every saved file's metadata."""

    network: NetworkConfig
    data: DataConfig
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(learning_rate="1e-4"))
    epochs: int = setting(0, low=0, high=100_000)  # > 0: train.steps = epochs x batches per epoch
    save_every_epochs: int = setting(0, low=0, high=100_000)  # > 0: replaces train.save_every
    resume_from: str = setting("", path="file")  # continue a saved LoRA file (same key set)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        check_settings(self, "")

    @classmethod
    def from_dict(cls, data: dict) -> LoraConfig:
        """Build from a plain dict (UI, API, saved metadata), upgrading old versions."""
        return build_versioned(cls, data)


@dataclass(frozen=True)
class OutputPaths:
    """The host's Lora folder and the run-log folder."""

    lora_dir: Path
    log_dir: Path


# kohya's targets inside each block class, as paths relative to the block: a module another tool attached to a
# block (the WebUI's own hypernetwork trainer leaves hyper_k/hyper_v layers on attentions) is never trained
OWN_TARGETS = {
    "SpatialTransformer": re.compile(
        r"proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
    ),
    "ResBlock": re.compile(r"in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection"),
    "Downsample": re.compile(r"op"),
    "Upsample": re.compile(r"conv"),
    "CLIPAttention": re.compile(r"q_proj|k_proj|v_proj|out_proj"),
    "CLIPSdpaAttention": re.compile(r"q_proj|k_proj|v_proj|out_proj"),
    "CLIPMLP": re.compile(r"fc1|fc2"),
    "FusedAttentionTargets": re.compile(r"q_proj|k_proj|v_proj|out_proj"),
    "OpenClipMlpTargets": re.compile(r"fc1|fc2"),
}


def check_lycoris_installed() -> None:
    """Refuse at submit when lycoris-lora (the LoRA family math, installed by install.py) is missing or is a
    release that does not import on this torch."""
    import importlib.util

    from lib_trainer.requirements import installed_version, lycoris_command, lycoris_mismatch

    if importlib.util.find_spec("lycoris") is None:
        raise UnsupportedModelError(
            "LoRA training needs the lycoris-lora package, which is not installed (the extension's install.py adds "
            "it when the WebUI starts, but not under --skip-install). Restart the WebUI without --skip-install, or "
            f"run: {lycoris_command()} (in the WebUI's Python)"
        )
    if lycoris_mismatch():
        raise UnsupportedModelError(
            f"lycoris-lora {installed_version('lycoris-lora')} is installed, which does not import on torch "
            f"{installed_version('torch')} (it needs torch 2.7 or newer). Restart the WebUI without --skip-install "
            f"(install.py replaces it), or run: {lycoris_command()} (in the WebUI's Python)"
        )


def check_text_encoder(config: NetworkConfig, parts: ModelParts) -> None:
    """Refuse text-encoder training where the model's text encoder is not one LoRA names exist for."""
    if config.train_text_encoder and not parts.text_encoder.lora_roots():
        raise UnsupportedModelError(
            f"text-encoder training is not supported for this model's text encoder "
            f"({type(parts.text_encoder).__name__}); turn off network.train_text_encoder to train the UNet only",
            "network.train_text_encoder",
        )


def build_network(config: NetworkConfig, parts: ModelParts, seed: int = 0):
    """A lycoris ``LycorisNetworkKohya`` over the model's own target modules, on the model's device.

    Initialised from ``seed`` (so a run is reproducible) without touching the host's random state. Every target
    gets its kohya file name here, before training starts; a module without one is refused by name.
    """
    from lycoris.kohya import LycorisNetworkKohya

    check_text_encoder(config, parts)
    te_roots = parts.text_encoder.lora_roots() if config.train_text_encoder else []
    conv = config.conv_rank > 0
    LycorisNetworkKohya.apply_preset(
        {
            "enable_conv": conv,
            "unet_target_module": UNET_TRANSFORMER + (UNET_CONV_BLOCKS if conv else []),
            "unet_target_name": [],
            "text_encoder_target_module": TEXT_ENCODER_MODULES if te_roots else [],
            "text_encoder_target_name": [],
            "module_algo_map": {},
            "name_algo_map": {},
            "use_fnmatch": False,
            "exclude_name": [],
        }
    )
    with _quiet_lycoris(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = LycorisNetworkKohya(
            (te_roots if len(te_roots) > 1 else te_roots[0]) if te_roots else torch.nn.Module(),  # list: lora_te1_/te2_
            parts.unet,
            multiplier=1.0,
            lora_dim=config.rank,
            conv_lora_dim=config.conv_rank,
            alpha=config.alpha,
            conv_alpha=config.conv_alpha,
            dropout=config.dropout,
            rank_dropout=config.rank_dropout,
            module_dropout=config.module_dropout,
            network_module=config.algo,
            bypass_mode=config.algo in ("lora", "locon"),
            warn_on_unmatched=False,
        )
    unet_own = own_targets(parts.unet)
    te_own = set().union(*(own_targets(root) for root in te_roots))
    network.unet_loras = [m for m in network.unet_loras if config.train_unet and id(m.org_module[0]) in unet_own]
    network.text_encoder_loras = [
        m for m in network.text_encoder_loras if config.train_text_encoder and id(m.org_module[0]) in te_own
    ]
    network.loras = network.text_encoder_loras + network.unet_loras
    file_names(network, parts)  # every target has its name before step 1
    for lora in network.loras:
        lora.to(parts.device)
    network.trainer_fused = _fused_patches(te_roots, network.text_encoder_loras)
    return network


def _fused_patches(roots: list[nn.Module], loras: list) -> list:
    """For each fused attention with trained q/k/v/out views: the host attention and its four weight deltas."""
    by_module = {id(lora.org_module[0]): lora for lora in loras}
    patches = []
    for root in roots:
        for targets in root.modules():
            if not isinstance(targets, FusedAttentionTargets):
                continue
            found = [by_module.get(id(getattr(targets, n))) for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
            if all(found):
                patches.append((targets.attention[0], tuple(_weight_delta(lora) for lora in found)))
    return patches


def _weight_delta(lora):
    """The weight change a lycoris module adds to its target, as its own forward computes it (x multiplier)."""
    from lycoris.modules.locon import LoConModule

    def delta() -> torch.Tensor:
        if lora.module_dropout and lora.training and torch.rand(1) < lora.module_dropout:
            return torch.zeros(lora.shape, device=lora.device)
        if isinstance(lora, LoConModule):
            weight = lora.make_weight(lora.device) * lora.scale
        else:
            weight = lora.get_weight(lora.shape) * lora.scalar
        return weight.view(lora.shape) * lora.multiplier

    return delta


def own_targets(root: nn.Module) -> set[int]:
    """``id``s of the modules kohya trains in ``root``: the whitelisted children of its target blocks."""
    found = set()
    for block in root.modules():
        pattern = OWN_TARGETS.get(type(block).__name__)
        if pattern is None:
            continue
        for name, module in block.named_modules():
            if name and pattern.fullmatch(name) and isinstance(module, (nn.Linear, nn.Conv2d)):
                found.add(id(module))
    return found


def unet_names(parts: ModelParts) -> dict[str, str]:
    """lycoris UNet module name -> kohya file name for this model (diffusers-style for SD1/SD2, LDM for SDXL)."""
    return (parts.unet_lora_names or unet_key_table)(parts.unet)


def file_names(network, parts: ModelParts) -> dict[str, str]:
    """lycoris module name -> kohya file name; refuses a module without one."""
    table = unet_names(parts)
    paths = {id(module): name for name, module in parts.unet.named_modules()}
    names = {}
    for lora in network.loras:
        name = lora.lora_name
        if name.startswith(UNET_PREFIX):
            if name not in table:
                raise UnsupportedModelError(
                    f"the UNet module {paths.get(id(lora.org_module[0]), name)} has no kohya LoRA file name: this "
                    "UNet's block layout is not SD1/SD2/SDXL's, so the WebUI could not load the file. Turn off "
                    "network.train_unet or use an SD1, SD2 or SDXL checkpoint",
                    "network.train_unet",
                )
            names[name] = table[name]
        else:
            names[name] = name
    return names


@contextlib.contextmanager
def _quiet_lycoris() -> Iterator[None]:
    import logging

    logger = logging.getLogger("LyCORIS")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def attached(network) -> Iterator[None]:
    """Wrap the target modules' forwards; on exit restore them exactly (no instance ``forward`` left behind)."""
    targets = [lora.org_module[0] for lora in network.loras]
    had_forward = [("forward" in m.__dict__, m.__dict__.get("forward")) for m in targets]
    for lora in network.loras:
        lora.apply_to()
    try:
        with fused_attention_patched(getattr(network, "trainer_fused", [])):
            yield
    finally:
        for lora in reversed(network.loras):
            lora.restore()
        for module, (had, original) in zip(targets, had_forward, strict=True):
            if had:
                module.forward = original
            else:
                module.__dict__.pop("forward", None)


def network_tensors(network, parts: ModelParts) -> dict[str, torch.Tensor]:
    """The network's tensors under kohya names (diffusers-style UNet paths for SD1/SD2)."""
    names = file_names(network, parts)
    return {
        f"{names[lora.lora_name]}.{key}": value for lora in network.loras for key, value in lora.state_dict().items()
    }


def load_network_tensors(network, parts: ModelParts, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load kohya-named tensors into ``network``; the key sets must match exactly."""
    reverse = {v: k for k, v in unet_names(parts).items()}
    grouped: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        module, _, tensor = key.partition(".")
        grouped[reverse.get(module, module)][tensor] = value
    expected = {lora.lora_name for lora in network.loras}
    if set(grouped) != expected:
        missing, extra = sorted(expected - set(grouped))[:3], sorted(set(grouped) - expected)[:3]
        raise FormatError(
            f"{source} does not match this network (missing {missing}, unexpected {extra}); use the "
            "same algo, conv_rank and UNet/text-encoder choice it was trained with"
        )
    for lora in network.loras:
        try:
            lora.load_state_dict({k: v.float() for k, v in grouped[lora.lora_name].items()})
        except RuntimeError as exc:
            raise FormatError(
                f"{source}: {lora.lora_name} does not fit ({exc}); use the rank it was trained with"
            ) from exc


class NetworkTrainable:
    """The network's parameters, how it attaches to the model, and how it is saved."""

    def __init__(self, config: LoraConfig, parts: ModelParts, paths: OutputPaths, samples: list[Sample]):
        self.config, self.parts, self.paths = config, parts, paths
        self.name = config.network.name
        self.network = build_network(config.network, parts, config.train.seed)
        self.trains_text_encoder = bool(self.network.text_encoder_loras)
        self.fixed_condition = not self.trains_text_encoder  # text-encoder outputs may be cached
        self.start_step, self.resume = 0, None
        self.main_path = path_in(paths.lora_dir, f"{self.name}.safetensors")
        self.run_dir = paths.log_dir / self.name
        self.started_at = time.time()
        self.session = uuid.uuid4().hex
        self.dataset_meta = _dataset_metadata(config.data, samples)

    def parameters(self) -> list[torch.Tensor]:
        """Every trainable tensor of the network."""
        return [p for lora in self.network.loras for p in lora.parameters()]

    def param_groups(self) -> list[dict[str, Any]]:
        """UNet and text-encoder groups (own learning rate, optional stop step)."""
        net, cfg = self.network, self.config.network
        groups = []
        if net.unet_loras:
            groups.append({"params": [p for lora in net.unet_loras for p in lora.parameters()], "lr_scale": 1.0})
        if net.text_encoder_loras:
            base = parse_learning_rate(self.config.train.learning_rate)[0][0]
            scale = cfg.text_encoder_lr / base if cfg.text_encoder_lr else 1.0
            groups.append(
                {
                    "params": [p for lora in net.text_encoder_loras for p in lora.parameters()],
                    "lr_scale": scale,
                    "stop_at": cfg.stop_text_encoder_at,
                }
            )
        return groups

    def attach(self, parts: ModelParts) -> contextlib.AbstractContextManager:
        """Wrap the targets for the run (training mode for dropout), restore on exit."""
        self.network.train()
        return attached(self.network)

    @contextlib.contextmanager
    def for_preview(self) -> Iterator[None]:
        """While the host renders previews: the network stays attached, in eval mode (no dropout)."""
        self.network.eval()
        try:
            yield
        finally:
            self.network.train()

    def condition(self, parts: ModelParts, prompts: list[str]) -> torch.Tensor:
        """Plain prompt conditioning (the text-encoder LoRA, if any, acts inside)."""
        return parts.condition(prompts)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as saved."""
        return network_tensors(self.network, self.parts)

    def metadata(self, step: int) -> dict[str, str]:
        """kohya/modelspec metadata for a file saved at ``step``."""
        cfg, p = self.config, self.parts
        net = cfg.network
        args = {"algo": net.algo} if net.algo in ("loha", "lokr") else {}
        if net.conv_rank:
            args.update({"conv_dim": str(net.conv_rank), "conv_alpha": str(net.conv_alpha)})
        for key in ("dropout", "rank_dropout", "module_dropout"):
            if getattr(net, key):
                args[key] = str(getattr(net, key))
        te_lr = net.text_encoder_lr or cfg.train.learning_rate
        extra = {
            "ss_sd_model_name": p.model_name or "",
            "ss_new_sd_model_hash": p.model_hash or "",
            "ss_clip_skip": str(_clip_skip(p)),
            "ss_training_started_at": str(self.started_at),
            "ss_training_finished_at": str(time.time()),
            "ss_steps": str(step),
            "ss_learning_rate": cfg.train.learning_rate,
            "ss_unet_lr": cfg.train.learning_rate if net.train_unet else "",
            "ss_text_encoder_lr": str(te_lr) if net.train_text_encoder else "",
            "ss_optimizer": OPTIMIZER_NAMES[cfg.train.optimizer],
            "ss_lr_scheduler": cfg.train.lr_schedule,
            "ss_mixed_precision": cfg.train.mixed_precision,
            "ss_session_id": self.session,
            "ss_noise_offset": str(cfg.train.noise_offset),
            "ss_min_snr_gamma": str(cfg.train.min_snr_gamma),
            "modelspec.encoder_layer": str(_clip_skip(p)),
            "trainer": "sd-webui-trainer",
            "trainer_config": to_json(cfg),
            **self.dataset_meta,
        }
        return network_metadata(
            name=self.name,
            algo=net.algo,
            rank=net.rank,
            alpha=net.alpha,
            network_args=args,
            family=p.family,
            prediction=p.prediction,
            resolution=(cfg.data.width, cfg.data.height),
            extra=extra,
        )

    def write_file(self, path: Path, step: int) -> Path:
        """The network as a LoRA file at ``path`` (as saved; for hosts that render previews from a file)."""
        return save_network(path, self.tensors(), self.metadata(step), self.config.network.save_precision)

    def save(self, step: int, resume: ResumeState) -> list[Path]:
        """A numbered copy in the run folder, the resume sidecar, then the main file in the Lora folder."""
        tensors, meta, precision = self.tensors(), self.metadata(step), self.config.network.save_precision
        numbered = save_network(numbered_path(self.paths, self.name, step), tensors, meta, precision)
        save_sidecar(self.main_path, resume, file_checksum(numbered))  # read back: checked as written
        main = save_network(self.main_path, tensors, meta, precision)
        return [numbered, main]


def numbered_path(paths: OutputPaths, name: str, step: int) -> Path:
    """The run folder's copy of the network at ``step``."""
    return paths.log_dir / name / "lora" / f"{name}-{step:06d}.safetensors"


def file_checksum(path: Path) -> str:
    """Checksum of a saved LoRA file's tensors (ties a resume sidecar to it)."""
    return tensors_checksum(list(read_network(path)[0].values()))


def _clip_skip(parts: ModelParts) -> int:
    return int(getattr(parts.text_encoder, "clip_skip", 1))


def _dataset_metadata(data: DataConfig, samples: list[Sample]) -> dict[str, str]:
    meta = {
        "ss_num_train_images": str(sum(s.repeats for s in samples)),
        "ss_tag_frequency": json.dumps(tag_frequency(samples, data.data_dir)),
        "ss_dataset_dirs": json.dumps(folder_stats(samples, data.data_dir)),
    }
    if data.buckets:
        meta["ss_bucket_info"] = json.dumps(bucket_info(samples))
    return meta


def check(config: LoraConfig, parts: ModelParts, paths: OutputPaths) -> None:
    """Everything knowable before training, without loading the images (run when a job is queued and at its start)."""
    check_log_folder(paths.log_dir, paths.lora_dir, "LoRA")
    check_lycoris_installed()
    resolve_precision(config.train.mixed_precision, parts.device)
    check_optimizer(config.train.optimizer, parts.device, config.train.optimizer_args)
    check_text_encoder(config.network, parts)
    load_template(config.data.template)
    check_image_folders(config.data)
    main = path_in(paths.lora_dir, f"{config.network.name}.safetensors")
    source = Path(config.resume_from).expanduser() if config.resume_from else None
    if source is not None and not source.is_file():
        raise ConfigError(f"resume_from {config.resume_from!r} is not an existing file", "resume_from")
    if main.exists() and not config.network.overwrite and not (source is not None and source.resolve() == main):
        raise ConfigError(
            f"{main} already exists; turn on network.overwrite, choose another network.name, or set "
            "resume_from to continue it",
            "network.name",
        )
    if source is not None:
        metadata = read_network(source, "resume_from")[1]
        if not config.epochs:  # with epochs the total is known once the images are counted
            check_total_steps(_file_step(metadata), config, str(config.resume_from))


def prepare(
    config: LoraConfig, parts: ModelParts, paths: OutputPaths, hooks: TrainingHooks
) -> tuple[LoraConfig, list[Sample], list[str]]:
    """Validate everything and load the data before anything is written."""
    check(config, parts, paths)
    samples, template = load_training_set(config.data, hooks.on_warning)
    return resolve_epochs(config, samples), samples, template


def train_lora(
    config: LoraConfig,
    parts: ModelParts,
    paths: OutputPaths,
    hooks: TrainingHooks | None = None,
    objective: Objective | None = None,
) -> TrainResult:
    """Train a LoRA/LyCORIS network on the loaded model; saves every ``save_every`` and at the end."""
    hooks = hooks or TrainingHooks()
    config, samples, template = prepare(config, parts, paths, hooks)
    trainable = NetworkTrainable(config, parts, paths, samples)
    if config.resume_from:
        _resume(trainable, Path(config.resume_from).expanduser(), hooks)
    check_total_steps(trainable.start_step, config, str(config.resume_from))
    data = (samples, template, config.network.name)
    return train_on_dataset(config, parts, trainable, data, paths.log_dir, hooks, objective)


def _file_step(metadata: dict[str, str]) -> int:
    text = metadata.get("ss_steps", "0") or "0"
    return int(text) if text.isdigit() else 0


def _resume(trainable: NetworkTrainable, source: Path, hooks: TrainingHooks) -> None:
    tensors, metadata = read_network(source, "resume_from")
    load_network_tensors(trainable.network, trainable.parts, tensors, source.name)
    resume = find_resume_state(
        source,
        tensors_checksum(list(tensors.values())),
        lambda step: numbered_path(trainable.paths, trainable.name, step),
        file_checksum,
    )
    trainable.start_step = resumed_step(_file_step(metadata), resume, hooks)
    trainable.resume = resume
    if metadata.get("ss_session_id"):
        trainable.session = metadata["ss_session_id"]
