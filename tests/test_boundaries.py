"""The house rules on imports: the core never imports the WebUI, gradio or fastapi (README, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST_FILES = {Path("lib_trainer/webui/host.py"), Path("lib_trainer/webui/forge_host.py")}  # one per host


def imported_roots(path: Path) -> set[str]:
    """Top-level module names a file imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def python_files(folder: str) -> list[Path]:
    """Python files below ``folder`` relative to the repository root."""
    return sorted(p.relative_to(ROOT) for p in (ROOT / folder).rglob("*.py"))


def test_only_host_module_imports_the_webui():
    offenders = [
        str(p) for p in python_files("lib_trainer") if "modules" in imported_roots(ROOT / p) and p not in HOST_FILES
    ]
    assert offenders == []


def test_only_forge_host_imports_forge_backend():
    offenders = [
        str(p)
        for p in python_files("lib_trainer")
        if "backend" in imported_roots(ROOT / p) and p != Path("lib_trainer/webui/forge_host.py")
    ]
    assert offenders == []


def test_only_webui_glue_imports_ui_frameworks():
    ui = {"gradio", "fastapi", "launch", "starlette"}
    offenders = [
        str(p)
        for p in python_files("lib_trainer")
        if imported_roots(ROOT / p) & ui and p.parts[:2] != ("lib_trainer", "webui")
    ]
    assert offenders == []


def test_core_does_not_import_test_support():
    offenders = [str(p) for p in python_files("lib_trainer") if "tests" in imported_roots(ROOT / p)]
    assert offenders == []
