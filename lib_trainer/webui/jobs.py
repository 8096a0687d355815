"""Training jobs: a FIFO worker thread runs them one after another under the host's queue lock.

The tab and the REST API submit the same jobs. Each job's record (state, step, loss history, ETA, saved
files, previews, error) is what ``GET /trainer/v1/jobs/{id}`` returns and what the tab polls. ``host`` is
the host-glue module (lib_trainer.webui.host in the WebUI; a fake in tests).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import queue
import threading
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from lib_trainer.data.preprocess import PreprocessConfig, preprocess_folder
from lib_trainer.errors import TrainerError
from lib_trainer.loop.hooks import Progress, TrainingHooks
from lib_trainer.methods import hypernetwork as hn
from lib_trainer.methods import lora
from lib_trainer.methods import textual_inversion as ti

MAX_PREVIEWS = 32


def _run_textual_inversion(job: Job, host: ModuleType, hooks: TrainingHooks):
    folders = host.folders()
    paths = ti.OutputPaths(folders.embeddings, folders.logs / "textual_inversion")
    return ti.train_embedding(job.config, host.model_parts(job.config.train.clip_skip), paths, hooks)


def _run_lora(job: Job, host: ModuleType, hooks: TrainingHooks):
    folders = host.folders()
    paths = lora.OutputPaths(folders.lora, folders.logs / "lora")
    result = lora.train_lora(job.config, host.model_parts(job.config.train.clip_skip), paths, hooks)
    saved = [Path(s["path"]) for s in job.saved if Path(s["path"]).parent == folders.lora]
    if saved:
        unmatched = host.unmatched_lora_keys(saved[-1])
        if unmatched:
            job.warnings.append(f"{len(unmatched)} key(s) do not match the WebUI's modules: {', '.join(unmatched[:5])}")
    return result


def _run_hypernetwork(job: Job, host: ModuleType, hooks: TrainingHooks):
    folders = host.folders()
    paths = hn.OutputPaths(folders.hypernetworks, folders.logs / "hypernetworks")
    return hn.train_hypernetwork(job.config, host.model_parts(job.config.train.clip_skip), paths, hooks)


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
    """How the job queue builds, names and runs one training method."""

    config: type
    name: Callable[[Any], str]
    run: Callable[[Job, ModuleType, TrainingHooks], Any]
    refresh: str  # the host function that makes new files appear in its panels


METHODS: dict[str, MethodSpec] = {
    "textual_inversion": MethodSpec(
        ti.TextualInversionConfig, lambda c: c.embedding.name, _run_textual_inversion, "refresh_embeddings"
    ),
    "lora": MethodSpec(lora.LoraConfig, lambda c: c.network.name, _run_lora, "refresh_loras"),
    "hypernetwork": MethodSpec(
        hn.HypernetworkConfig, lambda c: c.hypernetwork.name, _run_hypernetwork, "refresh_hypernetworks"
    ),
    "preprocess": MethodSpec(
        PreprocessConfig, lambda c: Path(c.output_dir).name, _run_preprocess, "reset_conditioning_cache"
    ),
}


@dataclass
class Job:
    """One submitted run and everything a client may ask about it."""

    id: str
    method: str
    config: Any
    preview: dict[str, Any] | None = None
    state: str = "queued"  # queued -> running -> done | interrupted | failed | cancelled
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    learning_rate: float | None = None
    eta_s: float | None = None
    steps_per_s: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    saved: list[dict[str, Any]] = field(default_factory=list)
    previews: list[tuple[int, bytes]] = field(default_factory=list)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    cancel_requested: bool = False
    save_requested: bool = False

    def summary(self, since: int = 0) -> dict[str, Any]:
        """JSON view; ``since`` limits the loss history to steps after it."""
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
            "history": [h for h in self.history if h["step"] > since],
            "saved": list(self.saved),
            "error": self.error,
            "created_at": self.created_at,
            "previews": [{"index": i, "step": step} for i, (step, _) in enumerate(self.previews)],
            "name": METHODS[self.method].name(self.config),
            "warnings": list(self.warnings),
        }


class JobHooks(TrainingHooks):
    """Bridges the training loop to a Job record and to the host's progress/interrupt state."""

    def __init__(self, job: Job, host: ModuleType, name: str):
        self.job, self.host, self.name = job, host, name

    def on_start(self, total_steps: int, start_step: int) -> None:
        self.job.total_steps, self.job.step = total_steps, start_step

    def on_progress(self, progress: Progress) -> None:
        job = self.job
        job.step, job.loss, job.learning_rate = progress.step, progress.loss, progress.learning_rate
        job.eta_s, job.steps_per_s = progress.eta_s, progress.steps_per_s
        job.history.append({"step": progress.step, "loss": progress.loss, "learning_rate": progress.learning_rate})
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

    def on_preview(self, step: int, state: Any) -> None:
        if not self.job.preview or not self.job.preview.get("enabled", True):
            return
        settings = {**self.job.preview, "prompt": self.job.preview.get("prompt") or self.name}
        settings["prompt"] = settings["prompt"].replace("[name]", self.name)
        with self._preview_state(state):
            images = self.host.render_txt2img(settings)
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            self.job.previews.append((step, buffer.getvalue()))
            self.host.show_image(image)
        del self.job.previews[:-MAX_PREVIEWS]

    def _preview_state(self, state: Any) -> contextlib.AbstractContextManager:
        """The training state as txt2img should see it: networks stay attached (their ``for_preview`` mode), an
        embedding is registered with the host under its name."""
        if hasattr(state, "for_preview"):
            return state.for_preview()
        self.host.register_embedding(self.name, state.parameters()[0])
        return contextlib.nullcontext()


class JobManager:
    """Queue of jobs run one at a time by a daemon worker thread (started on first submit)."""

    def __init__(self, host: ModuleType):
        self.host = host
        self.jobs: dict[str, Job] = {}
        self.pending: queue.Queue[Job] = queue.Queue()
        self._ids = itertools.count(1)
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, method: str, config: dict[str, Any], preview: dict[str, Any] | None = None) -> Job:
        """Validate ``config`` for ``method`` (TrainerError when invalid) and queue a job; returns at once."""
        if method not in METHODS:
            raise TrainerError(f"method {method!r} is unknown; valid methods: {', '.join(METHODS)}", field="method")
        parsed = METHODS[method].config.from_dict(config)
        with self._lock:
            job = Job(id=f"{int(time.time())}-{next(self._ids)}", method=method, config=parsed, preview=preview)
            self.jobs[job.id] = job
            self.pending.put(job)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="trainer-jobs", daemon=True)
                self._worker.start()
        return job

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
        while job.state in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.02)
        return job

    def _work(self) -> None:
        while True:
            try:
                job = self.pending.get(timeout=5.0)
            except queue.Empty:
                return
            self.run(job)

    def run(self, job: Job) -> None:
        """Run one job under the host's queue lock; record the outcome, never raise."""
        if job.cancel_requested:
            job.state = "cancelled"
            return
        spec = METHODS[job.method]
        name = spec.name(job.config)
        total = getattr(getattr(job.config, "train", None), "steps", 0)
        with self.host.queue_lock(), self.host.job_state(f"trainer: {name}", total):
            job.state = "running"
            try:
                self.host.clear_merged_networks()
                result = spec.run(job, self.host, JobHooks(job, self.host, name))
                job.state = "interrupted" if result.stopped else "done"
            except TrainerError as exc:
                job.state, job.error = "failed", str(exc)
            except Exception as exc:  # a bug or a CUDA error: keep the server alive, report it on the job
                job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            finally:
                getattr(self.host, spec.refresh)()
