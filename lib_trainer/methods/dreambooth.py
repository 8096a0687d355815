"""DreamBooth: full fine-tuning of the loaded model on one or more concepts, with prior preservation.

Ruiz et al. (2023), "DreamBooth": each concept has instance images (trained under its instance prompt) and class
images (the model's own renderings of the class prompt, generated before training from the untouched model); the
loss is the instance loss plus the weighted class loss, with instance and class samples in every batch.

The host's own weights train in place: every trained tensor is copied to the CPU first and put back bit-identically
when the run ends in any way (``guard.restored_weights``). Trained tensors are held in fp32 for the run (or bf16:
kohya's full_bf16, half the memory) whatever the host's storage dtype; the forward runs under autocast. The result
is a new ``.safetensors`` checkpoint in the host's checkpoint folder with the loaded file's key layout
(``formats.model_file``), numbered copies in the run folder, and optionally a LoRA of the difference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lib_trainer.config import (
    CONFIG_VERSION,
    SharedDataConfig,
    TrainConfig,
    build_versioned,
    check_range,
    check_settings,
    setting,
    to_json,
)
from lib_trainer.data.dataset import Sample, check_image_folders, load_training_set
from lib_trainer.data.report import tag_frequency
from lib_trainer.errors import ConfigError, DatasetError, FormatError, UnsupportedModelError
from lib_trainer.formats.files import check_name, is_inside, path_in, safetensors_keys
from lib_trainer.formats.model_file import (
    DTYPES,
    checkpoint_tensors,
    copy_model_config,
    estimated_size,
    save_checkpoint,
)
from lib_trainer.loop.checkpoint import ResumeState
from lib_trainer.loop.hooks import TrainingHooks
from lib_trainer.loop.optimizers import NAMES as OPTIMIZER_NAMES
from lib_trainer.loop.optimizers import check_optimizer
from lib_trainer.loop.precision import resolve_precision
from lib_trainer.loop.schedules import parse_learning_rate
from lib_trainer.loop.train import Objective, TrainResult
from lib_trainer.methods.class_images import ClassImageConfig, class_image_count, ensure_class_images
from lib_trainer.methods.common import check_log_folder, resolve_epochs, train_on_dataset
from lib_trainer.methods.concept_batches import ConceptBatches
from lib_trainer.methods.lora_extract import extract_lora
from lib_trainer.models.guard import restored_weights
from lib_trainer.models.parts import ModelParts

EMA_PREFIX = "model_ema."  # EMA weights of a training checkpoint: the loaded model has none, so none are written


@dataclass(frozen=True)
class ConceptConfig:
    """One concept: its instance images and prompt, and its class images for prior preservation."""

    instance_dir: str = setting("", path="dir")
    instance_prompt: str = setting("[filewords]", free_text=True)  # e.g. "photo of zkw person"; [filewords] = caption
    class_prompt: str = setting("", free_text=True)  # e.g. "photo of a person"; the caption of generated images
    class_dir: str = setting("", path="dir")  # "" = no prior preservation for this concept
    class_images: int = setting(0, low=0, high=100_000, hint="0 uses the images already in class_dir")
    prior_loss_weight: float = setting(1.0, low=0.0, high=100.0)

    def __post_init__(self) -> None:
        check_settings(self, "")
        if not self.instance_dir.strip():
            raise ConfigError("instance_dir is empty; give the folder of this concept's images", field="instance_dir")
        if not self.instance_prompt.strip():
            raise ConfigError(
                "instance_prompt is empty; give the prompt its images train under, e.g. 'photo of zkw person' or "
                "'[filewords]' (each image's caption)",
                field="instance_prompt",
            )
        if self.class_images and not self.class_dir.strip():
            raise ConfigError(
                f"class_images is {self.class_images} but class_dir is empty; give the folder the class images are "
                "kept in (they are generated there when it holds fewer)",
                field="class_dir",
            )
        if self.class_images and not self.class_prompt.strip():
            raise ConfigError(
                "class_prompt is empty; give the prompt class images are generated from, e.g. 'photo of a person'",
                field="class_prompt",
            )

    @property
    def prior(self) -> bool:
        """Whether this concept trains with prior preservation."""
        return bool(self.class_dir.strip())


@dataclass(frozen=True)
class DreamBoothModelConfig:
    """What trains, how, and the checkpoint written."""

    SECTION: ClassVar[str] = "dreambooth"

    name: str = ""  # the new checkpoint's file name (without .safetensors)
    train_unet: bool = True
    unet_blocks: str = ""  # comma-separated UNet module paths to train (e.g. "output_blocks, middle_block"); "" = all
    train_text_encoder: bool = False
    text_encoder_lr: float = setting(0.0, low=0.0, high=1.0)  # 0 = the same as train.learning_rate
    stop_text_encoder_at: int = setting(0, low=0, high=10_000_000)  # 0 = never
    weights_precision: Literal["fp32", "bf16"] = "fp32"  # bf16: kohya's full_bf16 (half the memory, coarser steps)
    save_precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    extract_lora_rank: int = setting(0, low=0, high=1024, hint="0 = no LoRA; 32-128 is typical")
    keep_loaded: bool = False  # switch the WebUI to the new checkpoint afterwards (else the loaded model stays)
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "dreambooth.name")
        check_settings(self, self.SECTION)
        if not (self.train_unet or self.train_text_encoder):
            raise ConfigError(
                "dreambooth.train_unet and dreambooth.train_text_encoder are both off; nothing would train",
                field="dreambooth.train_unet",
            )

    def block_prefixes(self) -> list[str]:
        """The UNet module paths of ``unet_blocks`` ([] = the whole UNet)."""
        return [part.strip().rstrip(".") for part in self.unet_blocks.split(",") if part.strip()]


def _default_train() -> TrainConfig:
    # numbered copies are 2-7 GB each: none by default; checkpointing on (full fine-tuning is memory-bound)
    return TrainConfig(learning_rate="2e-6", optimizer="adafactor", save_every=0, gradient_checkpointing=True)


@dataclass(frozen=True)
class DreamBoothConfig:
    """Everything a DreamBooth run needs; embedded in the checkpoint's metadata."""

    dreambooth: DreamBoothModelConfig
    concepts: tuple[ConceptConfig, ...]
    data: SharedDataConfig = dataclasses.field(default_factory=SharedDataConfig)
    class_generation: ClassImageConfig = dataclasses.field(default_factory=ClassImageConfig)
    train: TrainConfig = dataclasses.field(default_factory=_default_train)
    epochs: int = setting(0, low=0, high=100_000)  # > 0: train.steps = epochs x batches per epoch
    save_every_epochs: int = setting(0, low=0, high=100_000)  # > 0: replaces train.save_every
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        check_settings(self, "")
        if not self.concepts:
            raise ConfigError("concepts is empty; give at least one concept (its instance_dir)", field="concepts")
        check_range("concepts", len(self.concepts), 1, 256, "train at most 256 concepts in one run")

    @classmethod
    def from_dict(cls, data: dict) -> DreamBoothConfig:
        """Build from a plain dict (UI, API, saved metadata), upgrading old versions."""
        return build_versioned(cls, data)


