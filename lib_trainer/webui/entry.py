"""What scripts/trainer.py registers: the tab, the settings section and the API routes, sharing one job queue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lib_trainer.webui.hosts import host_module
from lib_trainer.webui.jobs import JobManager

host = host_module()

_manager: JobManager | None = None


def manager() -> JobManager:
    """The one job queue of this WebUI process (created on first use, not at import)."""
    global _manager
    if _manager is None:
        _manager = JobManager(host)
    return _manager


def register() -> None:
    """Register our callbacks with the WebUI."""
    host.register_callbacks(on_ui_tabs=on_ui_tabs, on_ui_settings=on_ui_settings, on_app_started=on_app_started)


def create_embedding(settings: dict[str, Any]) -> Path:
    """Create an embedding file on the loaded model (the Create button and POST /embeddings)."""
    from lib_trainer.config import build
    from lib_trainer.methods.textual_inversion import EmbeddingConfig
    from lib_trainer.methods.textual_inversion import create_embedding as create

    config = build(EmbeddingConfig, settings)
    with host.queue_lock():
        path = create(config, host.model_parts(), host.folders().embeddings)
        host.refresh_embeddings()
    return path


def create_hypernetwork(settings: dict[str, Any]) -> Path:
    """Create a hypernetwork file for the loaded model (the Create button and POST /hypernetworks)."""
    from lib_trainer.config import build
    from lib_trainer.methods.hypernetwork import HypernetworkSpec
    from lib_trainer.methods.hypernetwork import create_hypernetwork as create

    spec = build(HypernetworkSpec, settings)
    with host.queue_lock():
        path = create(spec, host.model_parts(), host.folders().hypernetworks)
        host.refresh_hypernetworks()
    return path


def dataset_report(settings: dict[str, Any]) -> dict[str, Any]:
    """The dataset report for a data config (the Check button and POST /dataset/report)."""
    from lib_trainer.config import DataConfig, build
    from lib_trainer.data.report import dataset_report as report
    from lib_trainer.webui.jobs import check_paths

    config = build(DataConfig, settings, "data")
    check_paths(config, host.allowed_roots())
    return report(config, host.token_counter())


def trainer_folder() -> Path:
    """The trainer's own folder (run folders, presets, exported jobs)."""
    return host.folders().logs


ACTIONS = {
    "embedding": create_embedding,
    "hypernetwork": create_hypernetwork,
    "report": dataset_report,
    "open_folder": host.open_folder,
    "logs": trainer_folder,
}


def on_ui_tabs():
    """The Trainer tab."""
    from lib_trainer.webui.ui import create_tab

    tab = create_tab(
        manager(), ACTIONS, host.model_label, host.sampler_names(), host.native_resolution, host.unavailable_methods()
    )
    return [(tab, "Trainer", "trainer")]


def on_ui_settings() -> None:
    """Our settings section."""
    host.add_settings()


def on_app_started(_demo: Any, app: Any) -> None:
    """Add /trainer/v1 routes to the WebUI's FastAPI app, as far and as guarded as the WebUI serves its own API."""
    from lib_trainer.webui.api import register_routes

    register_routes(app, manager(), ACTIONS, host.route_access(app))
