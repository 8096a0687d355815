"""The "Test it" grid after a run: the saved steps (rows) x strengths (columns), one image per cell, so the user
can pick the best step by looking. This module holds the job's settings, the choice of rows and the picture;
rendering each cell is the host's (its own txt2img)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image, ImageDraw, ImageFont

from lib_trainer.config import setting
from lib_trainer.errors import ConfigError

MAX_ROWS = 12
MAX_COLUMNS = 8


@dataclass(frozen=True)
class TestGridConfig:
    """Which finished job to test, and how: rows are its saved steps, columns strengths (LoRA weights; an
    embedding is shown off and on)."""

    SECTION: ClassVar[str] = ""
    __test__: ClassVar[bool] = False  # not a pytest test class

    job: str = setting("", hint="the id of a finished LoRA or textual-inversion job")
    strengths: str = setting("0.5, 0.75, 1.0", hint="LoRA weights, e.g. 0.5, 0.75, 1.0")
    rows: int = setting(6, low=1, high=MAX_ROWS)
    prompt: str = setting("", free_text=True)  # empty: the run's preview prompt ([name] = the trained word)
    seed: int = setting(-1, low=-1, high=2**32 - 1)  # -1: the run's preview seed, else 1234; one seed for all

    @classmethod
    def from_dict(cls, data: dict) -> TestGridConfig:
        """Build from a plain dict (API, tab)."""
        from lib_trainer.config import build

        return build(cls, data)

    def __post_init__(self) -> None:
        from lib_trainer.config import check_settings

        if not self.job.strip():
            raise ConfigError("job is empty; give the id of a finished LoRA or embedding job", field="job")
        parse_strengths(self.strengths)
        check_settings(self, self.SECTION)


def parse_strengths(text: str) -> list[float]:
    """``"0.5, 1"`` -> ``[0.5, 1.0]``: 1 to MAX_COLUMNS numbers in [-4, 4]."""
    try:
        values = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or len(values) > MAX_COLUMNS or any(not -4.0 <= v <= 4.0 for v in values):
        raise ConfigError(
            f"strengths {text!r} must be 1 to {MAX_COLUMNS} comma-separated numbers between -4 and 4, "
            "e.g. 0.5, 0.75, 1.0",
            field="strengths",
        )
    return values


def pick_rows(saved: list[tuple[int, Any]], rows: int) -> list[tuple[int, Any]]:
    """At most ``rows`` of the saved (step, file) pairs, evenly spread, always with the last step; of several files
    saved at one step the first (a run's numbered copy, written before its main file)."""
    first: dict[int, Any] = {}
    for step, item in saved:
        first.setdefault(step, item)
    ordered = sorted(first.items())
    if len(ordered) <= rows:
        return ordered
    if rows == 1:
        return ordered[-1:]
    last = len(ordered) - 1
    picked = sorted({round(i * last / (rows - 1)) for i in range(rows)})
    return [ordered[i] for i in picked]


def compose_grid(cells: list[list[Image.Image]], row_labels: list[str], column_labels: list[str]) -> Image.Image:
    """One picture of ``cells`` (rows x columns of equal-sized images) with labels above and to the left."""
    if not cells or not cells[0]:
        raise ConfigError("a grid needs at least one image")
    width, height = cells[0][0].size
    font = _font(max(12, width // 24))
    pad = 6
    left = max(_text_size(font, t)[0] for t in row_labels) + 2 * pad
    top = max(_text_size(font, t)[1] for t in column_labels) + 2 * pad
    column = max(width, *(_text_size(font, t)[0] + 2 * pad for t in column_labels))  # labels never cut off
    grid = Image.new("RGB", (left + column * len(cells[0]), top + height * len(cells)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        text_w, _ = _text_size(font, label)
        draw.text((left + c * column + (column - text_w) // 2, pad), label, fill="black", font=font)
    for r, (label, row) in enumerate(zip(row_labels, cells, strict=True)):
        _, text_h = _text_size(font, label)
        draw.text((pad, top + r * height + (height - text_h) // 2), label, fill="black", font=font)
        for c, image in enumerate(row):
            x = left + c * column + (column - width) // 2
            grid.paste(image.convert("RGB").resize((width, height)), (x, top + r * height))
    return grid


def _font(size: int) -> Any:
    """PIL's bundled font at ``size`` px (Pillow >= 10.1), else its fixed small one (the WebUI pins Pillow 9.5)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _text_size(font: Any, text: str) -> tuple[int, int]:
    box = font.getbbox(text)
    return box[2] - box[0], box[3] - box[1]
