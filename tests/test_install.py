"""install.py: installs only what is missing, through the host's helpers, never torch."""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import pytest

INSTALL = Path(__file__).resolve().parents[1] / "install.py"


@pytest.fixture
def fake_launch(monkeypatch):
    launch = types.ModuleType("launch")
    launch.installed, launch.calls = set(), []
    launch.is_installed = lambda name: name in launch.installed
    launch.run_pip = lambda args, desc: launch.calls.append(args)
    monkeypatch.setitem(sys.modules, "launch", launch)
    return launch


def test_installs_missing_packages_without_dependencies(fake_launch):
    runpy.run_path(str(INSTALL))
    assert fake_launch.calls == ["install toml", "install lycoris-lora==4.1.3 --no-deps"]
    assert not any("torch" in call.replace("lycoris", "") for call in fake_launch.calls)


def test_nothing_to_do_when_everything_is_present(fake_launch):
    fake_launch.installed = {"toml", "lycoris"}
    runpy.run_path(str(INSTALL))
    assert fake_launch.calls == []