@dataclass(frozen=True)
class OutputPaths:
    """The host's checkpoint folder, its Lora folder (extracted LoRA) and the run-log folder."""

    checkpoint_dir: Path
    lora_dir: Path
    log_dir: Path


def trained_parameters(config: DreamBoothModelConfig, parts: ModelParts) -> tuple[list[nn.Parameter], list]:
    """(UNet parameters, text-encoder parameters) the run trains; unknown ``unet_blocks`` are refused by name."""
    unet: list[nn.Parameter] = []
    if config.train_unet:
        prefixes = config.block_prefixes()
        named = list(parts.unet.named_parameters())
        for prefix in prefixes:
            if not any(name == prefix or name.startswith(prefix + ".") for name, _ in named):
                tops = sorted({name.split(".")[0] for name, _ in named})
                raise ConfigError(
                    f"dreambooth.unet_blocks names {prefix!r}, which is not a module of this UNet; use module paths "
                    f"such as {', '.join(tops)} or 'output_blocks.3'",
                    field="dreambooth.unet_blocks",
                )
        unet = [p for name, p in named if not prefixes or any(name == x or name.startswith(x + ".") for x in prefixes)]
    text: list[nn.Parameter] = []
    if config.train_text_encoder:
        text = list(parts.host_modules["text_encoder"].parameters())
    return unet, text


def checkpoint_keys(parts: ModelParts) -> list[str] | None:
    """The loaded ``.safetensors`` file's keys without EMA weights (None when the file is unknown or pickled)."""
    name = parts.checkpoint_file
    if not name or not str(name).endswith(".safetensors") or not Path(name).is_file():
        return None
    return sorted(k for k in safetensors_keys(Path(name)) if not k.startswith(EMA_PREFIX)) or None


