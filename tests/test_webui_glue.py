"""The WebUI glue (host.py, jobs.py, api.py, entry.py) against the fake host surface and a real tiny model."""

from __future__ import annotations

import importlib
import queue
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from lib_trainer.errors import AccessError, TrainerError
from lib_trainer.models.guard import state_fingerprint
from tests.conftest import installed_webui, make_client, write_images
from tests.support import webui_lora_names
from tests.support.models import build_model


def ti_request(data: Path, name: str = "zqtoken", **train) -> dict:
    settings = {"steps": 4, "save_every": 2, "preview_every": 2, "batch_size": 1, **train}
    return {
        "embedding": {"name": name, "init_text": "cat"},
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
    run_dir = webui.root / "trainer" / "textual_inversion" / "zqtoken"
    assert [p for _, p in job.previews] == [run_dir / "previews" / f"zqtoken-{s:06d}-0.png" for s in (2, 4)]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for _, p in job.previews)  # on disk, not in memory
    assert [s for s, _ in job.previews] == [2, 4]
    assert webui.shared.rendered[0] == {
        "prompt": "a photo of zqtoken",
        "sampler": "Euler a",
        "size": (64, 64),
        "override": {"CLIP_stop_at_last_layers": 1},  # previews at the clip skip the run trains with
    }
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
    assert webui.manager.submit("textual_inversion", ti_request(webui.data, steps=3)).id  # the queue still works


def test_bad_dataset_is_refused_at_submit(webui, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainerError, match="holds no images") as caught:
        webui.manager.submit("textual_inversion", ti_request(empty))
    assert caught.value.field == "data.data_dir"
    assert webui.manager.jobs == {}


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


def test_lowvram_is_refused_clearly_at_submit(webui):
    webui.shared.cmd_opts.lowvram = True
    with pytest.raises(TrainerError, match="--lowvram"):
        webui.manager.submit("textual_inversion", ti_request(webui.data))


def test_clip_skip_follows_the_webui_setting_unless_given(webui, sd1_model, monkeypatch):
    webui.shared.opts.CLIP_stop_at_last_layers = 2
    assert webui.host.model_label() == "SD1 (eps-prediction) - tiny-sd1, WebUI Clip skip 2"
    job = webui.manager.wait(webui.manager.submit("textual_inversion", ti_request(webui.data), PREVIEW).id)
    assert job.state == "done", job.error
    assert job.config.train.clip_skip == 2
    assert webui.shared.rendered[0]["override"] == {"CLIP_stop_at_last_layers": 2}
    given = webui.manager.submit("textual_inversion", ti_request(webui.data, "zqother", clip_skip=1, steps=1))
    assert given.config.train.clip_skip == 1
    webui.manager.wait(given.id)


def test_a_job_submitted_as_the_worker_goes_idle_still_runs(webui, monkeypatch):
    """The worker used to exit after its idle timeout without the lock: a job queued at that moment was lost."""
    manager = webui.manager
    real_get, late = manager.pending.get, []

    def get_then_race(timeout=None):
        try:
            return real_get(timeout=0.01)
        except queue.Empty:
            if not late:  # the worker saw an empty queue; a submit arrives before it decides to stop
                late.append(manager.submit("textual_inversion", ti_request(webui.data, "zqlate", steps=1)))
            raise

    monkeypatch.setattr(manager.pending, "get", get_then_race)
    first = manager.submit("textual_inversion", ti_request(webui.data, steps=1))
    assert manager.wait(first.id).state == "done"
    deadline = time.monotonic() + 10
    while not late and time.monotonic() < deadline:
        time.sleep(0.01)
    assert late
    assert manager.wait(late[0].id).state == "done"


def test_finished_jobs_are_forgotten_beyond_a_bound(webui, monkeypatch):
    jobs_module = importlib.import_module("lib_trainer.webui.jobs")
    monkeypatch.setattr(jobs_module, "MAX_FINISHED_JOBS", 2)
    ids = []
    for i in range(4):
        ids.append(webui.manager.submit("textual_inversion", ti_request(webui.data, f"zq{i}", steps=1)).id)
        webui.manager.wait(ids[-1])
    last = webui.manager.submit("textual_inversion", ti_request(webui.data, "zqlast", steps=1))
    assert list(webui.manager.jobs) == [*ids[-2:], last.id]
    webui.manager.wait(last.id)


