"""What every method does once its trainable exists: the run folder, latents, prompts, batches, the loop."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from lib_trainer.config import to_json
from lib_trainer.data.dataset import LatentCache, PromptMaker, Sample, TrainingBatches
from lib_trainer.data.latent_store import latent_store
from lib_trainer.loop.hooks import TrainingHooks
from lib_trainer.loop.train import LossLog, Objective, Trainable, TrainResult, train
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
) -> TrainResult:
    """Write ``<run dir>/config.json``, cache latents, and train ``trainable`` on the samples.

    ``data`` is (samples, template lines, the word [name] stands for). Without a resume sidecar a continued run
    draws new batches (seed + start step) instead of repeating the first steps' ones.
    """
    samples, template, name = data
    trainable.run_dir.mkdir(parents=True, exist_ok=True)
    (trainable.run_dir / "config.json").write_text(to_json(config), encoding="utf-8")
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
    batches = TrainingBatches(samples, cache, prompts, config.train.batch_size, batch_seed)
    objective = objective or DiffusionObjective(config.train.noise_offset, config.train.min_snr_gamma)
    return train(parts, trainable, batches, objective, config.train, hooks, LossLog(trainable.run_dir / "loss.csv"))
