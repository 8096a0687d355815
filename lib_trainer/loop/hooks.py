"""How training talks to a UI: a hooks object with no-op defaults (progress, stop, save, preview)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib_trainer.errors import DatasetError


@dataclass(frozen=True)
class Progress:
    """Where training is: reported after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    learning_rate: float
    elapsed_s: float
    eta_s: float
    prompt: str = ""
    loss_parts: dict[str, float] = field(default_factory=dict)  # prior preservation: loss_instance, loss_prior

    @property
    def steps_per_s(self) -> float:
        """Optimizer steps per second over this run so far."""
        return 0.0 if self.elapsed_s <= 0 else self.step / self.elapsed_s


class TrainingHooks:
    """Subclass and override what a host needs; the loop calls these and nothing else of the UI."""

    def on_start(self, total_steps: int, start_step: int) -> None:
        """Training begins at ``start_step`` of ``total_steps``."""

    def on_progress(self, progress: Progress) -> None:
        """Called after every optimizer step."""

    def should_stop(self) -> bool:
        """Return True to stop after the current step (the work is saved)."""
        return False

    def should_save(self) -> bool:
        """Return True to save now (a numbered copy and the main file), then go on."""
        return False

    def on_saved(self, path: Path, step: int) -> None:
        """A file was written."""

    def on_preview(self, step: int, state: Any) -> None:
        """Every ``preview_every`` steps: render previews with the trainable ``state`` applied."""

    def generate_images(self, settings: dict[str, Any]) -> list[Any]:
        """Render images with the host's txt2img (DreamBooth's class images): ``settings`` as for previews."""
        raise DatasetError(
            "class images are missing and this host cannot generate them; put the class images in the class folder "
            "or lower the number of class images asked for"
        )

    def on_status(self, text: str) -> None:
        """What the run is doing before or between steps (e.g. "class images 3/50")."""

    def on_memory(self, report: Any) -> None:
        """The peak memory after the first steps (``loop.memory.MemoryReport``); a warning when it does not fit."""
        if not report.fits:
            self.on_warning(report.text())

    dry_run = False  # True: train, but never save (a memory preflight)

    def on_warning(self, message: str) -> None:
        """Something the user should know that does not stop training (e.g. a risky learning rate)."""
        logging.getLogger("sd-webui-trainer").warning(message)
