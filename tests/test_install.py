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


def test_optional_optimizers_only_when_ticked_in_settings(fake_launch, tmp_path):
    fake_launch.installed = {"toml", "lycoris"}
    settings = tmp_path / "config.json"
    fake_launch.args = types.SimpleNamespace(ui_settings_file=str(settings))
    runpy.run_path(str(INSTALL))
    assert fake_launch.calls == []  # no config.json yet: nothing optional
    settings.write_text('{"trainer_install_optimizers": "prodigyopt, schedulefree, nonsense; lion-pytorch"}')
    runpy.run_path(str(INSTALL))
    assert fake_launch.calls == [
        "install prodigyopt --no-deps",
        "install schedulefree --no-deps",
        "install lion-pytorch --no-deps",
    ]