def model_tensors(parts: ModelParts, keys: list[str] | None) -> dict[str, torch.Tensor]:
    """The model's tensors under the checkpoint's keys; keys the model object has no tensor for (markers such as
    ``v_pred``, buffers newer libraries no longer keep) are copied from the loaded file unchanged."""
    tensors = checkpoint_tensors(parts.model)
    if keys is None:
        return tensors
    missing = [k for k in keys if k not in tensors]
    if missing:
        import safetensors

        with safetensors.safe_open(str(parts.checkpoint_file), framework="pt", device="cpu") as fh:
            tensors.update({key: fh.get_tensor(key) for key in missing})
    return {key: tensors[key] for key in keys}


class FullTrainable:
    """The host's own weights, trained in place and restored afterwards; saved as a full checkpoint."""

    resume_masters = False  # the checkpoint is the result; no fp32 resume copy of the whole model per save

    def __init__(self, config: DreamBoothConfig, parts: ModelParts, paths: OutputPaths, samples: list[Sample]):
        self.config, self.parts, self.paths = config, parts, paths
        self.name = config.dreambooth.name
        self.unet_params, self.text_params = trained_parameters(config.dreambooth, parts)
        self.trains_text_encoder = bool(self.text_params)
        self.fixed_condition = not self.trains_text_encoder  # text-encoder outputs may be cached
        self.start_step, self.resume = 0, None
        self.main_path = path_in(paths.checkpoint_dir, f"{self.name}.safetensors")
        self.lora_path = path_in(paths.lora_dir, f"{self.name}.safetensors")
        self.run_dir = paths.log_dir / self.name
        self.keys = checkpoint_keys(parts)
        self.base: list[torch.Tensor] = []
        self.started_at = time.time()
        self.samples = samples
        self.warnings: list[str] = []

    def parameters(self) -> list[torch.Tensor]:
        """Every trained tensor (UNet, then text encoder)."""
        return self.unet_params + self.text_params

    def param_groups(self) -> list[dict[str, Any]]:
        """UNet and text-encoder groups (own learning rate, optional stop step)."""
        groups = []
        if self.unet_params:
            groups.append({"params": self.unet_params, "lr_scale": 1.0})
        if self.text_params:
            cfg = self.config.dreambooth
            base = parse_learning_rate(self.config.train.learning_rate)[0][0]
            scale = cfg.text_encoder_lr / base if cfg.text_encoder_lr and base else 1.0
            groups.append({"params": self.text_params, "lr_scale": scale, "stop_at": cfg.stop_text_encoder_at})
        return groups

    @contextlib.contextmanager
    def attach(self, parts: ModelParts) -> Iterator[None]:
        """Copy the trained weights to the CPU, switch them to the training dtype with gradients; on exit put every
        weight back bit-identically (also on errors and interrupts)."""
        cfg = self.config.dreambooth
        dtype = torch.bfloat16 if cfg.weights_precision == "bf16" else torch.float32
        with restored_weights(self.parameters()) as base:
            self.base = base
            for param in self.parameters():
                wanted = dtype if param.dim() > 1 else torch.float32  # norms and biases stay fp32 (tiny; norm kernels)
                if param.dtype != wanted:
                    param.data = param.data.to(wanted)
                param.requires_grad_(True)
            yield

    @contextlib.contextmanager
    def for_preview(self) -> Iterator[None]:
        """Previews render with the trained weights in place (they already are)."""
        yield

    def condition(self, parts: ModelParts, prompts: list[str]) -> Any:
        """Plain prompt conditioning (a trained text encoder acts inside)."""
        return parts.condition(prompts)

    def metadata(self, step: int) -> dict[str, str]:
        """What the checkpoint says about itself: the trainer's config and the run's facts."""
        p, cfg = self.parts, self.config
        return {
            "trainer": "sd-webui-trainer",
            "trainer_method": "dreambooth",
            "trainer_config": to_json(cfg),
            "ss_sd_model_name": p.model_name or "",
            "ss_new_sd_model_hash": p.model_hash or "",
            "ss_steps": str(step),
            "ss_learning_rate": cfg.train.learning_rate,
            "ss_optimizer": OPTIMIZER_NAMES[cfg.train.optimizer],
            "ss_training_started_at": str(self.started_at),
            "ss_training_finished_at": str(time.time()),
            "ss_num_train_images": str(sum(s.repeats for s in self.samples if not s.is_reg)),
            "ss_num_reg_images": str(sum(1 for s in self.samples if s.is_reg)),
            "ss_tag_frequency": json.dumps(tag_frequency([s for s in self.samples if not s.is_reg], "")),
            "modelspec.title": self.name,
            "modelspec.prediction_type": "v" if p.prediction == "v" else "epsilon",
        }

    def save(self, step: int, resume: ResumeState) -> list[Path]:
        """The checkpoint (replacing the last one), a numbered copy at save-every steps, the extracted LoRA."""
        cfg = self.config.dreambooth
        tensors = model_tensors(self.parts, self.keys)
        main = save_checkpoint(self.main_path, tensors, self.metadata(step), cfg.save_precision)
        written = [main]
        copy_model_config(self.parts.checkpoint_file, main)
        every = self.config.train.save_every
        if every and step % every == 0 and step < self.config.train.steps:
            written.append(_numbered_copy(main, self.run_dir / "checkpoints" / f"{self.name}-{step:06d}.safetensors"))
        if cfg.extract_lora_rank:
            base = dict(zip((id(p) for p in self.parameters()), self.base, strict=True))
            path, skipped = extract_lora(
                self.parts, base, cfg.extract_lora_rank, self.lora_path, self.lora_meta(step), cfg.save_precision
            )
            written.append(path)
            if skipped and not self.warnings:
                self.warnings.append(skipped)
        return written

    def lora_meta(self, step: int) -> dict[str, str]:
        """Training facts for the extracted LoRA's metadata."""
        return {
            "ss_sd_model_name": self.parts.model_name or "",
            "ss_steps": str(step),
            "trainer": "sd-webui-trainer",
            "trainer_method": "dreambooth-extract",
            "trainer_config": to_json(self.config),
        }


