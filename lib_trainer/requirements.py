"""Which lycoris-lora fits the host's torch (standard library only: install.py imports this before the WebUI runs).

lycoris-lora 4.1 registers fused kernels with ``torch.library.custom_op(..., device_types=...)`` at import, which
fails on the torch of many hosts (Forge main ships 2.3.1, A1111 1.10 2.1.2). 3.4.0 is plain torch and computes the
same LoRA/LoCon/LoHa/LoKr modules for the trainer (tests/test_lora.py passes on 3.4.0, 4.0.0 and 4.1.3).
"""

from __future__ import annotations

import importlib.metadata
import re

LYCORIS_CURRENT = "4.1.3"  # needs torch >= 2.7
LYCORIS_OLD_TORCH = "3.4.0"
CURRENT_TORCH = (2, 7)


def _version(text: str | None) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", (text or "").split("+")[0])[:2])


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def lycoris_pin(torch_version: str | None = None) -> str:
    """The lycoris-lora version for this torch (the installed one when not given)."""
    torch_version = torch_version or installed_version("torch")
    if torch_version and _version(torch_version) < CURRENT_TORCH:
        return LYCORIS_OLD_TORCH
    return LYCORIS_CURRENT


def lycoris_mismatch(lycoris_version: str | None = None, torch_version: str | None = None) -> bool:
    """True when the installed lycoris-lora is a 4.1+ release that cannot import on the installed (older) torch."""
    lycoris_version = lycoris_version or installed_version("lycoris-lora")
    if lycoris_version is None:
        return False
    return lycoris_pin(torch_version) == LYCORIS_OLD_TORCH and _version(lycoris_version) >= (4, 1)


def lycoris_command(torch_version: str | None = None) -> str:
    return f"python -m pip install lycoris-lora=={lycoris_pin(torch_version)} --no-deps toml"