def test_paths_outside_the_allowed_folders_are_refused(webui, tmp_path):
    outside = write_images(tmp_path.parent / f"{tmp_path.name}-outside")
    request = ti_request(outside)
    with pytest.raises(AccessError) as caught:
        webui.manager.submit("textual_inversion", request)
    assert caught.value.field == "data.data_dir"
    (webui.root / "link").symlink_to(outside)  # a link inside an allowed folder does not lead out of it
    with pytest.raises(AccessError):
        webui.manager.submit("textual_inversion", ti_request(webui.root / "link"))
    with pytest.raises(AccessError) as caught:
        webui.manager.submit("textual_inversion", {**ti_request(webui.data), "resume_from": "/etc/passwd"})
    assert caught.value.field == "resume_from"
    webui.shared.opts.trainer_allowed_folders = f"/nowhere;{outside}"
    webui.manager.wait(webui.manager.submit("textual_inversion", ti_request(outside, "zqa", steps=1)).id)
    webui.shared.opts.trainer_allowed_folders = ""
    webui.shared.opts.trainer_allow_any_folder = True
    webui.manager.wait(webui.manager.submit("textual_inversion", ti_request(outside, "zqb", steps=1)).id)


def test_model_label_and_folders(webui):
    assert webui.host.model_label() == "SD1 (eps-prediction) - tiny-sd1, WebUI Clip skip 1"
    folders = webui.host.folders()
    assert folders.embeddings == webui.root / "embeddings"
    assert folders.logs == webui.root / "trainer"
    webui.host.add_settings()
    assert all(info.restrict_api for info in webui.shared.opts.options.values())  # not changeable over the API
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


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("[1, 2]", "body"),
        ('"train"', "body"),
        ("{not json", "body"),
        ("", "body"),
        ('{"method": ["x"], "config": {}}', "method"),
        ('{"method": null, "config": {}}', "method"),
        ('{"config": {"embedding": {"name": "x"}}}', "method"),
        ('{"method": "textual_inversion"}', "config"),
        ('{"method": "textual_inversion", "config": [1]}', "config"),
    ],
)
def test_malformed_job_bodies_are_422_in_our_format(client, body, field):
    reply = client.post("/trainer/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 422, reply.text
    assert reply.json()["detail"]["field"] == field
    assert reply.json()["detail"]["message"]


@pytest.mark.parametrize(
    ("preview", "field"),
    [
        ([1, 2], "preview"),
        ({"width": -64}, "preview.width"),
        ({"width": 7, "height": 7}, "preview.width"),
        ({"width": 100}, "preview.width"),
        ({"steps": "abc"}, "preview.steps"),
        ({"sampler": "Warp drive"}, "preview.sampler"),
        ({"colour": "red"}, "preview.colour"),
        ({"cfg_scale": float("inf")}, "preview.cfg_scale"),
    ],
)
def test_preview_settings_are_checked_at_submit(client, webui, preview, field):
    body = {"method": "textual_inversion", "config": ti_request(webui.data), "preview": preview}
    reply = client.post("/trainer/v1/jobs", content=__import__("json").dumps(body, allow_nan=True))
    assert reply.status_code == 422, reply.text
    assert reply.json()["detail"]["field"] == field
    assert webui.manager.jobs == {}


@pytest.mark.parametrize("route", ["jobs", "preprocess", "dataset/report", "embeddings", "hypernetworks"])
@pytest.mark.parametrize("body", ["[]", "3", "{oops"])
def test_every_post_route_answers_bad_bodies_with_422(client, route, body):
    reply = client.post(f"/trainer/v1/{route}", content=body)
    assert reply.status_code == 422
    assert reply.json()["detail"]["field"] == "body"


def test_a_numeric_learning_rate_is_accepted(client, webui):
    config = ti_request(webui.data, learning_rate=0.005, steps=1)
    reply = client.post("/trainer/v1/jobs", json={"method": "textual_inversion", "config": config})
    assert reply.status_code == 200, reply.text
    assert webui.manager.wait(reply.json()["id"]).config.train.learning_rate == "0.005"


def test_paths_outside_the_allowed_folders_are_403(client, webui, tmp_path):
    outside = write_images(tmp_path.parent / f"{tmp_path.name}-api-outside")
    reply = client.post("/trainer/v1/jobs", json={"method": "textual_inversion", "config": ti_request(outside)})
    assert reply.status_code == 403
    assert reply.json()["detail"]["field"] == "data.data_dir"
    report = client.post("/trainer/v1/dataset/report", json={"data_dir": str(outside)})
    assert report.status_code == 403
    prep = client.post("/trainer/v1/preprocess", json={"input_dir": str(webui.data), "output_dir": str(outside)})
    assert prep.status_code == 403
    assert prep.json()["detail"]["field"] == "output_dir"


def test_status_query_and_preview_index_are_checked(client, webui):
    job_id = client.post(
        "/trainer/v1/jobs", json={"method": "textual_inversion", "config": ti_request(webui.data, steps=1)}
    ).json()["id"]
    webui.manager.wait(job_id)
    bad = client.get(f"/trainer/v1/jobs/{job_id}?since=abc")
    assert bad.status_code == 422
    assert bad.json()["detail"]["field"] == "since"
    assert client.get(f"/trainer/v1/jobs/{job_id}/previews/abc").status_code == 404
    assert client.get(f"/trainer/v1/jobs/{job_id}/previews/-1").status_code == 404


def test_without_api_only_the_routes_the_tab_polls_exist(webui):
    webui.shared.cmd_opts.api = False
    client = make_client(webui)
    paths = set(client.get("/openapi.json").json()["paths"])
    assert paths == {"/trainer/v1/jobs", "/trainer/v1/jobs/{job_id}", "/trainer/v1/jobs/{job_id}/previews/{index}"}
    assert set(client.get("/openapi.json").json()["paths"]["/trainer/v1/jobs"]) == {"get"}  # the job panel's list
    assert client.post("/trainer/v1/jobs", json={}).status_code in (404, 405)


def test_api_auth_guards_the_api_like_the_webuis_own(webui):
    import base64

    webui.shared.cmd_opts.api_auth = "alice:secret,bob:pw:with:colons"
    client = make_client(webui)
    body = {"method": "textual_inversion", "config": ti_request(webui.data, steps=1)}
    assert client.post("/trainer/v1/jobs", json=body).status_code == 401
    assert client.get("/trainer/v1/jobs").status_code == 200  # the job panel's list: the tab's rules, as below
    assert client.post("/trainer/v1/jobs", json=body, auth=("alice", "wrong")).status_code == 401
    reply = client.post("/trainer/v1/jobs", json=body, auth=("alice", "secret"))
    assert reply.status_code == 200
    webui.manager.wait(reply.json()["id"])
    token = base64.b64encode(b"bob:pw:with:colons").decode()
    cancel = f"/trainer/v1/jobs/{reply.json()['id']}/cancel"
    assert client.post(cancel).status_code == 401
    assert client.post(cancel, headers={"Authorization": f"Basic {token}"}).status_code == 200
    assert client.get(f"/trainer/v1/jobs/{reply.json()['id']}").status_code == 200  # the tab's poll: UI rules


def test_the_tabs_polls_need_the_webui_login_when_it_has_one(webui):
    webui.shared.cmd_opts.api = False
    client = make_client(webui, login={"tok123": "user"})
    job = webui.manager.submit("textual_inversion", ti_request(webui.data, steps=1))
    webui.manager.wait(job.id)
    assert client.get(f"/trainer/v1/jobs/{job.id}").status_code == 401
    assert client.get(f"/trainer/v1/jobs/{job.id}", cookies={"access-token": "forged"}).status_code == 401
    assert client.get(f"/trainer/v1/jobs/{job.id}", cookies={"access-token-unsecure": "tok123"}).status_code == 200
    assert client.get(f"/trainer/v1/jobs/{job.id}", cookies={"access-token-abc123": "tok123"}).status_code == 200
    assert client.get("/trainer/v1/jobs").status_code == 401  # the job list too
    assert client.get("/trainer/v1/jobs", cookies={"access-token-unsecure": "tok123"}).status_code == 200


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
    """The built-in Lora extension's names host.py uses, with the WebUI's own key rules (tests/support)."""

    re_x_proj = webui_lora_names.X_PROJ

    def __init__(self, model):
        super().__init__("networks")
        self.loaded_networks, self.listed, self.model = [], 0, model

    def list_available_networks(self):
        self.listed += 1

    def assign_network_names_to_compvis_modules(self, sd_model):
        sd_model.network_layer_mapping = webui_lora_names.network_layer_mapping(sd_model)

    def convert_diffusers_name_to_compvis(self, key, is_sd2):
        return webui_lora_names.convert_diffusers_name_to_compvis(key, is_sd2)


@pytest.fixture(scope="module")
def layout_model(tmp_path_factory):
    """Tiny widths with the real SD1 block layout, which the WebUI's fixed key rules assume."""
    return build_model("sd1", "layout", tmp_path_factory.mktemp("layout"))


@pytest.fixture
def layout_webui(layout_model, tmp_path):
    yield from installed_webui(layout_model, tmp_path, "layout")


def test_lora_job_trains_previews_verifies_and_refreshes(layout_webui, layout_model, monkeypatch):
    webui = layout_webui
    networks = FakeNetworks(layout_model)
    monkeypatch.setitem(sys.modules, "networks", networks)
    before = state_fingerprint(layout_model)
    request = lora_job(webui.data, steps=2, save_every=1, preview_every=2)
    request["network"]["train_text_encoder"] = True
    job = webui.manager.wait(webui.manager.submit("lora", request, PREVIEW).id, timeout=120)
    assert job.state == "done", job.error
    assert job.warnings == []  # every key is placed by the WebUI's own rules
    assert (webui.root / "models" / "Lora" / "zqlora.safetensors").is_file()
    assert [s for s, _ in job.previews] == [2]
    assert networks.listed == 1
    assert job.summary()["name"] == "zqlora"
    after = state_fingerprint(layout_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    del layout_model.network_layer_mapping


def test_lora_keys_the_webui_cannot_place_are_reported(webui, sd1_model, monkeypatch):
    """The 2-level tiny model is not the layout the WebUI's rules assume: its keys land on other modules."""
    monkeypatch.setitem(sys.modules, "networks", FakeNetworks(sd1_model))
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
    assert "<b>4</b> images" in html_text
    assert "<tr><td>red</td><td>4</td></tr>" in html_text


@pytest.fixture
def sd2_webui(sd2_model, tmp_path):
    yield from installed_webui(sd2_model, tmp_path, "tiny-sd2")


def test_sd2_text_encoder_lora_keys_all_match_the_webui(sd2_webui, sd2_model, monkeypatch):
    """SD2's OpenCLIP q/k/v/out land on the fused attention through the WebUI's own rules (re_x_proj)."""
    monkeypatch.setitem(sys.modules, "networks", FakeNetworks(sd2_model))
    request = lora_job(sd2_webui.data, steps=2, save_every=0, preview_every=0)
    request["network"].update({"train_text_encoder": True, "train_unet": False})
    job = sd2_webui.manager.wait(sd2_webui.manager.submit("lora", request).id, timeout=120)
    assert job.state == "done", job.error
    assert job.warnings == []
    del sd2_model.network_layer_mapping


def test_api_memory_check_runs_two_steps_and_writes_nothing(client, webui, sd1_model):
    """A preflight job: the peak after 2 real steps and whether it fits, no file where the run would write, the
    host model as before; an out-of-memory in it says what to change."""
    before = state_fingerprint(sd1_model)
    body = {"method": "textual_inversion", "config": ti_request(webui.data, steps=50), "preflight": True}
    reply = client.post("/trainer/v1/jobs", json=body)
    assert reply.status_code == 200, reply.text
    status = client.get(f"/trainer/v1/jobs/{webui.manager.wait(reply.json()['id']).id}").json()
    assert status["state"] == "done", status["error"]
    assert (status["preflight"], status["step"], status["previews"], status["saved"]) == (True, 2, [], [])
    memory = status["memory"]
    assert memory["steps"] == 2
    assert memory["peak_mib"] > 0
    assert memory["total_mib"] > memory["peak_mib"]
    assert memory["fits"] is True
    assert "after 2 steps: fits" in status["status"]
    assert not (webui.root / "embeddings" / "zqtoken.safetensors").exists()
    assert not (webui.root / "trainer" / "textual_inversion" / "zqtoken").exists()
    after = state_fingerprint(sd1_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    bad = client.post("/trainer/v1/jobs", json={**body, "preflight": "yes"})
    assert (bad.status_code, bad.json()["detail"]["field"]) == (422, "preflight")


def test_a_memory_check_that_runs_out_of_memory_says_what_to_change(webui, monkeypatch):
    jobs_module = sys.modules["lib_trainer.webui.jobs"]
    from lib_trainer.models import diffusion

    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(diffusion.DiffusionObjective, "loss", out_of_memory)
    job = webui.manager.submit("textual_inversion", ti_request(webui.data, batch_size=4), None, preflight=True)
    job = webui.manager.wait(job.id)
    assert job.state == "failed"
    assert job.memory["fits"] is False
    assert "gradient_checkpointing" in job.memory["advice"]
    assert "lower train.batch_size to 2 and raise train.gradient_accumulation to 2" in job.error
    assert jobs_module.Job is type(job)


def test_the_webuis_fp16_autocast_does_not_override_the_trainers_precision(webui, sd1_model, monkeypatch):
    """The WebUI's apply_model hijack enters devices.autocast(); inside training steps that is a no-op (the trainer's
    bf16 stays bf16), and the host's own context is back afterwards."""
    devices = sys.modules["modules.devices"]
    host_autocast = devices.autocast
    seen = []
    original = type(sd1_model).apply_model

    def hijacked(self, x, t, cond, *args, **kwargs):  # as sd_hijack_unet.apply_model does
        seen.append((torch.is_grad_enabled(), devices.autocast is host_autocast))
        with devices.autocast():
            return original(self, x, t, cond, *args, **kwargs)

    monkeypatch.setattr(type(sd1_model), "apply_model", hijacked)
    job = webui.manager.wait(webui.manager.submit("textual_inversion", ti_request(webui.data, preview_every=0)).id)
    assert job.state == "done", job.error
    assert seen
    assert all(not host for grad, host in seen if grad)  # the trainer's autocast decides inside steps
    assert devices.autocast is host_autocast
