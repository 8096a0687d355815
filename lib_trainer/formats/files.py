"""Safe file names and atomic writes (temporary file in the same folder, then rename)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lib_trainer.errors import AccessError, ConfigError, FormatError

_FORBIDDEN = set('/\\:*?"<>|,') | {chr(c) for c in range(32)} | {chr(127)}
MAX_NAME = 100
# Windows refuses these as file names whatever the extension or case ("aux.txt", "Con"); files move between machines
_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in [*range(1, 10), "¹", "²", "³"]}


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
    stem = name.split(".", 1)[0].rstrip(" ").lower()
    if stem in _RESERVED:
        raise ConfigError(
            f"{field} {name!r} is a name Windows reserves for devices ({stem.upper()}); files with it cannot be "
            "copied to or opened on Windows. Choose another name",
            field=field,
        )
    return name


def path_in(folder: Path, filename: str) -> Path:
    """``folder / filename``, refused when it would resolve outside ``folder``."""
    folder = Path(folder).resolve()
    path = (folder / filename).resolve()
    if path.parent != folder:
        raise ConfigError(f"{filename!r} would be written outside {str(folder)!r}; choose a plain name")
    return path


def check_allowed(value: str, roots: list[Path], field: str) -> None:
    """Refuse a path (after following links) that is not inside one of ``roots``: AccessError naming ``field``."""
    resolved = Path(value).expanduser().resolve()
    if not any(is_inside(resolved, root) for root in roots):
        raise AccessError(
            f"{field} {value!r} is outside the folders the trainer may use ({', '.join(str(r) for r in roots)}); "
            "add its folder under Settings -> Trainer -> 'Allowed folders', or move the files into one of these",
            field=field,
        )


def is_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or below it."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    The file at ``path`` is either the old one or the complete new one, never a partial write. A write that
    fails (disk full, read-only folder) raises FormatError naming the folder; the temporary file is removed.
    Temporary files carry the writer's process id, so ones left by a killed run are removed by the next write.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale_temporaries(path.parent)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{TEMP_MARK}{os.getpid()}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; saved models get the usual permissions
        tmp.replace(path)
    except OSError as exc:
        raise FormatError(_write_error(path, exc)) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return path


TEMP_MARK = "trainer-"
_swept: set[Path] = set()


def _sweep_stale_temporaries(folder: Path) -> None:
    """Remove temporary files in ``folder`` whose writing process no longer runs (once per folder and process)."""
    if folder in _swept:
        return
    _swept.add(folder)
    for tmp in folder.glob(f".*.{TEMP_MARK}*.tmp"):
        pid_text = tmp.name.rsplit(TEMP_MARK, 1)[1].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _process_alive(int(pid_text)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else, or the platform cannot tell
        return True
    return True


def _write_error(path: Path, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        fix = "the disk is full; free some space (or choose a folder on another disk) and try again"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "the folder is not writable; check its permissions or choose another folder"
    else:
        fix = "check that the folder exists and is writable"
    return (
        f"cannot write {path.name} in {str(path.parent)!r} ({reason}); {fix}. "
        "The previous version of the file, if any, is unchanged"
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def finite_for_saving(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str, fix: str, field: str | None = None
) -> dict[str, torch.Tensor]:
    """The tensors as they will be written (CPU, ``dtype``, contiguous); FormatError if any value is not finite.

    The check is on the cast values, so an fp32 weight that overflows fp16 is caught before anything is written.
    """
    cast = {}
    for key, value in tensors.items():
        value = value.detach().cpu()
        out = (value.to(dtype) if value.is_floating_point() else value).contiguous()
        if out.is_floating_point() and not bool(torch.isfinite(out).all()):
            finite_before = bool(torch.isfinite(value).all())
            cause = (
                f"overflows {str(dtype).removeprefix('torch.')} (largest magnitude {value.abs().max().item():.3g})"
                if finite_before
                else "holds NaN or infinite values"
            )
            raise FormatError(
                f"{what}: {key} {cause}; nothing was written and the previous file is unchanged. {fix}", field=field
            )
        cast[key] = out
    return cast


def load_torch_weights(path: Path, what: str, field: str | None = None) -> Any:
    """``torch.load`` with ``weights_only=True``; a file holding other objects is refused, never unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FormatError(
            f"{Path(path).name} holds Python objects other than tensors and plain values, so it was not loaded "
            f"(loading such a file can run code hidden in it). Use {what} saved by the WebUI or this trainer, or "
            "convert it to .safetensors with a tool you trust",
            field=field,
        ) from exc
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, IndexError) as exc:
        raise FormatError(
            f"{Path(path).name} cannot be read as {what} (the file is damaged or of another kind: {exc})", field=field
        ) from exc


def safetensors_keys(path: Path) -> set[str]:
    """The tensor names in a ``.safetensors`` file's header, without loading tensors (empty if unreadable)."""
    try:
        with Path(path).open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size < 100_000_000:
                return set()
            header = json.loads(fh.read(size))
    except (OSError, ValueError):
        return set()
    return {key for key in header if key != "__metadata__"} if isinstance(header, dict) else set()
