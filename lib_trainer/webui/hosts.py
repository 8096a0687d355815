"""Which host glue this WebUI needs: Forge main's (``forge_host``) or AUTOMATIC1111's (``host``).

Decided by what is importable, before either glue file is imported: Forge main ships the ``backend`` package
with ``backend.diffusion_engine`` (A1111, old Forge and reForge do not).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


def is_forge_main() -> bool:
    """Whether this process runs in Forge main (2.x)."""
    try:
        return importlib.util.find_spec("backend.diffusion_engine") is not None
    except (ImportError, ValueError):
        return False


def host_module() -> ModuleType:
    """The host glue module for this process."""
    name = "lib_trainer.webui.forge_host" if is_forge_main() else "lib_trainer.webui.host"
    return importlib.import_module(name)
