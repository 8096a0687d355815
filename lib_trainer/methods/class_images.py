"""DreamBooth class images: generated with the host's txt2img from the untouched model, before training.

A concept asking for N class images whose class folder holds fewer gets the rest rendered from its class prompt
(``class-NNNNN.png`` with the prompt as its ``.txt`` caption, each written atomically); images already there are
reused, so a second run generates nothing. The seed of image k is ``seed + k``: a rerun after an interrupt
renders exactly the images the first run would have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from lib_trainer.config import check_multiple, check_settings, setting
from lib_trainer.data.dataset import folder_entries
from lib_trainer.errors import ConfigError
from lib_trainer.formats.files import write_atomic, write_bytes_atomic
from lib_trainer.loop.hooks import TrainingHooks

GENERATED = re.compile(r"^class-(\d{5,})\.png$")


@dataclass(frozen=True)
class ClassImageConfig:
    """How missing class images are rendered (the WebUI's txt2img on the loaded model)."""

    SECTION: ClassVar[str] = "class_generation"

    negative_prompt: str = setting("", free_text=True)
    sampler: str = "Euler a"  # checked against the host's sampler list when a job is submitted
    steps: int = setting(20, low=1, high=150)
    cfg_scale: float = setting(7.0, low=1.0, high=30.0)
    seed: int = setting(0, low=0, high=2**32 - 1, hint="image k is rendered with seed + k")
    width: int = setting(0, low=0, high=4096, hint="0 = data.width")
    height: int = setting(0, low=0, high=4096, hint="0 = data.height")

    def __post_init__(self) -> None:
        check_settings(self, self.SECTION)
        for name in ("width", "height"):
            check_multiple(f"{self.SECTION}.{name}", getattr(self, name), 8)
        if not self.sampler.strip():
            raise ConfigError(
                "class_generation.sampler is empty; pick a sampler such as 'Euler a'", field="class_generation.sampler"
            )


def class_image_count(folder: Path) -> int:
    """How many images the class folder holds (its own files; 0 when it does not exist yet)."""
    return len(folder_entries(folder, [])) if folder.is_dir() else 0


def ensure_class_images(config: Any, hooks: TrainingHooks) -> bool:
    """Render every concept's missing class images; False when the user stopped the run meanwhile."""
    todo = []
    for concept in config.concepts:
        folder = Path(concept.class_dir).expanduser()
        missing = concept.class_images - class_image_count(folder) if concept.prior else 0
        if missing > 0:
            todo.append((concept, folder, missing))
    total, done = sum(n for _, _, n in todo), 0
    for concept, folder, missing in todo:
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(missing):
            if hooks.should_stop():
                return False
            hooks.on_status(f"class images {done + 1}/{total}: {concept.class_prompt}")
            _generate_one(config, concept, folder, hooks)
            done += 1
    return True


def _generate_one(config: Any, concept: Any, folder: Path, hooks: TrainingHooks) -> Path:
    gen = config.class_generation
    index = _next_index(folder)
    settings = {
        "prompt": concept.class_prompt,
        "negative_prompt": gen.negative_prompt,
        "sampler": gen.sampler,
        "steps": gen.steps,
        "cfg_scale": gen.cfg_scale,
        "seed": gen.seed + index,
        "width": gen.width or config.data.width,
        "height": gen.height or config.data.height,
        "clip_skip": config.train.clip_skip,
    }
    image = hooks.generate_images(settings)[0]
    path = folder / f"class-{index:05d}.png"
    write_bytes_atomic(path.with_suffix(".txt"), concept.class_prompt.encode("utf-8"))
    return write_atomic(path, lambda tmp: image.save(tmp, "PNG"))


def _next_index(folder: Path) -> int:
    used = [int(m.group(1)) for p in folder.iterdir() if (m := GENERATED.match(p.name))]
    return max(used, default=-1) + 1
