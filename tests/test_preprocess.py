"""Focal cropping on real photos (scikit-image's), caption policies, folder preparation, the Extras scripts."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from PIL import Image

from lib_trainer.data.crop import FocalWeights, crop_window, detect_faces, focal_crop, focal_point
from lib_trainer.data.preprocess import PreprocessConfig, merge_caption, preprocess_folder
from lib_trainer.errors import ConfigError

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage_data.astronaut())


@pytest.mark.parametrize("target", [(256, 512), (512, 256), (512, 512), (384, 640), (640, 256), (320, 1024)])
def test_face_crop_keeps_the_whole_face(astronaut, target):
    faces = detect_faces(astronaut)
    assert len(faces) == 1
    x, y, w, h = faces[0]
    left, top, win_w, win_h = crop_window(astronaut.size, target, focal_point(astronaut, faces, FocalWeights()), faces)
    assert left <= x
    assert top <= y
    assert x + w <= left + win_w
    assert y + h <= top + win_h
    assert abs(win_w / win_h - target[0] / target[1]) < 0.02
    cropped, debug = focal_crop(astronaut, target, debug=True)
    assert cropped.size == target
    assert debug is not None
    assert debug.size == astronaut.size


@pytest.mark.parametrize("photo", ["chelsea", "coffee", "rocket", "camera"])
def test_crops_photos_without_faces(photo):
    image = Image.fromarray(getattr(skimage_data, photo)())
    cropped, _ = focal_crop(image.convert("RGB"), (256, 384), FocalWeights(face=0.9, entropy=0.3, edges=0.5))
    assert cropped.size == (256, 384)


@pytest.mark.parametrize(
    ("existing", "policy", "expected"),
    [
        (None, "keep", "zq, new"),
        ("old", "keep", "zq, old"),
        ("old", "replace", "zq, new"),
        ("old", "prepend", "zq, new, old"),
        ("old", "append", "zq, old, new"),
        ("zq, old", "keep", "zq, old"),
    ],
)
def test_caption_policies(existing, policy, expected):
    assert merge_caption(existing, "new", policy, "zq") == expected


def fake_captioner(image: Image.Image) -> str:
    return f"a photo {image.width}x{image.height}"


def test_prepares_a_folder_and_never_touches_the_input(astronaut, tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    astronaut.save(source / "astro.jpg")
    Image.fromarray(skimage_data.chelsea()).save(source / "cat.png")
    (source / "cat.txt").write_text("my cat", encoding="utf-8")
    (source / "broken.png").write_bytes(b"")
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    config = PreprocessConfig(
        input_dir=str(source),
        output_dir=str(tmp_path / "train"),
        width=256,
        height=320,
        existing_caption="append",
        trigger_word="zq",
    )
    result = preprocess_folder(config, [fake_captioner])
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    out = tmp_path / "train"
    assert sorted(p.name for p in out.iterdir()) == ["astro.png", "astro.txt", "cat.png", "cat.txt"]
    assert Image.open(out / "astro.png").size == (256, 320)
    assert (out / "cat.txt").read_text().strip() == "zq, my cat, a photo 256x320"
    assert (out / "astro.txt").read_text().strip() == "zq, a photo 256x320"
    assert [p["file"] for p in result["problems"]] == ["broken.png"]
    with pytest.raises(ConfigError, match="must differ"):
        PreprocessConfig(input_dir=str(source), output_dir=str(source))


@pytest.fixture
def extras(sd1_model, tmp_path):
    from tests.support import fake_webui

    fake = fake_webui.install(sd1_model, tmp_path)
    fake.pp = importlib.import_module("lib_trainer.webui.postprocessing")
    fake.PostprocessedImage = fake_webui.PostprocessedImage
    yield fake
    fake_webui.uninstall()


def test_extras_scripts_crop_and_caption(extras, astronaut, tmp_path):
    source = tmp_path / "astro.png"
    astronaut.save(source)
    source.with_suffix(".txt").write_text("space suit", encoding="utf-8")
    crop, caption = extras.pp.TrainerCropScript(), extras.pp.TrainerCaptionScript()
    assert (crop.name, caption.name) == ("Trainer: crop", "Trainer: caption")
    pp = extras.PostprocessedImage(Image.open(source))
    crop.process_firstpass(pp)
    caption.process_firstpass(pp)
    crop.process(pp, enable=True, width=256, height=384, buckets=False, face=0.9, entropy=0.15, edges=0.5, debug=True)
    assert pp.image.size == (256, 384)
    assert pp.extra_images[0].nametags == ["focal-debug"]
    caption.process(pp, enable=True, models=["BLIP", "DeepBooru"], trigger="zq", policy="prepend")
    assert pp.caption == "zq, a blip caption of a 256x384 picture, 1girl, solo, space suit"

    extras.shared.state.textinfo = str(source)  # batch-from-directory: images.read drops .filename, textinfo has it
    later = extras.PostprocessedImage(Image.open(source).convert("RGB"))
    caption.process_firstpass(later)
    assert later.trainer_source == str(source)
    assert extras.shared.interrogator.loaded == 1


def test_preprocess_job_through_the_api(extras, astronaut, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    entry = importlib.import_module("lib_trainer.webui.entry")
    jobs = importlib.import_module("lib_trainer.webui.jobs")
    host = importlib.import_module("lib_trainer.webui.host")
    entry._manager = jobs.JobManager(host)
    app = FastAPI()
    entry.on_app_started(None, app)
    client = TestClient(app)
    (tmp_path / "in").mkdir()
    for i in range(3):
        astronaut.resize((200 + 40 * i, 300)).save(tmp_path / "in" / f"{i}.png")
    body = {
        "method": "preprocess",
        "config": {
            "input_dir": str(tmp_path / "in"),
            "output_dir": str(tmp_path / "out"),
            "width": 128,
            "height": 128,
            "caption_deepbooru": True,
        },
    }
    job_id = client.post("/trainer/v1/preprocess", json=body["config"]).json()["id"]
    job = entry._manager.wait(job_id)
    assert job.state == "done", job.error
    assert job.step == job.total_steps == 3
    assert (tmp_path / "out" / "2.txt").read_text().strip() == "1girl, solo"
    assert np.asarray(Image.open(tmp_path / "out" / "0.png")).shape == (128, 128, 3)
    assert client.post("/trainer/v1/preprocess", json={"input_dir": "x", "output_dir": "x"}).status_code == 422
    assert client.post("/trainer/v1/jobs", json=body).status_code == 200  # the same job through the generic route
    entry._manager.wait(client.get("/trainer/v1/jobs").json()["jobs"][-1]["id"])
    entry._manager = None


def test_bucket_crop_follows_the_aspect_ratio(astronaut, tmp_path):
    from lib_trainer.data.preprocess import target_size

    config = PreprocessConfig(input_dir="a", output_dir="b", width=256, height=256, buckets=True)
    wide = target_size(astronaut.resize((600, 300)), config)
    tall = target_size(astronaut.resize((300, 600)), config)
    assert wide[0] > wide[1]
    assert tall[1] > tall[0]
    assert wide[0] * wide[1] <= 256 * 256
