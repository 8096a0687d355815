"""Prompt templates: one prompt per line with ``[name]`` (the trained token) and ``[filewords]`` (the caption)."""

from __future__ import annotations

import re
from pathlib import Path

from lib_trainer.errors import ConfigError

TEMPLATE_DIR = Path(__file__).parent / "templates"
_DANGLING = re.compile(r"(?:\s*,\s*)+$|^(?:\s*,\s*)+")


def builtin_templates() -> list[str]:
    """Names of the templates shipped with the trainer."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt"))


def load_template(template: str) -> list[str]:
    """Lines of a shipped template (by name) or of a template file (by path); empty lines dropped."""
    path = TEMPLATE_DIR / f"{template}.txt" if template in builtin_templates() else Path(template)
    if template not in builtin_templates() and not (path.suffix == ".txt" and path.is_file()):
        raise ConfigError(
            f"template {template!r} is neither a built-in template ({', '.join(builtin_templates())}) "
            "nor an existing .txt file; pick one of those names or give the path of a template file",
            field="data.template",
        )
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"template file {str(path)!r} cannot be read as UTF-8 text: {exc}", field="data.template"
        ) from exc
    lines = [line for line in lines if line]
    if not lines:
        raise ConfigError(
            f"template {template!r} has no lines; write one prompt per line using [name]/[filewords]",
            field="data.template",
        )
    return lines


def uses_filewords(lines: list[str]) -> bool:
    """Whether any template line needs a caption."""
    return any("[filewords]" in line for line in lines)


def fill_template(line: str, name: str, filewords: str) -> str:
    """Substitute ``[name]`` and ``[filewords]``; tidy separators left by an empty caption."""
    text = line.replace("[name]", name).replace("[filewords]", filewords)
    return _DANGLING.sub("", re.sub(r"(\s*,\s*){2,}", ", ", text)).strip()
