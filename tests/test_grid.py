"""The "Test it" grid: rows of saved steps x strengths through the host's txt2img, temporary names cleaned up."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lib_trainer.errors import ConfigError
from lib_trainer.grid import TestGridConfig, compose_grid, parse_strengths, pick_rows
from tests.test_webui_glue import PREVIEW, lora_job, ti_request


def test_rows_are_spread_over_the_saved_steps_and_keep_the_last():
    saved = [(s, f"f{s}") for s in range(100, 1100, 100)]
    assert [s for s, _ in pick_rows(saved, 4)] == [100, 400, 700, 1000]
    assert [s for s, _ in pick_rows(saved, 1)] == [1000]
    assert pick_rows(saved[:3], 6) == saved[:3]
    assert pick_rows([(2, "a"), (2, "b")], 3) == [(2, "a")]  # one row per step: its first file


@pytest.mark.parametrize("text", ["", "a", "1, 2, 3, 4, 5, 6, 7, 8, 9", "5", "-4.5"])
def test_bad_strengths_are_refused(text):
    with pytest.raises(ConfigError, match="strengths"):
        parse_strengths(text)
    assert parse_strengths("0.5; 1, -1") == [0.5, 1.0, -1.0]


def test_config_needs_a_job_and_bounded_rows():
    with pytest.raises(ConfigError, match="job"):
        TestGridConfig.from_dict({})
    with pytest.raises(ConfigError, match="rows"):
        TestGridConfig.from_dict({"job": "1", "rows": 13})


def test_grid_picture_has_labels_and_every_cell():
    cells = [[Image.new("RGB", (96, 24), c) for c in ("red", "blue")] for _ in range(3)]
    grid = compose_grid(cells, ["step 1", "step 2", "step 3"], ["weight 0.5", "weight 1"])
    left, top = grid.width - 192, grid.height - 72
    assert left > 0
    assert top > 0
    assert grid.getpixel((left + 5, top + 5)) == (255, 0, 0)
    assert grid.getpixel((left + 101, grid.height - 3)) == (0, 0, 255)
    small = [[Image.new("RGB", (8, 8), "red")] * 2]
    labels = ["a long column label", "another long label"]
    assert compose_grid(small, ["step 1"], labels).width > 2 * 100  # narrow cells: columns as wide as labels


def test_embedding_grid_renders_each_step_with_and_without_the_word(webui):
    job = webui.manager.wait(webui.manager.submit("textual_inversion", ti_request(webui.data), PREVIEW).id)
    assert job.state == "done", job.error
    webui.shared.rendered.clear()
    reloads = len(webui.db.reloads)
    grid = webui.manager.submit("test_grid", {"job": job.id, "prompt": "a photo of [name], best"})
    assert grid.output_dir == str(webui.root / "trainer" / "textual_inversion" / "zqtoken" / "grids")
    grid = webui.manager.wait(grid.id)
    assert grid.state == "done", grid.error
    prompts = [r["prompt"] for r in webui.shared.rendered]
    assert prompts == [
        "a photo of, best",  # without the word: once, the same for every row
        "a photo of zqtoken__trainer_grid_000002, best",
        "a photo of zqtoken__trainer_grid_000004, best",
    ]
    assert {"zqtoken__trainer_grid_000002", "zqtoken__trainer_grid_000004"} <= set(webui.db.registered)
    two, four = (webui.db.registered[f"zqtoken__trainer_grid_00000{s}"] for s in (2, 4))
    assert not torch.equal(two.vec, four.vec)  # each row its own step's vectors
    assert len(webui.db.reloads) > reloads  # the folder reloaded afterwards: the temporary words are gone
    (path,) = [s["path"] for s in grid.saved]
    image = Image.open(path)
    assert image.width > 2 * 64
    assert image.height > 2 * 64
    assert str(grid.previews[-1][1]) == path  # shown in the gallery
    assert (grid.step, grid.total_steps) == (4, 4)


def test_lora_grid_uses_temporary_copies_and_removes_them(webui, monkeypatch):
    job = webui.manager.wait(webui.manager.submit("lora", lora_job(webui.data, preview_every=0)).id, timeout=120)
    assert job.state == "done", job.error
    lora_dir = webui.root / "models" / "Lora"
    (lora_dir / "old__trainer_grid_000001.safetensors").write_bytes(b"left by a crash")
    seen = []
    render = webui.host.render_txt2img

    def recording(settings):
        seen.append(sorted(p.name for p in lora_dir.iterdir()))
        copies.update({p.name: p.read_bytes() for p in lora_dir.glob("*__trainer_grid_*")})
        return render(settings)

    copies = {}

    monkeypatch.setattr(webui.host, "render_txt2img", recording)
    webui.shared.rendered.clear()
    grid = webui.manager.wait(webui.manager.submit("test_grid", {"job": job.id, "strengths": "0.5, 1"}).id)
    assert grid.state == "done", grid.error
    assert [r["prompt"] for r in webui.shared.rendered] == [
        f"a photo of zqlora <lora:zqlora__trainer_grid_{s:06d}:{w}>" for s in (2, 4) for w in ("0.5", "1")
    ]
    assert seen[0] == [
        "zqlora.safetensors",
        "zqlora.safetensors.trainer-state",
        "zqlora__trainer_grid_000002.safetensors",
        "zqlora__trainer_grid_000004.safetensors",
    ]
    assert sorted(p.name for p in lora_dir.iterdir()) == seen[0][:2]  # copies and stale ones gone
    run_dir = webui.root / "trainer" / "lora" / "zqlora" / "lora"
    for step in (2, 4):  # each row is its own step's file, not the main file (which holds the last step)
        numbered = (run_dir / f"zqlora-{step:06d}.safetensors").read_bytes()
        assert copies[f"zqlora__trainer_grid_{step:06d}.safetensors"] == numbered
    assert copies["zqlora__trainer_grid_000002.safetensors"] != copies["zqlora__trainer_grid_000004.safetensors"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"job": "nope"}, "not known"),
        ({"strengths": "x"}, "strengths"),
    ],
)
def test_grid_requests_are_checked_at_submit(webui, change, message):
    with pytest.raises(ConfigError, match=message) as caught:
        webui.manager.submit("test_grid", {"job": "nope", **change})
    assert caught.value.field in ("job", "strengths")


def test_only_finished_lora_and_embedding_jobs_can_be_tested(webui):
    hn = {
        "hypernetwork": {"name": "zqhn", "sizes": "32"},
        "data": {"data_dir": str(webui.data), "width": 64, "height": 64},
        "train": {"steps": 2, "save_every": 1, "preview_every": 0, "learning_rate": "1e-5"},
    }
    job = webui.manager.wait(webui.manager.submit("hypernetwork", hn).id)
    with pytest.raises(ConfigError, match="LoRA and embedding"):
        webui.manager.submit("test_grid", {"job": job.id})
    queued = webui.manager.submit("textual_inversion", ti_request(webui.data, name="zqlong", steps=400))
    with pytest.raises(ConfigError, match="once it has finished"):
        webui.manager.submit("test_grid", {"job": queued.id})
    webui.manager.cancel(queued.id)
