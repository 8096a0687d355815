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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lib_trainer.config import TrainConfig
from lib_trainer.errors import ConfigError, OutOfMemoryError, TrainerError, TrainingError
from lib_trainer.formats.files import write_bytes_atomic
from lib_trainer.loop import distributed
from lib_trainer.loop.checkpoint import ResumeState
from lib_trainer.loop.hooks import Progress, TrainingHooks
from lib_trainer.loop.memory import PREFLIGHT_STEPS, MemoryProbe, memory_advice
from lib_trainer.loop.optimizers import OptimizerMode, build_optimizer, parse_optimizer_args, uses_own_rate
from lib_trainer.loop.precision import Bf16Masters, autocast, bf16_weights, grad_scaler, resolve_precision
from lib_trainer.loop.schedules import LearningRate
from lib_trainer.models.attention import sdpa_attention
from lib_trainer.models.checkpointing import checkpoint_targets, checkpointed
from lib_trainer.models.compiled import compiled_unet
from lib_trainer.models.guard import IdleModules, frozen_host
from lib_trainer.models.parts import ModelParts

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # older torch (2.1-2.4) has only the cuda name


class Trainable(Protocol):
    """What a method gives the loop: parameters, how it changes the model, conditioning, saving.

    A trainable may also define ``param_groups()`` -> ``[{"params": [...], "lr_scale": float, "stop_at": int}]``
    for per-group learning rates (the schedule's rate times ``lr_scale``; 0 after step ``stop_at``), and
    ``resume_masters = False`` when its saves do not keep a resume state (full fine-tuning: an fp32 copy of a
    whole UNet at every save would cost gigabytes for nothing), and ``trains_text_encoder = True`` when gradients
    flow through text-encoder weights it trains (``train.gradient_checkpointing`` then covers its layers too).
    """

    start_step: int
    resume: ResumeState | None

    def parameters(self) -> list[torch.Tensor]: ...

    def attach(self, parts: ModelParts) -> contextlib.AbstractContextManager: ...

    def condition(self, parts: ModelParts, prompts: list[str]) -> torch.Tensor: ...

    def save(self, step: int, resume: ResumeState) -> list[Path]: ...