def _numbered_copy(main: Path, numbered: Path) -> Path:
    """A numbered copy of the checkpoint just written: a hard link where the file system allows (no space, and the
    next save replaces ``main`` by rename, leaving the link's content alone), else a real copy."""
    numbered.parent.mkdir(parents=True, exist_ok=True)
    tmp = numbered.with_name(f".{numbered.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(main, tmp)
    except OSError:
        shutil.copyfile(main, tmp)
    tmp.replace(numbered)
    return numbered


def check(config: DreamBoothConfig, parts: ModelParts, paths: OutputPaths) -> None:
    """Everything knowable before training, without loading images or generating any (at submit and at start)."""
    cfg = config.dreambooth
    check_log_folder(paths.log_dir, paths.checkpoint_dir, "checkpoint")
    if parts.model is None:
        raise UnsupportedModelError("this host does not give the whole model, so no checkpoint can be written")
    precision = resolve_precision(
        config.train.mixed_precision,
        parts.device,
        "DreamBooth trains the weights themselves; use dreambooth.weights_precision 'bf16' with 'bf16'",
    )
    check_optimizer(config.train.optimizer, parts.device, config.train.optimizer_args)
    if cfg.weights_precision == "bf16" and precision == "no":
        raise ConfigError(
            "dreambooth.weights_precision 'bf16' computes under autocast; set train.mixed_precision to 'bf16' (or "
            "'auto' on a GPU), or keep the weights in 'fp32'",
            field="dreambooth.weights_precision",
        )
    if cfg.weights_precision == "bf16" and parts.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "dreambooth.weights_precision 'bf16' is not supported by this GPU; use 'fp32'",
            field="dreambooth.weights_precision",
        )
    trained_parameters(cfg, parts)
    for index, concept in enumerate(config.concepts):
        _check_concept(config, concept, index)
    main = path_in(paths.checkpoint_dir, f"{cfg.name}.safetensors")
    loaded = Path(parts.checkpoint_file).resolve() if parts.checkpoint_file else None
    if loaded is not None and main == loaded:
        raise ConfigError(
            f"dreambooth.name {cfg.name!r} is the loaded checkpoint's own file; choose another name (the loaded "
            "model is never overwritten)",
            field="dreambooth.name",
        )
    _check_new_file(main, cfg.overwrite, "checkpoint")
    if cfg.extract_lora_rank:
        _check_new_file(path_in(paths.lora_dir, f"{cfg.name}.safetensors"), cfg.overwrite, "LoRA")
    _check_space(parts, paths.checkpoint_dir, cfg.save_precision)


