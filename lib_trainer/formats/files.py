"""Safe file names and atomic writes (temporary file in the same folder, then rename)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from lib_trainer.errors import ConfigError

_FORBIDDEN = set('/\\:*?"<>|,') | {chr(c) for c in range(32)}
MAX_NAME = 100


def check_name(name: str, field: str) -> str:
    """Validate a user-chosen file/prompt name: no path parts, no characters Windows or prompts choke on."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{field} is empty; give a name such as 'my-subject'", field=field)
    bad = sorted({c for c in name if c in _FORBIDDEN})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ConfigError(
            f"{field} {name!r} contains {shown}; use letters, digits, spaces, '-' or '_' "
            "(names may not contain path separators or commas)",
            field=field,
        )
    if name != name.strip() or name.startswith(".") or name.endswith("."):
        raise ConfigError(f"{field} {name!r} may not start or end with a space or a dot", field=field)
    if len(name) > MAX_NAME:
        raise ConfigError(f"{field} is {len(name)} characters long; use at most {MAX_NAME}", field=field)
    return name


def path_in(folder: Path, filename: str) -> Path:
    """``folder / filename``, refused when it would resolve outside ``folder``."""
    folder = Path(folder).resolve()
    path = (folder / filename).resolve()
    if path.parent != folder:
        raise ConfigError(f"{filename!r} would be written outside {str(folder)!r}; choose a plain name")
    return path


def is_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or below it."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; saved models get the usual permissions
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))