class Objective(Protocol):
    """Per-sample loss ``[B]`` for latents and conditioning (the denoising loss, or a test's own). With several
    ranks it is also given ``rows=(start, total)``: the latents are those rows of a batch of ``total``."""

    def loss(
        self, parts: ModelParts, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor: ...


class BatchSource(Protocol):
    """Endless batches of (latents on CPU, prompts[, extras]), with its random state for resuming.

    ``extras`` may hold per-sample loss ``weights`` ``[B]``, a loss ``mask`` ``[B, 1, h, w]``, and ``prior``
    ``[B]`` (bool): which samples are class images for prior preservation (the loss is then the DreamBooth
    objective, mean instance loss + the weighted mean class loss, and both parts are logged).
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
    """Loss history in memory (for charts) and as CSV on disk (step, loss, learning_rate, elapsed_s, and the
    instance / prior parts of a prior-preservation run, empty otherwise).

    A run that continues from step N keeps the rows up to N and drops later ones (written by a run that was
    killed after its last save), so the log and the chart stay continuous.
    """

    FIELDS = ("step", "loss", "learning_rate", "elapsed_s", "loss_instance", "loss_prior")  # parts: prior preservation

    def __init__(self, path: Path | None, start_step: int = 0):
        self.path = path
        self.history: list[dict[str, float]] = []
        if path is not None:
            kept = _rows_up_to(path, start_step) if path.exists() else []
            lines = [",".join(self.FIELDS), *kept]
            write_bytes_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))

    def add(self, row: dict[str, float]) -> None:
        """Record one step."""
        self.history.append(row)
        if self.path is not None:
            with self.path.open("a", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow([row.get(k, "") for k in self.FIELDS])


def _rows_up_to(path: Path, step: int) -> list[str]:
    """The data lines of a loss log whose step is at most ``step`` (unreadable lines are dropped)."""
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
        first = line.split(",", 1)[0]
        if first.isdigit() and int(first) <= step:
            kept.append(line)
    return kept


class StepRng:
    """torch's global random state as training sees it (dropout uses it), kept apart from the host's.

    Each step runs with this state swapped in and the host's swapped back afterwards, so previews or other
    generations between steps cannot change a run, and a resumed run draws exactly what the first one would.
    """

    def __init__(self, seed: int, device: torch.device):
        self.seed, self.device = seed, device
        self.cpu = torch.Generator().manual_seed(seed).get_state()
        self.cuda: torch.Tensor | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Run the block with training's random state; keep what it advanced to."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if devices:
                if self.cuda is None:
                    torch.cuda.manual_seed(self.seed)
                else:
                    torch.cuda.set_rng_state(self.cuda, devices[0])
            yield
            self.cpu = torch.get_rng_state()
            if devices:
                self.cuda = torch.cuda.get_rng_state(devices[0])

    def state(self) -> dict[str, torch.Tensor]:
        """For a resume sidecar."""
        return {"torch_cpu": self.cpu, **({"torch_cuda": self.cuda} if self.cuda is not None else {})}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what ``state`` returned."""
        if "torch_cpu" in state:
            self.cpu = state["torch_cpu"]
        if "torch_cuda" in state and self.device.type == "cuda":
            self.cuda = state["torch_cuda"]


class _NonFiniteLoss(Exception):
    """The loss was NaN or infinite (turned into a TrainingError once the last good state is saved)."""

    def __init__(self, value: float, step: int):
        super().__init__(f"loss {value} at step {step}")
        self.value, self.step = value, step


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
    step_rng: StepRng
    precision: str
    idle: IdleModules
    masters: Bf16Masters | None = None  # full_bf16: fp32 masters of the trained parameters
    conditions: Any = None  # (parts, prompts) -> conditioning from a cache, or None: the trainable's condition
    mode: OptimizerMode | None = None
    own_rate: bool = False  # the optimizer sets its learning rate itself (Adafactor's relative step)
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
    conditions: Any = None,
) -> TrainResult:
    """Train ``trainable`` on ``parts`` until ``config.steps`` (total, counting resumed steps) or a stop.

    ``conditions`` (``methods/cached_text.CachedConditions``) replaces the trainable's ``condition`` with outputs
    encoded before training; the text encoder then counts as idle, like the VAE (latents are cached), and both wait
    on the CPU while the UNet trains on CUDA (``train.offload_idle_models``)."""
    hooks = hooks or TrainingHooks()
    loss_log = loss_log or LossLog(None)
    precision = resolve_precision(config.mixed_precision, parts.device)
    groups = trainable.param_groups() if hasattr(trainable, "param_groups") else [{"params": trainable.parameters()}]
    masters = Bf16Masters(trainable.parameters()) if precision == "full_bf16" else None
    optimizer_args = parse_optimizer_args(config.optimizer_args)
    optimizer_groups = masters.groups(groups) if masters else groups
    optimizer = build_optimizer(config.optimizer, optimizer_groups, config.weight_decay, optimizer_args, parts.device)
    generator = torch.Generator(device=parts.device).manual_seed(config.seed)
    step_rng = StepRng(config.seed, parts.device)
    idle = IdleModules(_idle_modules(parts, conditions is not None), _offload_target(parts, config))
    run = _Run(
        parts, trainable, config, optimizer, generator, batches, trainable.start_step, groups, step_rng, precision, idle
    )
    if conditions is not None:
        run.conditions = conditions
        conditions.live = lambda encode: _with_present(idle, encode)
    run.mode, run.own_rate = OptimizerMode(optimizer), uses_own_rate(config.optimizer, optimizer_args)
    run.masters = masters
    with _exact(run):
        _restore(run, trainable.resume)
        distributed.broadcast_parameters(trainable.parameters())
    run.mode.train()
    schedule = LearningRate(
        config.learning_rate,
        config.lr_schedule,
        config.lr_warmup_steps,
        config.steps,
        config.lr_cycles,
        config.lr_power,
    )
    scaler = grad_scaler(parts.device, precision)
    started, stopped = time.monotonic(), False
    blocks = checkpoint_targets(parts, getattr(trainable, "trains_text_encoder", False))
    checkpoints = checkpointed(blocks if config.gradient_checkpointing else [])
    attention = sdpa_attention(parts.unet, config.attention == "sdpa")
    compiled = compiled_unet(parts.unet, config.compile, hooks.on_status)
    probe = MemoryProbe(parts.device)
    stored_bf16 = bf16_weights(parts.unet, masters is not None)
    with (
        frozen_host(parts.host_modules.values()),
        trainable.attach(parts),
        checkpoints,
        attention,
        idle,
        compiled,
        stored_bf16,
    ):
        hooks.on_start(config.steps, run.step)
        probe.reset()
        try:
            while run.step < config.steps:
                rate = schedule.at(run.step + 1)
                loss, prompt, loss_parts = _optimizer_step(run, objective, rate, scaler)
                rate = _effective_rate(run, rate)
                run.step += 1
                elapsed = time.monotonic() - started
                row = {"step": run.step, "loss": loss, "learning_rate": rate, "elapsed_s": round(elapsed, 3)}
                loss_log.add({**row, **loss_parts})
                hooks.on_progress(_progress(run, loss, rate, elapsed, prompt, loss_parts))
                done = run.step - trainable.start_step
                if done == PREFLIGHT_STEPS or (done < PREFLIGHT_STEPS and run.step == config.steps):
                    hooks.on_memory(probe.report(done, config))
                _save_and_preview(run, hooks)
                if distributed.any_rank(hooks.should_stop(), parts.device):
                    stopped = True
                    break
        except (Exception, KeyboardInterrupt) as exc:
            _save_after_error(run, hooks)  # a crash keeps the work done so far (if the tensors are finite)
            _raise_explained(run, exc)
            raise
        _save_if_new(run, hooks)
        if masters:
            masters.restore()
    return TrainResult(trainable.start_step, run.step, stopped, run.saved, loss_log.history)