def _check_concept(config: DreamBoothConfig, concept: ConceptConfig, index: int) -> None:
    field = f"concepts.{index}"
    check_image_folders(config.data.for_folder(concept.instance_dir), f"{field}.instance_dir")
    if not concept.prior:
        return
    folder = Path(concept.class_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{field}.class_dir {concept.class_dir!r} is a file, not a folder", f"{field}.class_dir")
    if is_inside(folder, Path(concept.instance_dir).expanduser()) or is_inside(
        Path(concept.instance_dir).expanduser(), folder
    ):
        raise ConfigError(
            f"{field}.class_dir {concept.class_dir!r} and instance_dir {concept.instance_dir!r} overlap; class images "
            "must be kept apart from the concept's own images",
            f"{field}.class_dir",
        )
    if not concept.class_images and class_image_count(folder) == 0:
        raise DatasetError(
            f"{field}.class_dir {concept.class_dir!r} holds no images and class_images is 0; set class_images to "
            "how many should be generated (100-200 per concept is common), or clear class_dir to train without "
            "prior preservation",
            f"{field}.class_images",
        )


def _check_new_file(path: Path, overwrite: bool, what: str) -> None:
    if path.exists() and not overwrite:
        raise ConfigError(
            f"{path} already exists; turn on dreambooth.overwrite or choose another dreambooth.name "
            f"(the {what} would be replaced)",
            field="dreambooth.name",
        )


def _check_space(parts: ModelParts, folder: Path, precision: str) -> None:
    """A clear error now rather than after hours of training when the checkpoint cannot be written."""
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), folder)
    free = shutil.disk_usage(probe).free
    needed = estimated_size(parts.model, DTYPES[precision])
    if free < needed * 1.05:
        raise FormatError(
            f"{folder} has {free / 2**30:.2f} GiB free but the checkpoint needs about {needed / 2**30:.2f} GiB; free "
            "some space or choose another save precision (fp16/bf16 halve the size)",
            field="dreambooth.save_precision",
        )


def load_concepts(config: DreamBoothConfig, hooks: TrainingHooks) -> list[tuple[list[Sample], list[Sample]]]:
    """Per concept: (instance samples under the concept's instance prompt, class samples as regularisation)."""
    out = []
    for index, concept in enumerate(config.concepts):
        data = config.data.for_folder(concept.instance_dir)
        instance, _ = load_training_set(dataclasses.replace(data, missing_caption="empty"), hooks.on_warning)
        if "[filewords]" in concept.instance_prompt:
            _check_captions(instance, data, index)
        for sample in instance:
            sample.template = [concept.instance_prompt]
        classes: list[Sample] = []
        if concept.prior:
            class_data = dataclasses.replace(config.data.for_folder(concept.class_dir), missing_caption="empty")
            classes, _ = load_training_set(class_data, hooks.on_warning)
            classes = classes[: concept.class_images] if concept.class_images else classes
            for sample in classes:
                sample.is_reg, sample.loss_weight, sample.repeats = True, concept.prior_loss_weight, 1
                sample.caption = sample.caption or concept.class_prompt or sample.folder_caption
        out.append((instance, classes))
    return out


def _check_captions(samples: list[Sample], data: Any, index: int) -> None:
    missing = [s.path.name for s in samples if s.caption is None and s.folder_caption is None]
    if missing and data.missing_caption == "error":
        raise DatasetError(
            f"concepts.{index}.instance_prompt uses [filewords] but {len(missing)} image(s) have no caption file "
            f"({data.caption_extension}): {', '.join(missing[:10])}; add captions, set data.missing_caption to "
            "'filename' or 'empty', or give a fixed instance prompt",
            field=f"concepts.{index}.instance_prompt",
        )


def train_dreambooth(
    config: DreamBoothConfig,
    parts: ModelParts,
    paths: OutputPaths,
    hooks: TrainingHooks | None = None,
    objective: Objective | None = None,
) -> TrainResult:
    """Generate missing class images (from the untouched model), then train every concept; saves a checkpoint at
    ``save_every`` and at the end, the host's model restored exactly afterwards."""
    hooks = hooks or TrainingHooks()
    check(config, parts, paths)
    if not ensure_class_images(config, hooks):
        return TrainResult(0, 0, True)
    concepts = load_concepts(config, hooks)
    instance = [s for inst, _ in concepts for s in inst]
    config = resolve_epochs(config, instance)
    samples = instance + [s for _, classes in concepts for s in classes]
    trainable = FullTrainable(config, parts, paths, samples)
    batches = ConceptBatches.factory(concepts, hooks.on_warning)
    data = (samples, ["[filewords]"], config.dreambooth.name)
    result = train_on_dataset(config, parts, trainable, data, paths.log_dir, hooks, objective, batches)
    for warning in trainable.warnings:
        hooks.on_warning(warning)
    return result
