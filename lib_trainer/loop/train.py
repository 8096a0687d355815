"""The training loop, in one fixed order (nanoGPT style):

lr -> forward/loss over micro-batches -> backward -> clip -> optimizer step -> zero_grad -> log
-> save/preview -> stop check. Methods plug in through ``Trainable``; UIs through ``TrainingHooks``.
The host model is frozen for the run and restored in ``finally``, also on errors and interrupts.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lib_trainer.config import TrainConfig
from lib_trainer.errors import TrainingError
from lib_trainer.loop.checkpoint import ResumeState
from lib_trainer.loop.hooks import Progress, TrainingHooks
from lib_trainer.loop.precision import autocast, grad_scaler, resolve_precision
from lib_trainer.loop.schedules import LearningRate
from lib_trainer.models.guard import frozen_host
from lib_trainer.models.parts import ModelParts


class Trainable(Protocol):
    """What a method gives the loop: parameters, how it changes the model, conditioning, saving.

    A trainable may also define ``param_groups()`` -> ``[{"params": [...], "lr_scale": float, "stop_at": int}]``
    for per-group learning rates (the schedule's rate times ``lr_scale``; 0 after step ``stop_at``).
    """

    start_step: int
    resume: ResumeState | None

    def parameters(self) -> list[torch.Tensor]: ...

    def attach(self, parts: ModelParts) -> contextlib.AbstractContextManager: ...

    def condition(self, parts: ModelParts, prompts: list[str]) -> torch.Tensor: ...

    def save(self, step: int, resume: ResumeState) -> list[Path]: ...


class Objective(Protocol):
    """Per-sample loss ``[B]`` for latents and conditioning (the denoising loss, or a test's own)."""

    def loss(
        self, parts: ModelParts, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor: ...


class BatchSource(Protocol):
    """Endless batches of (latents on CPU, prompts[, extras]), with its random state for resuming.

    ``extras`` may hold per-sample loss ``weights`` ``[B]`` and a loss ``mask`` ``[B, 1, h, w]``.
    """

    def next_batch(self) -> tuple: ...

    def rng_state(self) -> dict[str, Any]: ...

    def set_rng_state(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    """How a run ended."""

    start_step: int
    step: int
    stopped: bool
    saved: list[Path] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)


class LossLog:
    """Loss history in memory (for charts) and as CSV on disk (step, loss, learning_rate, elapsed_s)."""

    FIELDS = ("step", "loss", "learning_rate", "elapsed_s")

    def __init__(self, path: Path | None):
        self.path = path
        self.history: list[dict[str, float]] = []
        if path is not None and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(",".join(self.FIELDS) + "\n", encoding="utf-8")

    def add(self, row: dict[str, float]) -> None:
        """Record one step."""
        self.history.append(row)
        if self.path is not None:
            with self.path.open("a", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow([row[k] for k in self.FIELDS])


@dataclass
class _Run:
    """Mutable state of one run."""

    parts: ModelParts
    trainable: Trainable
    config: TrainConfig
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    batches: BatchSource
    step: int
    groups: list[dict[str, Any]]
    last_saved: int = -1
    saved: list[Path] = field(default_factory=list)


def train(
    parts: ModelParts,
    trainable: Trainable,
    batches: BatchSource,
    objective: Objective,
    config: TrainConfig,
    hooks: TrainingHooks | None = None,
    loss_log: LossLog | None = None,
) -> TrainResult:
    """Train ``trainable`` on ``parts`` until ``config.steps`` (total, counting resumed steps) or a stop."""
    hooks = hooks or TrainingHooks()
    loss_log = loss_log or LossLog(None)
    precision = resolve_precision(config.mixed_precision, parts.device)
    groups = trainable.param_groups() if hasattr(trainable, "param_groups") else [{"params": trainable.parameters()}]
    optimizer = torch.optim.AdamW(
        [{"params": g["params"], "lr": 0.0} for g in groups], lr=0.0, weight_decay=config.weight_decay
    )
    generator = torch.Generator(device=parts.device).manual_seed(config.seed)
    run = _Run(parts, trainable, config, optimizer, generator, batches, trainable.start_step, groups)
    _restore(run, trainable.resume)
    schedule = LearningRate(config.learning_rate, config.lr_schedule, config.lr_warmup_steps, config.steps)
    scaler = grad_scaler(parts.device, precision)
    started, stopped = time.monotonic(), False
    with frozen_host(parts.host_modules.values()), trainable.attach(parts):
        hooks.on_start(config.steps, run.step)
        try:
            while run.step < config.steps:
                rate = schedule.at(run.step + 1)
                loss, prompt = _optimizer_step(run, objective, rate, precision, scaler)
                run.step += 1
                elapsed = time.monotonic() - started
                loss_log.add({"step": run.step, "loss": loss, "learning_rate": rate, "elapsed_s": round(elapsed, 3)})
                hooks.on_progress(_progress(run, loss, rate, elapsed, prompt))
                _save_and_preview(run, hooks)
                if hooks.should_stop():
                    stopped = True
                    break
        except (Exception, KeyboardInterrupt):
            _save_if_new(run, hooks)  # a crash keeps the work done so far (if the tensors are finite)
            raise
        _save_if_new(run, hooks)
    return TrainResult(trainable.start_step, run.step, stopped, run.saved, loss_log.history)


def _optimizer_step(run: _Run, objective: Objective, rate: float, precision: str, scaler) -> tuple[float, str]:
    for group, spec in zip(run.optimizer.param_groups, run.groups, strict=True):
        stopped = spec.get("stop_at") and run.step + 1 > spec["stop_at"]  # e.g. "stop training the TE at step N"
        group["lr"] = 0.0 if stopped else rate * spec.get("lr_scale", 1.0)
    total, prompt = 0.0, ""
    for _ in range(run.config.gradient_accumulation):
        batch = run.batches.next_batch()
        latents, prompts = batch[0], batch[1]
        extras = batch[2] if len(batch) > 2 else {}  # optional per-sample "weights" [B] and "mask" [B, 1, h, w]
        prompt = prompts[0]
        device = run.parts.device
        with autocast(device, precision):
            cond = run.trainable.condition(run.parts, prompts)
            masked = {"mask": extras["mask"].to(device)} if "mask" in extras else {}
            per_sample = objective.loss(run.parts, latents.to(device), cond, run.generator, **masked)
            if "weights" in extras:
                per_sample = per_sample * extras["weights"].to(per_sample.device)
            loss = per_sample.mean()
        if not math.isfinite(loss.item()):
            raise TrainingError(
                f"the loss became {loss.item()} at step {run.step + 1}; training stopped and the last finite state "
                "was kept. Lower train.learning_rate (or use mixed precision 'bf16'/'no') and train again"
            )
        loss = loss / run.config.gradient_accumulation
        (scaler.scale(loss) if scaler else loss).backward()
        total += loss.item()
    if scaler:
        scaler.unscale_(run.optimizer)
    _clip(run)
    if scaler:
        scaler.step(run.optimizer)
        scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total, prompt


def _clip(run: _Run) -> None:
    params = run.trainable.parameters()
    if run.config.clip_grad == "norm":
        torch.nn.utils.clip_grad_norm_(params, run.config.clip_grad_value)
    elif run.config.clip_grad == "value":
        torch.nn.utils.clip_grad_value_(params, run.config.clip_grad_value)


def _progress(run: _Run, loss: float, rate: float, elapsed: float, prompt: str) -> Progress:
    done = run.step - run.trainable.start_step
    remaining = run.config.steps - run.step
    eta = elapsed / done * remaining if done else 0.0
    return Progress(run.step, run.config.steps, loss, rate, elapsed, eta, prompt)


def _save_and_preview(run: _Run, hooks: TrainingHooks) -> None:
    every = run.config.save_every
    if (every and run.step % every == 0) or hooks.should_save():
        _save_if_new(run, hooks)
    if run.config.preview_every and run.step % run.config.preview_every == 0:
        hooks.on_preview(run.step, run.trainable)


def _save_if_new(run: _Run, hooks: TrainingHooks) -> None:
    if run.step == run.last_saved or run.step == run.trainable.start_step:
        return
    if not all(bool(torch.isfinite(p).all()) for p in run.trainable.parameters()):
        return
    resume = ResumeState(run.optimizer.state_dict(), _rng_state(run), run.step)
    for path in run.trainable.save(run.step, resume):
        run.saved.append(path)
        hooks.on_saved(path, run.step)
    run.last_saved = run.step


def _rng_state(run: _Run) -> dict[str, Any]:
    return {"generator": run.generator.get_state(), **run.batches.rng_state()}


def _restore(run: _Run, resume: ResumeState | None) -> None:
    if resume is None:
        return
    run.optimizer.load_state_dict(resume.optimizer)
    state = dict(resume.rng)
    generator_state = state.pop("generator", None)
    if generator_state is not None:
        run.generator.set_state(generator_state)
    run.batches.set_rng_state(state)
