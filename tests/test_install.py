"""install.py: installs only what is missing, through the host's helpers, never torch."""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import pytest

from lib_trainer import requirements

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
    assert fake_launch.calls == ["install toml", f"install lycoris-lora=={requirements.lycoris_pin()} --no-deps"]
    assert not any("torch" in call.replace("lycoris", "") for call in fake_launch.calls)


@pytest.mark.parametrize(
    ("torch_version", "pin"),
    [
        ("2.13.0+cpu", "4.1.3"),
        ("2.7.0", "4.1.3"),
        ("2.6.0+cu124", "3.4.0"),
        ("2.3.1+cu121", "3.4.0"),
        ("2.1.2", "3.4.0"),
    ],
)
def test_lycoris_follows_the_hosts_torch(fake_launch, monkeypatch, torch_version, pin):
    """lycoris-lora 4.1 does not import on torch < 2.7 (Forge main: 2.3.1, A1111 1.10: 2.1.2): 3.4.0 there."""
    versions = {"torch": torch_version, "lycoris-lora": None}
    monkeypatch.setattr(requirements, "installed_version", versions.get)
    fake_launch.installed = {"toml"}
    runpy.run_path(str(INSTALL))
    assert fake_launch.calls == [f"install lycoris-lora=={pin} --no-deps"]
    fake_launch.calls.clear()
    fake_launch.installed = {"toml", "lycoris"}
    versions["lycoris-lora"] = "4.1.3"  # a 4.1 already there (an earlier install) is replaced where it cannot import
    runpy.run_path(str(INSTALL))
    assert fake_launch.calls == ([] if pin == "4.1.3" else ["install lycoris-lora==3.4.0 --no-deps"])
    fake_launch.calls.clear()
    versions["lycoris-lora"] = "3.4.0"
    runpy.run_path(str(INSTALL))
    assert fake_launch.calls == []
    assert requirements.lycoris_command() == f"python -m pip install lycoris-lora=={pin} --no-deps toml"


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
