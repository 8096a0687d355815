"""What every method does once its trainable exists: the run folder, latents, prompts, batches, the loop."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lib_trainer.config import to_json
from lib_trainer.data.dataset import LatentCache, PromptMaker, Sample, TrainingBatches, batches_per_epoch
from lib_trainer.data.latent_store import latent_store
from lib_trainer.errors import ConfigError
from lib_trainer.formats.files import is_inside, write_bytes_atomic
from lib_trainer.loop import distributed
from lib_trainer.loop.checkpoint import ResumeState
from lib_trainer.loop.hooks import TrainingHooks
from lib_trainer.loop.precision import resolve_precision
from lib_trainer.loop.train import LossLog, Objective, Trainable, TrainResult, train
from lib_trainer.methods.cached_text import CachedConditions
from lib_trainer.models.diffusion import DiffusionObjective
from lib_trainer.models.parts import ModelParts


def train_on_dataset(
    config: Any,
    parts: ModelParts,
    trainable: Trainable,
    data: tuple[list[Sample], list[str], str],
    log_dir: Path,
    hooks: TrainingHooks | None,
    objective: Objective | None,
    batches: Callable[..., TrainingBatches] = TrainingBatches,
) -> TrainResult:
    """Write ``<run dir>/config.json``, cache latents, and train ``trainable`` on the samples.

    ``data`` is (samples, template lines, the word [name] stands for); ``batches`` builds the batch source from
    ``TrainingBatches``' arguments (DreamBooth pairs instance and class images). Without a resume sidecar a continued
    run draws new batches (seed + start step) instead of repeating the first steps' ones.
    """
    samples, template, name = data
    trainable.run_dir.mkdir(parents=True, exist_ok=True)
    main = distributed.is_main()  # with several ranks only rank 0 writes
    if main:
        write_bytes_atomic(trainable.run_dir / "config.json", to_json(config).encode("utf-8"))
    seed = config.train.seed
    cache = LatentCache(
        samples,
        parts.latent_encoder,
        config.data.latent_sampling,
        torch.Generator().manual_seed(seed),
        flip=config.data.flip,
        store=latent_store(config.data, parts, log_dir),
    )
    batch_seed = seed if trainable.resume else seed + trainable.start_step
    prompts = PromptMaker(template, name, config.data, random.Random(batch_seed))
    # every rank draws the same global batch (train.batch_size per rank) and trains on its rows of it
    source = batches(samples, cache, prompts, config.train.batch_size * distributed.world(), batch_seed)
    objective = objective or DiffusionObjective(config.train.noise_offset, config.train.min_snr_gamma)
    loss_log = LossLog(trainable.run_dir / "loss.csv" if main else None, trainable.start_step)
    conditions = None
    if config.train.cache_text_encoder_outputs and getattr(trainable, "fixed_condition", False):
        precision = resolve_precision(config.train.mixed_precision, parts.device)
        conditions = CachedConditions.build(parts, samples, prompts, config.data.flip, precision)
    return train(parts, trainable, source, objective, config.train, hooks, loss_log, conditions)


def resolve_epochs(config: Any, samples: list[Sample]) -> Any:
    """``config`` with ``epochs`` / ``save_every_epochs`` (when > 0) turned into ``train.steps`` / ``save_every``
    (an epoch: every image once, in global batches of ``train.batch_size`` x the number of ranks)."""
    global_batch = config.train.batch_size * distributed.world()
    per_epoch = math.ceil(batches_per_epoch(samples, global_batch) / config.train.gradient_accumulation)
    train_cfg = config.train
    if config.epochs:
        train_cfg = dataclasses.replace(train_cfg, steps=config.epochs * per_epoch)
    if config.save_every_epochs:
        train_cfg = dataclasses.replace(train_cfg, save_every=config.save_every_epochs * per_epoch)
    return dataclasses.replace(config, train=train_cfg)


def check_log_folder(log_dir: Path, output_dir: Path, what: str) -> None:
    """Refuse a log folder inside the host's model folder (numbered copies there would load as models)."""
    if is_inside(log_dir, output_dir):
        raise ConfigError(
            f"the log folder {log_dir} is inside the {what} folder {output_dir}; numbered copies there would all "
            f"be listed as {what}s. Choose a log folder outside it (Settings -> Trainer)"
        )


def check_total_steps(start_step: int, config: Any, source: str) -> None:
    """Refuse a run whose starting point has already trained ``train.steps`` (the total)."""
    if start_step >= config.train.steps:
        raise ConfigError(
            f"{source} has already trained {start_step} steps and train.steps is {config.train.steps} "
            "(the total, counting earlier runs); raise train.steps to train further",
            field="train.steps",
        )


def resumed_step(file_step: int, resume: ResumeState | None, hooks: TrainingHooks | None) -> int:
    """The step a run continues from: the file's, or the resume state's when that is a later, complete save.

    The latter happens when a run was killed after writing its resume state (and numbered copy) but before
    replacing the main file; the run continues from that save exactly.
    """
    if resume is None or resume.step == file_step:
        return file_step
    if hooks is not None:
        hooks.on_warning(
            f"continuing from step {resume.step}, the last complete save (the file says step {file_step}; the "
            "earlier run stopped while saving)"
        )
    return resume.step
