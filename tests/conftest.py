"""Shared fixtures: tiny SD1 / SD2-v models from the real ldm classes, image folders, output folders."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.stack import prepare_stack  # noqa: E402

prepare_stack(threads=2)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from lib_trainer.models.ldm import parts_from_ldm  # noqa: E402
from tests.support import fake_webui  # noqa: E402
from tests.support.models import build_model  # noqa: E402
from tests.support.sdxl import build_sdxl  # noqa: E402


@pytest.fixture(scope="session")
def model_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tokenizer files and the tiny CLIP are written once per session."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def sd1_model(model_workdir: Path):
    """Tiny SD1 LatentDiffusion (FrozenCLIPEmbedder, eps-prediction)."""
    return build_model("sd1", "tiny", model_workdir)


@pytest.fixture(scope="session")
def sd2_model(model_workdir: Path):
    """Tiny SD2 LatentDiffusion (FrozenOpenCLIPEmbedder, v-prediction, linear proj_in/out)."""
    return build_model("sd2", "tiny", model_workdir)


@pytest.fixture(scope="session")
def sdxl_model(model_workdir: Path):
    """A tiny SDXL (sgm DiffusionEngine stand-in over real UNet/CLIP/OpenCLIP/VAE classes), eps-prediction."""
    return build_sdxl("tiny", model_workdir)


@pytest.fixture(params=["sd1", "sd2"])
def family(request: pytest.FixtureRequest) -> str:
    """Run a test for both SD families."""
    return request.param


@pytest.fixture
def sd_model(family: str, request: pytest.FixtureRequest):
    """The tiny model of ``family``."""
    return request.getfixturevalue(f"{family}_model")


@pytest.fixture
def parts(sd_model):
    """ModelParts over the tiny model of ``family``."""
    return parts_from_ldm(sd_model)


def write_images(folder: Path, count: int = 4, captions: bool = True, size: tuple[int, int] = (80, 72)) -> Path:
    """Write ``count`` random RGB PNGs (and captions) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"{i:02d}-image.png")
        if captions:
            (folder / f"{i:02d}-image.txt").write_text(f"red, blue, tag{i}", encoding="utf-8")
    return folder


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A folder with four captioned images."""
    return write_images(tmp_path / "data")


@pytest.fixture
def webui(sd1_model, tmp_path: Path):
    """The fake WebUI around the tiny SD1 model, with a job manager and a folder of photos."""
    yield from installed_webui(sd1_model, tmp_path, "tiny-sd1")


def installed_webui(model, root: Path, name: str):
    """Install the fake host around ``model``; afterwards cancel every job of the test, then uninstall."""
    model.sd_checkpoint_info = types.SimpleNamespace(model_name=name, shorthash="0123456789", name_for_extra=name)
    fake = fake_webui.install(model, root)
    host = importlib.import_module("lib_trainer.webui.host")
    jobs = importlib.import_module("lib_trainer.webui.jobs")
    fake.host, fake.manager, fake.root = host, jobs.JobManager(host), root
    fake.data = write_images(root / "photos")
    yield fake
    for job_id in list(fake.manager.jobs):  # no job of this test may go on training the shared model
        fake.manager.cancel(job_id)
        fake.manager.wait(job_id, timeout=120)
    fake_webui.uninstall()
    del model.sd_checkpoint_info


@pytest.fixture
def client(webui):
    yield make_client(webui)
    importlib.import_module("lib_trainer.webui.entry")._manager = None


def make_client(webui, login: dict | None = None):
    """A TestClient over a FastAPI app with our routes; ``login`` makes it look like gradio's App with auth."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    entry = importlib.import_module("lib_trainer.webui.entry")
    entry._manager = webui.manager
    app = FastAPI()
    if login is not None:
        app.auth, app.tokens = {"user": "pw"}, login
    entry.on_app_started(None, app)
    return TestClient(app)