def _optimizer_step(run: _Run, objective: Objective, rate: float, scaler) -> tuple[float, str, dict[str, float]]:
    for group, spec in zip(run.optimizer.param_groups, run.groups, strict=True):
        if run.own_rate:
            break
        stopped = spec.get("stop_at") and run.step + 1 > spec["stop_at"]  # e.g. "stop training the TE at step N"
        group["lr"] = 0.0 if stopped else rate * spec.get("lr_scale", 1.0)
    with run.step_rng.active():
        total, prompt, loss_parts = _accumulate(run, objective, scaler)
    distributed.sum_gradients(run.trainable.parameters())
    if run.masters:
        run.masters.to_masters()
    if scaler:
        scaler.unscale_(run.optimizer)
    _clip(run)
    if scaler:
        scaler.step(run.optimizer)
        scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.masters:
        run.masters.to_params()
    return total, prompt, loss_parts


def _accumulate(run: _Run, objective: Objective, scaler) -> tuple[float, str, dict[str, float]]:
    """Forward and backward over ``gradient_accumulation`` micro-batches; the summed loss, a prompt, and the
    summed loss parts (instance / prior) when the batches carry class images. With several ranks each takes its
    rows of every (global) batch and the sums are over all ranks."""
    total, prompt, loss_parts = 0.0, "", {}
    steps = run.config.gradient_accumulation
    for _ in range(steps):
        batch = run.batches.next_batch()
        latents, prompts = batch[0], batch[1]
        extras = batch[2] if len(batch) > 2 else {}  # optional per-sample "weights" [B] and "mask" [B, 1, h, w]
        prompt = prompts[0]
        counts = _row_counts(extras, latents.shape[0])
        rows = distributed.share(latents.shape[0])
        if rows is not None:  # the objective draws for the whole batch and keeps this rank's rows
            latents, prompts, extras = rows.take(latents), rows.take(prompts), rows.take(extras)
        device = run.parts.device
        with autocast(device, run.precision):
            cond = (run.conditions or run.trainable.condition)(run.parts, prompts)
            options = {"mask": extras["mask"].to(device)} if "mask" in extras else {}
            if rows is not None:
                options["rows"] = (rows.start, rows.total)
            per_sample = objective.loss(run.parts, latents.to(device), cond, run.generator, **options)
            loss, parts = _combined_loss(per_sample * (0.0 if rows is not None and rows.idle else 1.0), extras, counts)
        if rows is None and not math.isfinite(loss.item()):
            raise _NonFiniteLoss(loss.item(), run.step + 1)
        loss = loss / steps
        (scaler.scale(loss) if scaler else loss).backward()
        total += loss.item()
        for key, value in parts.items():
            loss_parts[key] = loss_parts.get(key, 0.0) + value / steps
    if distributed.active():
        keys = sorted(loss_parts)
        total, *values = distributed.sum_values([total, *(loss_parts[k] for k in keys)], run.parts.device)
        loss_parts = dict(zip(keys, values, strict=True))
        if not math.isfinite(total):
            raise _NonFiniteLoss(total, run.step + 1)
    return total, prompt, loss_parts


