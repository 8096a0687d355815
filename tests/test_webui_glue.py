"""The WebUI glue (host.py, jobs.py, api.py, entry.py) against the fake host surface and a real tiny model."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest
import torch

from lib_trainer.models.guard import state_fingerprint
from tests.conftest import write_images
from tests.support import fake_webui


@pytest.fixture
def webui(sd1_model, tmp_path: Path):
    sd1_model.sd_checkpoint_info = types.SimpleNamespace(
        model_name="tiny-sd1", shorthash="0123456789", name_for_extra="tiny-sd1"
    )
    fake = fake_webui.install(sd1_model, tmp_path)
    host = importlib.import_module("lib_trainer.webui.host")
    jobs = importlib.import_module("lib_trainer.webui.jobs")
    fake.host, fake.manager, fake.root = host, jobs.JobManager(host), tmp_path
    fake.data = write_images(tmp_path / "photos")
    yield fake
    fake_webui.uninstall()
    del sd1_model.sd_checkpoint_info


def ti_request(data: Path, **train) -> dict:
    settings = {"steps": 4, "save_every": 2, "preview_every": 2, "batch_size": 1, **train}
    return {
        "embedding": {"name": "zqtoken", "init_text": "cat"},
        "data": {"data_dir": str(data), "width": 64, "height": 64},
        "train": settings,
    }


PREVIEW = {"prompt": "a photo of [name]", "steps": 2, "sampler": "Euler a", "width": 64, "height": 64}


def test_job_trains_reports_previews_and_refreshes_the_host(webui):
    job = webui.manager.submit("textual_inversion", ti_request(webui.data), PREVIEW)
    job = webui.manager.wait(job.id)
    assert job.state == "done", job.error
    assert job.step == 4
    assert [h["step"] for h in job.history] == [1, 2, 3, 4]
    assert (webui.root / "embeddings" / "zqtoken.safetensors").is_file()
    assert (webui.root / "trainer" / "textual_inversion" / "zqtoken" / "loss.csv").is_file()
    assert webui.shared.state.begun == ["trainer: zqtoken"]
    assert webui.shared.state.job == ""
    assert webui.shared.state.job_no == 4  # previews' process_images must not move the job counter
    assert [len(p) for _, p in job.previews]
    assert [s for s, _ in job.previews] == [2, 4]
    assert webui.shared.rendered[0] == {"prompt": "a photo of zqtoken", "sampler": "Euler a", "size": (64, 64)}
    assert "zqtoken" in webui.db.registered
    assert webui.db.reloads[-1] is True
    assert webui.processing.StableDiffusionProcessing.cached_c == [None, None]
    assert webui.shared.state.current_image is not None


def test_failing_job_is_marked_failed_and_leaves_the_model_restored(webui, sd1_model, monkeypatch):
    before = state_fingerprint(sd1_model)
    flags = [p.requires_grad for p in sd1_model.parameters()]

    def broken_render(settings):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(webui.host, "render_txt2img", broken_render)
    job = webui.manager.wait(webui.manager.submit("textual_inversion", ti_request(webui.data), PREVIEW).id)
    assert job.state == "failed"
    assert "sampler exploded" in job.error
    after = state_fingerprint(sd1_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in sd1_model.parameters()] == flags
    assert webui.shared.state.job == ""
    assert webui.manager.submit("textual_inversion", ti_request(webui.data, steps=1)).id  # the queue still works


def test_bad_dataset_fails_the_job_with_the_message(webui, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    job = webui.manager.wait(webui.manager.submit("textual_inversion", ti_request(empty)).id)
    assert job.state == "failed"
    assert "no images found" in job.error


def test_webui_interrupt_stops_and_saves(webui, monkeypatch):
    original = webui.host.report_progress

    def interrupt_at_2(progress, name):
        original(progress, name)
        if progress.step == 2:
            webui.shared.state.interrupt()

    monkeypatch.setattr(webui.host, "report_progress", interrupt_at_2)
    job = webui.manager.wait(webui.manager.submit("textual_inversion", ti_request(webui.data, steps=10)).id)
    assert job.state == "interrupted"
    assert job.step == 2
    assert any(s["path"].endswith("zqtoken.safetensors") and s["step"] == 2 for s in job.saved)
    assert webui.shared.state.interrupted is False  # cleared for the next generation


def test_jobs_run_one_after_another_and_cancel_before_start(webui):
    manager = webui.manager
    with webui.host.queue_lock():  # a generation is running: jobs wait
        first = manager.submit("textual_inversion", ti_request(webui.data, steps=1))
        second = manager.submit("textual_inversion", ti_request(webui.data, steps=2))
        manager.cancel(second.id)
        assert first.state == "queued"
    assert manager.wait(first.id).state == "done"
    assert manager.wait(second.id).state == "cancelled"


def test_lowvram_is_refused_clearly(webui):
    webui.shared.cmd_opts.lowvram = True
    job = webui.manager.wait(webui.manager.submit("textual_inversion", ti_request(webui.data)).id)
    assert job.state == "failed"
    assert "--lowvram" in job.error


def test_model_label_and_folders(webui):
    assert webui.host.model_label() == "SD1 (eps-prediction) - tiny-sd1"
    folders = webui.host.folders()
    assert folders.embeddings == webui.root / "embeddings"
    assert folders.logs == webui.root / "trainer"
    webui.host.add_settings()
    webui.shared.opts.trainer_log_dir = str(webui.root / "elsewhere")
    assert webui.host.folders().logs == webui.root / "elsewhere"


def test_entry_registers_callbacks_and_routes(webui):
    entry = importlib.import_module("lib_trainer.webui.entry")
    entry.register()
    assert set(webui.callbacks.registered) == {"on_ui_tabs", "on_ui_settings", "on_app_started"}
    path = entry.create_embedding({"name": "made", "init_text": "cat", "num_vectors": 2})
    assert path == webui.root / "embeddings" / "made.safetensors"
    assert path.is_file()


# ----- REST API through FastAPI's TestClient -------------------------------------------------------------------


@pytest.fixture
def client(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    entry = importlib.import_module("lib_trainer.webui.entry")
    entry._manager = webui.manager
    app = FastAPI()
    entry.on_app_started(None, app)
    yield TestClient(app)
    entry._manager = None


def test_api_happy_path(client, webui):
    reply = client.post(
        "/trainer/v1/jobs", json={"method": "textual_inversion", "config": ti_request(webui.data), "preview": PREVIEW}
    )
    assert reply.status_code == 200
    job_id = reply.json()["id"]
    webui.manager.wait(job_id)
    status = client.get(f"/trainer/v1/jobs/{job_id}").json()
    assert status["state"] == "done"
    assert status["step"] == 4
    assert status["name"] == "zqtoken"
    assert [h["step"] for h in client.get(f"/trainer/v1/jobs/{job_id}?since=2").json()["history"]] == [3, 4]
    png = client.get(f"/trainer/v1/jobs/{job_id}/previews/0")
    assert png.status_code == 200
    assert png.headers["content-type"] == "image/png"
    assert client.get("/trainer/v1/jobs").json()["jobs"][0]["id"] == job_id
    assert client.post(f"/trainer/v1/jobs/{job_id}/cancel").json()["state"] == "done"


@pytest.mark.parametrize(
    ("config_change", "field"),
    [
        ({"train": {"steps": 0}}, "train.steps"),
        ({"embedding": {"name": "a/b"}}, "embedding.name"),
        ({"colour": "red"}, "colour"),
        ({"data": {"data_dir": "/x", "width": 100}}, "data.width"),
    ],
)
def test_api_validation_errors_are_422_with_the_field(client, webui, config_change, field):
    config = {**ti_request(webui.data), **config_change}
    reply = client.post("/trainer/v1/jobs", json={"method": "textual_inversion", "config": config})
    assert reply.status_code == 422
    assert reply.json()["detail"]["field"] == field
    assert webui.manager.jobs == {}


def test_api_unknown_job_and_create_embedding(client, webui):
    assert client.get("/trainer/v1/jobs/nope").status_code == 404
    assert client.post("/trainer/v1/embeddings", json={"name": "made"}).status_code == 200
    reply = client.post("/trainer/v1/embeddings", json={"name": "made"})
    assert reply.status_code == 422
    assert reply.json()["detail"]["field"] == "embedding.name"


def test_routes_are_in_the_openapi_docs(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/trainer/v1/jobs",
        "/trainer/v1/jobs/{job_id}",
        "/trainer/v1/jobs/{job_id}/cancel",
        "/trainer/v1/embeddings",
    } <= set(paths)
    body = paths["/trainer/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    ti_schema = body["properties"]["config"]["oneOf"][0]
    assert ti_schema["properties"]["train"]["properties"]["steps"]["default"] == 1000


def lora_job(data: Path, **train) -> dict:
    return {
        "network": {"name": "zqlora", "rank": 4, "alpha": 2.0},
        "data": {"data_dir": str(data), "width": 64, "height": 64, "template": "none"},
        "train": {"steps": 4, "save_every": 2, "preview_every": 2, "learning_rate": "1e-3", **train},
    }


class FakeNetworks(types.ModuleType):
    """The built-in Lora extension's names host.py uses, with the WebUI's SD1 name conversion for our keys."""

    def __init__(self, model):
        super().__init__("networks")
        self.loaded_networks, self.listed, self.model = [], 0, model

    def list_available_networks(self):
        self.listed += 1

    def assign_network_names_to_compvis_modules(self, sd_model):
        mapping = {}
        for name, _ in sd_model.model.diffusion_model.named_modules():
            mapping["diffusion_model_" + name.replace(".", "_")] = name
        sd_model.network_layer_mapping = mapping

    def convert_diffusers_name_to_compvis(self, key, is_sd2):
        from lib_trainer.models.kohya_names import unet_key_table

        reverse = {v: k for k, v in unet_key_table(self.model.model.diffusion_model).items()}
        return reverse.get(key, key).replace("lora_unet_", "diffusion_model_")


def test_lora_job_trains_previews_verifies_and_refreshes(webui, sd1_model, monkeypatch):
    networks = FakeNetworks(sd1_model)
    monkeypatch.setitem(sys.modules, "networks", networks)
    before = state_fingerprint(sd1_model)
    job = webui.manager.wait(webui.manager.submit("lora", lora_job(webui.data), PREVIEW).id, timeout=120)
    assert job.state == "done", job.error
    assert job.warnings == []
    assert (webui.root / "models" / "Lora" / "zqlora.safetensors").is_file()
    assert [s for s, _ in job.previews] == [2, 4]
    assert networks.listed == 1
    assert job.summary()["name"] == "zqlora"
    after = state_fingerprint(sd1_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    del sd1_model.network_layer_mapping


def test_lora_keys_the_webui_cannot_place_are_reported(webui, sd1_model, monkeypatch):
    networks = FakeNetworks(sd1_model)
    networks.convert_diffusers_name_to_compvis = lambda key, is_sd2: key  # a host that maps nothing
    monkeypatch.setitem(sys.modules, "networks", networks)
    job = webui.manager.wait(webui.manager.submit("lora", lora_job(webui.data, preview_every=0)).id, timeout=120)
    assert job.state == "done"
    assert "do not match the WebUI's modules" in job.warnings[0]
    del sd1_model.network_layer_mapping


def test_hypernetwork_job_previews_warns_and_refreshes(webui, sd1_model, monkeypatch):
    reloads = []
    monkeypatch.setattr(webui.shared, "reload_hypernetworks", lambda: reloads.append(1))
    request = {
        "hypernetwork": {"name": "zqhn", "sizes": "32, 64"},
        "data": {"data_dir": str(webui.data), "width": 64, "height": 64, "template": "hypernetwork"},
        "train": {"steps": 4, "save_every": 2, "preview_every": 2, "learning_rate": "2e-4"},
    }
    before = state_fingerprint(sd1_model)
    job = webui.manager.wait(webui.manager.submit("hypernetwork", request, PREVIEW).id, timeout=120)
    assert job.state == "done", job.error
    assert "above 0.0001" in job.warnings[0]
    assert [s for s, _ in job.previews] == [2, 4]
    assert (webui.root / "models" / "hypernetworks" / "zqhn.pt").is_file()
    assert reloads == [1]
    after = state_fingerprint(sd1_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(len(m._forward_pre_hooks) == 0 for m in sd1_model.modules())


def test_api_creates_a_hypernetwork(client, webui):
    reply = client.post("/trainer/v1/hypernetworks", json={"name": "made", "sizes": "32"})
    assert reply.status_code == 200
    assert reply.json()["path"].endswith("made.pt")
    bad = client.post("/trainer/v1/hypernetworks", json={"name": "made2", "sizes": "768"})
    assert bad.status_code == 422
    assert bad.json()["detail"]["field"] == "hypernetwork.sizes"


def test_api_dataset_report(client, webui):
    (webui.data / "broken.png").write_bytes(b"")
    reply = client.post("/trainer/v1/dataset/report", json={"data_dir": str(webui.data), "width": 64, "height": 64})
    assert reply.status_code == 200
    report = reply.json()
    assert report["images"] == 4
    assert [u["file"] for u in report["unreadable"]] == ["broken.png"]
    assert report["buckets"] == {"64x64": 4}
    assert report["over_length_captions"] == []  # counted with the loaded model's tokenizer
    bad = client.post("/trainer/v1/dataset/report", json={"data_dir": str(webui.data), "width": 100})
    assert bad.status_code == 422
    assert bad.json()["detail"]["field"] == "data.width"


def test_report_summary_html(webui):
    from lib_trainer.data.report import dataset_report

    pytest.importorskip("gradio")
    from lib_trainer.config import DataConfig
    from lib_trainer.webui.ui import format_report

    html_text = format_report(dataset_report(DataConfig(data_dir=str(webui.data), width=64, height=64)))
    assert "<b>4 images</b>" in html_text
    assert "red (4)" in html_text
