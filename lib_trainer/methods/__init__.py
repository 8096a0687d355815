"""Training methods, one module each with the same small interface (create, attach, export, load)."""

from __future__ import annotations

from types import ModuleType

from lib_trainer.errors import ConfigError


def get_method(name: str) -> ModuleType:
    """The method module called ``name``; raises with the valid names on a miss."""
    from lib_trainer.methods import textual_inversion

    methods = {"textual_inversion": textual_inversion}
    if name not in methods:
        raise ConfigError(f"method {name!r} is unknown; valid methods: {', '.join(sorted(methods))}")
    return methods[name]