def _row_counts(extras: dict[str, Any], rows: int) -> tuple[int, int, int]:
    """(rows, instance rows, class rows) of a whole batch: what its loss terms are averaged over."""
    prior = extras.get("prior")
    classes = int(prior.sum()) if prior is not None else 0
    return rows, rows - classes, classes


def _combined_loss(
    per_sample: torch.Tensor, extras: dict[str, Any], counts: tuple[int, int, int]
) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch loss from per-sample losses ``[B]``: their (weighted) mean; with ``prior`` in ``extras`` the
    DreamBooth objective (Ruiz et al. 2023, eq. 2): mean instance loss + mean of weight x class loss.

    The means are over the whole batch's ``counts`` (``_row_counts``), so on several ranks, each holding some of
    the rows, the ranks' losses (and gradients) add up to the batch's."""
    weights = extras["weights"].to(per_sample.device) if "weights" in extras else None
    prior = extras.get("prior")
    rows, instances, classes = counts
    if not instances or not classes:
        return (per_sample * weights if weights is not None else per_sample).sum() / rows, {}
    prior = prior.to(per_sample.device)
    instance = per_sample[~prior].sum() / instances
    class_loss = per_sample[prior] * (weights[prior] if weights is not None else 1.0)
    weighted_prior = class_loss.sum() / classes
    return instance + weighted_prior, {"loss_instance": instance.item(), "loss_prior": weighted_prior.item()}


def _idle_modules(parts: ModelParts, text_cached: bool) -> list[torch.nn.Module | None]:
    """Host modules a step does not use: the VAE (latents are cached), the text encoder when its outputs are."""
    return [parts.host_modules.get("vae"), parts.host_modules.get("text_encoder") if text_cached else None]


def _offload_target(parts: ModelParts, config: TrainConfig) -> torch.device | None:
    """Where idle modules wait: the CPU when training on CUDA (nothing to gain on the CPU itself)."""
    return torch.device("cpu") if config.offload_idle_models and parts.device.type == "cuda" else None


def _with_present(idle: IdleModules, encode):
    with idle.present():
        return encode()


def _effective_rate(run: _Run, rate: float) -> float:
    """The learning rate the first group really used: Prodigy's is its estimate d times the set rate, Adafactor's
    relative step its own."""
    group = run.optimizer.param_groups[0]
    if run.own_rate and hasattr(run.optimizer, "_get_lr"):
        state = run.optimizer.state.get(group["params"][0], {})
        return float(run.optimizer._get_lr(group, state)) if state else 0.0
    if "d" in group and isinstance(group["d"], float):  # Prodigy
        return rate * group["d"]
    return rate


def _exact(run: _Run) -> contextlib.AbstractContextManager:
    """full_bf16: the fp32 masters in place of the bf16 parameters for the block (saves, resume)."""
    return run.masters.exact() if run.masters else contextlib.nullcontext()


def _clip(run: _Run) -> None:
    params = run.masters.masters if run.masters else run.trainable.parameters()
    if run.config.clip_grad == "norm":
        torch.nn.utils.clip_grad_norm_(params, run.config.clip_grad_value)
    elif run.config.clip_grad == "value":
        torch.nn.utils.clip_grad_value_(params, run.config.clip_grad_value)


def _progress(
    run: _Run, loss: float, rate: float, elapsed: float, prompt: str, loss_parts: dict[str, float]
) -> Progress:
    done = run.step - run.trainable.start_step
    remaining = run.config.steps - run.step
    eta = elapsed / done * remaining if done else 0.0
    return Progress(run.step, run.config.steps, loss, rate, elapsed, eta, prompt, loss_parts)


def _save_and_preview(run: _Run, hooks: TrainingHooks) -> None:
    every = run.config.save_every
    asked = distributed.any_rank(hooks.should_save(), run.parts.device)  # every rank asks: it is a collective
    save = (every and run.step % every == 0) or asked
    preview = run.config.preview_every and run.step % run.config.preview_every == 0 and distributed.is_main()
    if not (save or preview):
        return
    run.mode.evaluate()  # schedule-free: the averaged weights are the ones saved and shown
    try:
        with run.idle.present():
            if save:
                _save_if_new(run, hooks)
            if preview:
                hooks.on_preview(run.step, run.trainable)
    finally:
        run.mode.train()


def _save_if_new(run: _Run, hooks: TrainingHooks) -> None:
    if run.step == run.last_saved or run.step == run.trainable.start_step or hooks.dry_run:
        return
    run.mode.evaluate()
    with run.idle.present(), _exact(run):
        _save_now(run, hooks)


def _save_now(run: _Run, hooks: TrainingHooks) -> None:
    params = run.trainable.parameters()
    if not all(bool(torch.isfinite(p).all()) for p in params):
        return
    keep = getattr(run.trainable, "resume_masters", True)
    masters = [p.detach().to("cpu", torch.float32, copy=True) for p in params] if keep else []
    state = {**_rng_state(run), "optimizer_name": run.config.optimizer}
    resume = ResumeState(run.optimizer.state_dict(), state, run.step, masters)
    for path in run.trainable.save(run.step, resume) if distributed.is_main() else []:
        run.saved.append(path)
        hooks.on_saved(path, run.step)
    run.last_saved = run.step


def _save_after_error(run: _Run, hooks: TrainingHooks) -> None:
    """Save what was trained before an error; a failing save is reported, never hides the error itself."""
    try:
        _save_if_new(run, hooks)
    except (TrainerError, OSError) as exc:
        hooks.on_warning(f"the state at step {run.step} could not be saved: {exc}")


def _raise_explained(run: _Run, exc: BaseException) -> None:
    """Turn a NaN loss or running out of GPU memory into a TrainingError saying what was kept and what to change."""
    kept = (
        f"The last good state (step {run.last_saved}) is saved."
        if run.last_saved > run.trainable.start_step
        else "Nothing new was saved."
    )
    if isinstance(exc, _NonFiniteLoss):
        raise TrainingError(
            f"the loss became {exc.value} at step {exc.step}; training stopped. {kept} Lower train.learning_rate "
            "(or use mixed precision 'bf16'/'no') and train again",
            field="train.learning_rate",
        ) from None
    if isinstance(exc, OOM):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        advice = memory_advice(run.config)
        field_name = "train.gradient_checkpointing" if not run.config.gradient_checkpointing else "train.batch_size"
        raise OutOfMemoryError(
            f"the GPU ran out of memory at step {run.step + 1} (batch size {run.config.batch_size}). {kept} The host "
            f"model is restored. To fit: {'; '.join(advice)}; or close other programs using the GPU",
            field=field_name,
        ) from exc


def _rng_state(run: _Run) -> dict[str, Any]:
    return {"generator": run.generator.get_state(), **run.step_rng.state(), **run.batches.rng_state()}


def _restore(run: _Run, resume: ResumeState | None) -> None:
    if resume is None:
        return
    state = dict(resume.rng)
    name = state.pop("optimizer_name", None)
    marks = {"betas", "momentum", "scale_parameter"}  # older sidecars: AdamW(8bit) / SGD / Adafactor
    saved = marks & {key for group in resume.optimizer["param_groups"] for key in group}
    current = marks & {key for group in run.optimizer.param_groups for key in group}
    if (name or run.config.optimizer) != run.config.optimizer or saved != current:
        raise ConfigError(
            f"the resume state was saved by another optimizer than train.optimizer {run.config.optimizer!r}; train "
            "on with the optimizer it was started with, or start a new file",
            field="train.optimizer",
        )
    run.optimizer.load_state_dict(resume.optimizer)
    params = run.trainable.parameters()
    if resume.params and [tuple(p.shape) for p in params] == [tuple(m.shape) for m in resume.params]:
        with torch.no_grad():  # exact fp32 values, not the file's (possibly fp16) copy
            for param, master in zip(params, resume.params, strict=True):
                param.copy_(master)
    generator_state = state.pop("generator", None)
    if generator_state is not None:
        run.generator.set_state(generator_state)
    run.step_rng.set_state({k: state.pop(k) for k in ("torch_cpu", "torch_cuda") if k in state})
    run.batches.set_rng_state(state)
