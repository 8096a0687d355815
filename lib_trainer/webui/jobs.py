"""Training jobs: a FIFO worker thread runs them one after another under the host's queue lock.

The tab and the REST API submit the same jobs. ``submit`` checks everything knowable before step 1 (the
config, the preview settings, the paths against the allowed folders, the method's own checks against the
loaded model) and raises a TrainerError naming the field, so a bad job is refused instead of failing later.
Each job's record (state, step, loss history, ETA, saved files, previews, error) is what
``GET /trainer/v1/jobs/{id}`` returns and what the tab polls. ``host`` is the host-glue module
(lib_trainer.webui.host in the WebUI; a fake in tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import queue
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from lib_trainer.config import PreviewConfig, path_settings, to_dict
from lib_trainer.data.preprocess import PreprocessConfig, check_input_folder, preprocess_folder
from lib_trainer.data.templates import builtin_templates
from lib_trainer.errors import ConfigError, OutOfMemoryError, TrainerError
from lib_trainer.formats.files import check_allowed, write_atomic
from lib_trainer.grid import TestGridConfig
from lib_trainer.loop.hooks import Progress, TrainingHooks
from lib_trainer.loop.memory import PREFLIGHT_STEPS
from lib_trainer.methods import dreambooth as db
from lib_trainer.methods import hypernetwork as hn
from lib_trainer.methods import lora
from lib_trainer.methods import textual_inversion as ti
from lib_trainer.methods import token_finetune as rows
from lib_trainer.webui.form import size_defaults
from lib_trainer.webui.grid_job import prepare_grid, run_grid


@dataclass(frozen=True)
class Folders:
    """Where a host keeps what the trainer writes: its model folders and our log folder (``host.folders()``)."""

    embeddings: Path
    hypernetworks: Path
    lora: Path
    logs: Path
    checkpoints: Path


MAX_FINISHED_JOBS = 50  # finished jobs kept in memory (their files and previews stay on disk)
WORKER_IDLE_S = 5.0


def _verify_lora(job: Job, host: ModuleType) -> None:
    """Check the saved file's keys against the WebUI's own LoRA name mapping; mismatches become warnings."""
    folder = host.folders().lora
    saved = [Path(s["path"]) for s in job.saved if Path(s["path"]).parent == folder]
    if saved:
        unmatched = host.unmatched_lora_keys(saved[-1])
        if unmatched:
            job.warnings.append(f"{len(unmatched)} key(s) do not match the WebUI's modules: {', '.join(unmatched[:5])}")


def _after_dreambooth(job: Job, host: ModuleType) -> None:
    """Check an extracted LoRA like a trained one; switch the WebUI to the new checkpoint when asked."""
    _verify_lora(job, host)
    folder = host.folders().checkpoints
    saved = [Path(s["path"]) for s in job.saved if Path(s["path"]).parent == folder]
    if saved and job.config.dreambooth.keep_loaded and not job.cancel_requested:
        host.refresh_checkpoints()
        host.load_checkpoint(saved[-1])
        job.warnings.append(f"the WebUI now has {saved[-1].name} loaded (dreambooth.keep_loaded)")


def _run_preprocess(job: Job, host: ModuleType, hooks: TrainingHooks):
    config = job.config

    def progress(done: int, total: int, name: str) -> bool:
        job.step, job.total_steps = done, total
        return job.cancel_requested or host.interrupted()

    try:
        found = host.captioners(config.caption_blip, config.caption_deepbooru)
        result = preprocess_folder(config, found, progress)
    finally:
        host.release_captioners()
    job.step = job.total_steps if not job.cancel_requested else job.step
    job.saved += [{"path": path, "step": 0} for path in result["written"]]
    job.warnings += [f"{p['file']}: {p['reason']}" for p in result["problems"]]
    return types.SimpleNamespace(stopped=job.cancel_requested)


@dataclass(frozen=True)
class MethodSpec:
    """How the job queue builds, checks, names and runs one method.

    Training methods give ``module`` (with ``check(config, parts, paths)``), ``paths`` (their OutputPaths
    from the host's folders) and ``train``; preprocessing gives ``run`` instead.
    """

    config: type
    name: Callable[[Any], str]
    refresh: str  # the host function that makes new files appear in its panels
    module: ModuleType | None = None
    paths: Callable[[Any], Any] | None = None
    train: Callable[..., Any] | None = None
    after: Callable[[Job, ModuleType], None] | None = None  # checks of what was written
    run: Callable[[Job, ModuleType, TrainingHooks], Any] | None = None
    prepare: Callable[[Any, Any], Any] | None = None  # (config, manager) -> the job's plan, checked at submit


METHODS: dict[str, MethodSpec] = {
    "textual_inversion": MethodSpec(
        ti.TextualInversionConfig,
        lambda c: c.embedding.name,
        "refresh_embeddings",
        ti,
        lambda f: ti.OutputPaths(f.embeddings, f.logs / "textual_inversion"),
        ti.train_embedding,
    ),
    "lora": MethodSpec(
        lora.LoraConfig,
        lambda c: c.network.name,
        "refresh_loras",
        lora,
        lambda f: lora.OutputPaths(f.lora, f.logs / "lora"),
        lora.train_lora,
        after=_verify_lora,
    ),
    "hypernetwork": MethodSpec(
        hn.HypernetworkConfig,
        lambda c: c.hypernetwork.name,
        "refresh_hypernetworks",
        hn,
        lambda f: hn.OutputPaths(f.hypernetworks, f.logs / "hypernetworks"),
        hn.train_hypernetwork,
    ),
    "dreambooth": MethodSpec(
        db.DreamBoothConfig,
        lambda c: c.dreambooth.name,
        "refresh_checkpoints",
        db,
        lambda f: db.OutputPaths(f.checkpoints, f.lora, f.logs / "dreambooth"),
        db.train_dreambooth,
        after=_after_dreambooth,
    ),
    "embedding_finetune": MethodSpec(
        rows.EmbeddingFinetuneConfig,
        lambda c: c.finetune.name,
        "refresh_checkpoints",
        rows,
        lambda f: rows.OutputPaths(f.logs / "token_rows", f.checkpoints, f.logs / "embedding_finetune"),
        rows.train_rows,
    ),
    "preprocess": MethodSpec(
        PreprocessConfig, lambda c: Path(c.output_dir).name, "reset_conditioning_cache", run=_run_preprocess
    ),
    "test_grid": MethodSpec(
        TestGridConfig, lambda c: f"grid of job {c.job}", "reset_conditioning_cache", run=run_grid, prepare=prepare_grid
    ),
}


@dataclass
class Job:
    """One submitted run and everything a client may ask about it."""

    id: str
    method: str
    config: Any
    preview: PreviewConfig | None = None
    state: str = "queued"  # queued -> running -> done | interrupted | failed | cancelled
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    learning_rate: float | None = None
    eta_s: float | None = None
    steps_per_s: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    saved: list[dict[str, Any]] = field(default_factory=list)
    previews: list[tuple[int, Path]] = field(default_factory=list)  # (step, PNG file in the run folder)
    error: str | None = None
    status: str = ""  # what the job does outside its steps (class images 3/50)
    warnings: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    cancel_requested: bool = False
    save_requested: bool = False
    preflight: bool = False  # a memory check: PREFLIGHT_STEPS real steps, nothing saved, logs in a temporary folder
    memory: dict[str, Any] | None = None  # the MemoryReport after the first steps (or the out-of-memory verdict)
    output_dir: str = ""  # the folder the job's files go to (the job panel shows and opens it)
    plan: Any = None  # what a job that is not a training run will do (a test grid's rows), fixed at submit
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        """Whether the job has ended (in any way)."""
        return self.state not in ("queued", "running")

    def summary(self, since: int = 0) -> dict[str, Any]:
        """JSON view; ``since`` limits the loss history to steps after it (negative: no history, as in job lists)."""
        return {
            "id": self.id,
            "method": self.method,
            "state": self.state,
            "step": self.step,
            "total_steps": self.total_steps,
            "loss": self.loss,
            "learning_rate": self.learning_rate,
            "eta_s": self.eta_s,
            "steps_per_s": self.steps_per_s,
            "history": [h for h in self.history if h["step"] > since] if since >= 0 else [],
            "saved": list(self.saved),
            "error": self.error,
            "status": self.status,
            "created_at": self.created_at,
            "previews": [{"index": i, "step": step} for i, (step, _) in enumerate(self.previews)],
            "name": METHODS[self.method].name(self.config),
            "warnings": list(self.warnings),
            "preflight": self.preflight,
            "memory": self.memory,
            "config": to_dict(self.config),
            "preview": to_dict(self.preview) if self.preview is not None else None,
            "output_dir": self.output_dir,
            "finished_at": self.finished_at,
        }


class JobHooks(TrainingHooks):
    """Bridges the training loop to a Job record and to the host's progress/interrupt state."""

    def __init__(self, job: Job, host: ModuleType, name: str):
        self.job, self.host, self.name = job, host, name
        self.dry_run = job.preflight

    def on_memory(self, report: Any) -> None:
        self.job.memory = dataclasses.asdict(report)
        self.on_status(report.text())
        super().on_memory(report)

    def on_start(self, total_steps: int, start_step: int) -> None:
        self.job.total_steps, self.job.step = total_steps, start_step

    def on_progress(self, progress: Progress) -> None:
        job = self.job
        job.step, job.loss, job.learning_rate = progress.step, progress.loss, progress.learning_rate
        job.eta_s, job.steps_per_s = progress.eta_s, progress.steps_per_s
        job.history.append(
            {
                "step": progress.step,
                "loss": progress.loss,
                "learning_rate": progress.learning_rate,
                **progress.loss_parts,
            }
        )
        job.status = ""
        self.host.report_progress(progress, self.name)

    def should_stop(self) -> bool:
        return self.job.cancel_requested or self.host.interrupted()

    def should_save(self) -> bool:
        requested, self.job.save_requested = self.job.save_requested, False
        return requested

    def on_saved(self, path: Path, step: int) -> None:
        self.job.saved.append({"path": str(path), "step": step})

    def on_warning(self, message: str) -> None:
        self.job.warnings.append(message)

    def on_status(self, text: str) -> None:
        self.job.status = text
        self.host.report_status(f"trainer: {self.name}: {text}")

    def generate_images(self, settings: dict[str, Any]) -> list[Any]:
        images = self.host.render_txt2img(settings)
        for image in images:
            self.host.show_image(image)
        return images

    def on_preview(self, step: int, state: Any) -> None:
        preview = self.job.preview
        if preview is None or not preview.enabled:
            return
        settings = {**dataclasses.asdict(preview), "prompt": preview.prompt.replace("[name]", self.name)}
        settings["clip_skip"] = self.job.config.train.clip_skip
        folder = Path(state.run_dir) / "previews"
        with self._preview_state(state, step, folder):
            images = self.host.render_txt2img(settings)
        for i, image in enumerate(images):
            path = write_atomic(folder / f"{self.name}-{step:06d}-{i}.png", lambda tmp, im=image: im.save(tmp, "PNG"))
            self.job.previews.append((step, path))
            self.host.show_image(image)

    def _preview_state(self, state: Any, step: int, folder: Path):
        """The training state as txt2img should see it: networks as the host shows them (attached in their
        ``for_preview`` mode, or loaded by the host from a preview file in ``folder``), an embedding registered with
        the host under its name."""
        if hasattr(state, "for_preview"):
            return self.host.network_preview(self.name, state, step, folder)
        self.host.register_embedding(self.name, state.file_tensors())
        return contextlib.nullcontext()


class JobManager:
    """Queue of jobs run one at a time by a daemon worker thread (started when work arrives)."""

    def __init__(self, host: ModuleType):
        self.host = host
        self.jobs: dict[str, Job] = {}
        self.pending: queue.Queue[Job] = queue.Queue()
        self._ids = itertools.count(1)
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, method: Any, config: Any, preview: Any = None, preflight: bool = False) -> Job:
        """Check ``config`` for ``method`` (TrainerError naming the field when it is wrong) and queue a job;
        ``preflight``: only measure its memory (PREFLIGHT_STEPS real steps, nothing written where the run writes)."""
        parsed, preview_config = self.validate(method, config, preview)
        if preflight and METHODS[method].train is None:
            raise ConfigError(f"a memory check needs a training method, not {method!r}", field="preflight")
        with self._lock:
            job = Job(id=f"{int(time.time())}-{next(self._ids)}", method=method, config=parsed, preview=preview_config)
            job.preflight = bool(preflight)
            job.plan = METHODS[method].prepare(parsed, self) if METHODS[method].prepare else None
            job.output_dir = str(self.output_dir(job))
            self.jobs[job.id] = job
            self._forget_old_jobs()
            self.pending.put(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="trainer-jobs", daemon=True)
                self._worker.start()
        return job

    def validate(self, method: Any, config: Any, preview: Any = None) -> tuple[Any, PreviewConfig | None]:
        """The parsed config and preview of a job, after every check that can be made before it runs."""
        if method is None:
            raise ConfigError(f"method is missing; give one of {', '.join(METHODS)}", field="method")
        if not isinstance(method, str) or method not in METHODS:
            raise ConfigError(f"method {method!r} is unknown; valid methods: {', '.join(METHODS)}", field="method")
        unavailable = self.host.unavailable_methods()
        if method in unavailable:
            raise ConfigError(f"method {method!r} is not available here: {unavailable[method]}", field="method")
        spec = METHODS[method]
        if spec.module is not None:
            config = self._with_model_sizes(config)
        parsed = spec.config.from_dict(config)
        if spec.module is None:
            preview_config = None
        else:
            preview_config = PreviewConfig.from_dict(self._with_preview_size(preview))
            self._check_sampler(preview_config.sampler, "preview.sampler", preview_config.enabled)
            generation = getattr(parsed, "class_generation", None)
            if generation is not None:
                self._check_sampler(generation.sampler, "class_generation.sampler", True)
            parsed = self._with_host_defaults(parsed)
        check_paths(parsed, self.host.allowed_roots())
        if spec.module is not None:
            parts = self.host.model_parts(parsed.train.clip_skip)
            spec.module.check(parsed, parts, spec.paths(self.host.folders()))
        elif spec.prepare is not None:
            spec.prepare(parsed, self)
        else:
            check_input_folder(parsed)
        return parsed, preview_config

    def _check_sampler(self, sampler: str, field: str, used: bool) -> None:
        names = self.host.sampler_names()
        if used and sampler not in names:
            raise ConfigError(
                f"{field} {sampler!r} is not a sampler of this WebUI; use one of {', '.join(names)}", field=field
            )

    def _model_sizes(self, section: str) -> dict[str, int]:
        """``form.size_defaults`` of the loaded model for one section ("data", "preview"), without the prefix."""
        prefix = section + "."
        defaults = size_defaults(self.host.native_resolution())
        return {k[len(prefix) :]: v for k, v in defaults.items() if k.startswith(prefix)}

    def _with_preview_size(self, preview: Any) -> Any:
        """A preview without width/height renders at the loaded model's size."""
        if preview is None:
            return {"enabled": False}
        return {**self._model_sizes("preview"), **preview} if isinstance(preview, dict) else preview

    def _with_model_sizes(self, config: Any) -> Any:
        """Image sizes not given follow the loaded model (``form.size_defaults``: 1024 on SDXL, else 512); the
        bucket sides only when the size itself was not given (they are relative to it)."""
        data = config.get("data") if isinstance(config, dict) else None
        sizes = self._model_sizes("data")
        if not isinstance(data, dict) or not sizes or "width" in data or "height" in data:
            return config
        return {**config, "data": {**sizes, **data}}

    def _with_host_defaults(self, config: Any) -> Any:
        """Settings that follow the host unless given: clip skip 0 = the WebUI's Clip skip setting."""
        if config.train.clip_skip:
            return config
        train = dataclasses.replace(config.train, clip_skip=self.host.webui_clip_skip())
        return dataclasses.replace(config, train=train)

    def _forget_old_jobs(self) -> None:
        finished = [job_id for job_id, job in self.jobs.items() if job.finished]
        for job_id in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self.jobs[job_id]

    def output_dir(self, job: Job) -> Path:
        """Where the job's main files go: the method's model folder, or a preparation's output folder."""
        spec = METHODS[job.method]
        if job.plan is not None and hasattr(job.plan, "out_dir"):
            return Path(job.plan.out_dir)
        if spec.paths is None:
            return Path(job.config.output_dir)
        return Path(dataclasses.astuple(spec.paths(self.host.folders()))[0])

    def get(self, job_id: str) -> Job | None:
        """The job with ``job_id``, if any."""
        return self.jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Ask a job to stop (a running one saves its work first); a queued one never starts."""
        job = self.jobs.get(job_id)
        if job is not None:
            job.cancel_requested = True
        return job

    def wait(self, job_id: str, timeout: float = 60.0) -> Job:
        """Block until the job has ended (tests, scripts)."""
        deadline = time.monotonic() + timeout
        job = self.jobs[job_id]
        while not job.finished and time.monotonic() < deadline:
            time.sleep(0.02)
        return job

    def _work(self) -> None:
        while True:
            try:
                job = self.pending.get(timeout=WORKER_IDLE_S)
            except queue.Empty:
                with self._lock:  # submit() holds the lock while queueing: nothing can slip in between
                    if self.pending.empty():
                        self._worker = None
                        return
                continue
            self.run(job)

    def run(self, job: Job) -> None:
        """Run one job under the host's queue lock; record the outcome, never raise."""
        if job.cancel_requested:
            job.state, job.finished_at = "cancelled", time.time()
            return
        spec = METHODS[job.method]
        name = spec.name(job.config)
        total = getattr(getattr(job.config, "train", None), "steps", 0)
        with self.host.queue_lock(), self.host.job_state(f"trainer: {name}", total):
            job.state = "running"
            try:
                self.host.clear_merged_networks()
                result = self._execute(job, spec, JobHooks(job, self.host, name))
                job.state = "interrupted" if result.stopped else "done"
            except TrainerError as exc:
                job.state, job.error = "failed", str(exc)
                if isinstance(exc, OutOfMemoryError):
                    job.memory = {"fits": False, "steps": job.step, "advice": str(exc)}
            except Exception as exc:  # a bug or a CUDA error: keep the server alive, report it on the job
                job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            finally:
                job.finished_at = time.time()
                getattr(self.host, spec.refresh)()

    def _execute(self, job: Job, spec: MethodSpec, hooks: JobHooks):
        if spec.run is not None:
            return spec.run(job, self.host, hooks)
        parts = self.host.model_parts(job.config.train.clip_skip)
        paths = spec.paths(self.host.folders())
        if job.preflight:
            return _preflight(job, spec, parts, paths, hooks)
        result = spec.train(job.config, parts, paths, hooks)
        if spec.after is not None:
            spec.after(job, self.host)
        return result


def _preflight(job: Job, spec: MethodSpec, parts: Any, paths: Any, hooks: JobHooks):
    """Run the job's first PREFLIGHT_STEPS steps as configured, saving nothing (``hooks.dry_run``), with its run
    folder (config, loss log, latent cache) in a temporary folder that is removed afterwards. DreamBooth's class
    images are generated into their folder as for the run (it uses them)."""
    train = dataclasses.replace(job.config.train, steps=PREFLIGHT_STEPS, save_every=0, preview_every=0)
    changes: dict[str, Any] = {"train": train}
    if getattr(job.config, "resume_from", ""):
        changes["resume_from"] = ""
    config = dataclasses.replace(job.config, **changes)
    with tempfile.TemporaryDirectory(prefix="trainer-preflight-") as tmp:
        paths = dataclasses.replace(paths, log_dir=Path(tmp))
        return spec.train(config, parts, paths, hooks)


def check_paths(config: Any, roots: list[Path] | None) -> None:
    """Every path setting of ``config`` inside the allowed folders (AccessError naming the field); None = any."""
    if roots is None:
        return
    for field_path, kind, value in path_settings(config):
        if kind == "template" and value in builtin_templates():
            continue
        check_allowed(value, roots, field_path)
