"""The headless trainer: checkpoint files into the real ldm classes, the command line, and several processes.

CLI runs are subprocesses of this venv's python with a ``sitecustomize`` that prepares the CPU test stack (the
torchvision trap, offline flags); the tiny models are saved as checkpoint files (with the ``.yaml`` beside them
that gives the exact head counts, as a user's yaml does) from the same builder the other tests use.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib_trainer.errors import FormatError, UnsupportedModelError
from lib_trainer.headless import loader
from tests.conftest import ROOT, write_images
from tests.support.models import TINY_UNET, TINY_VAE, build_model, model_config, save_checkpoint

CLI_TIMEOUT = 240
# metadata that names the run (time, session), the model file or the host (the fake WebUI says "tiny-sd1",
# hash 0123456789), or hashes the whole file (which holds those)
VARYING_METADATA = {
    "ss_training_started_at",
    "ss_training_finished_at",
    "ss_session_id",
    "ss_new_sd_model_hash",
    "sshs_legacy_hash",
    "sd_checkpoint",
    "sd_checkpoint_name",
    "ss_sd_model_name",
    "ss_sd_model_hash",
    "sshs_model_hash",
    "modelspec.date",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, model_workdir: Path, sd1_model) -> dict[str, Path]:
    """The tiny SD1 model (the session's, as the API tests train it) as .safetensors + yaml; SD2-v with a
    ``v_pred`` marker and no yaml; the SD1 layout model as a .ckpt without yaml."""
    folder = tmp_path_factory.mktemp("checkpoints")
    files = {
        "sd1": save_checkpoint(sd1_model, folder / "tiny-sd1.safetensors", model_config("sd1", "tiny", model_workdir))
    }
    sd2 = build_model("sd2", "tiny", model_workdir)
    state = {k: v.detach().clone().contiguous() for k, v in sd2.state_dict().items()}
    save_file({**state, "v_pred": torch.tensor([])}, str(folder / "tiny-sd2v.safetensors"))
    files["sd2v"] = folder / "tiny-sd2v.safetensors"
    files["layout"] = save_checkpoint(build_model("sd1", "layout", model_workdir), folder / "layout-sd1.ckpt")
    return files


def _stack_env(tmp: Path) -> dict[str, str]:
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from tests.support.stack import prepare_stack\nprepare_stack(1)\n",
        encoding="utf-8",
    )
    return {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(
    tmp: Path, *args: str, processes: int = 1, launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m lib_trainer ARGS`` (under torchrun with ``processes``, or ``python LAUNCHER -m lib_trainer``)."""
    if launcher is None and processes > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return run_python(tmp, *(launcher or []), "-m", "lib_trainer", *args)


def run_python(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """This venv's python with ``args`` in ``tmp``, on the test stack, its output captured."""
    return subprocess.run(
        [sys.executable, *args],
        env=_stack_env(tmp),
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def write_job(path: Path, method: str, config: dict, preview: dict | None = None) -> Path:
    path.write_text(json.dumps({"method": method, "config": config, "preview": preview}), encoding="utf-8")
    return path


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def data_config(photos: Path) -> dict:
    return {"data_dir": str(photos), "width": 64, "height": 64}


JOBS = {
    "textual_inversion": lambda photos: {
        "embedding": {"name": "zqcli", "init_text": "cat"},
        "data": data_config(photos),
        "train": {"steps": 4, "save_every": 2, "batch_size": 2},
    },
    "lora": lambda photos: {
        "network": {"name": "zqcli", "rank": 4},
        "data": data_config(photos),
        "train": {"steps": 4, "save_every": 2, "batch_size": 2},
    },
    "hypernetwork": lambda photos: {
        "hypernetwork": {"name": "zqcli", "sizes": "32"},
        "data": data_config(photos),
        "train": {"steps": 4, "save_every": 2, "batch_size": 2},
    },
}
MAIN_FILES = {
    "textual_inversion": "embeddings/zqcli.safetensors",
    "lora": "models/Lora/zqcli.safetensors",
    "hypernetwork": "models/hypernetworks/zqcli.pt",
}


def _contents(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a trained file: safetensors, or a hypernetwork .pt (its tensors by key path)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})  # noqa: SIM118
    data = torch.load(path, map_location="cpu", weights_only=True)
    tensors, meta = {}, {}
    for key, value in data.items():
        if isinstance(key, int):
            for i, layer in enumerate(value):
                tensors.update({f"{key}.{i}.{k}": v for k, v in layer.items()})
        else:
            meta[key] = value
    return tensors, meta


# ---- loading checkpoint files -------------------------------------------------------------------------------


def test_sd1_config_is_read_from_the_tensors(checkpoints):
    state = loader.read_state_dict(checkpoints["layout"])
    assert loader.detect_family(state, "layout-sd1.ckpt") == "sd1"
    sizes = loader.unet_sizes(state)
    assert sizes["model_channels"] == 32
    assert sizes["channel_mult"] == [1, 2, 4, 4]
    assert sizes["num_res_blocks"] == 2
    assert sizes["attention_resolutions"] == [1, 2, 4]  # levels 0-2, as SD's [4, 2, 1]
    assert sizes["context_dim"] == 32
    assert sizes["use_linear_in_transformer"] is False
    vae = loader.vae_sizes(state)["ddconfig"]
    assert (vae["ch"], vae["ch_mult"], vae["num_res_blocks"]) == (TINY_VAE["ch"], TINY_VAE["ch_mult"], 1)
    text = loader.clip_text_config(state)
    assert (text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]) == (32, 3, 49408)


def test_tiny_sizes_match_the_builder(checkpoints):
    sizes = loader.unet_sizes(loader.read_state_dict(checkpoints["sd1"]))
    assert {k: sizes[k] for k in TINY_UNET} == {**TINY_UNET, "attention_resolutions": [1, 2]}


def test_a_checkpoint_without_yaml_loads_into_ldm_and_predicts_as_marked(checkpoints):
    loaded = loader.load_model(checkpoints["sd2v"], torch.device("cpu"), torch.float32)
    assert (loaded.family, loaded.prediction, loaded.config_source) == ("sd2", "v", "detected")
    model = loaded.model
    assert type(model).__name__ == "LatentDiffusion"
    assert type(model.cond_stage_model).__name__ == "FrozenOpenCLIPEmbedder"
    assert not hasattr(model.cond_stage_model.model, "visual")  # text tower only
    original = load_file(str(checkpoints["sd2v"]))
    for key, value in model.state_dict().items():
        if key in original:
            assert torch.equal(value, original[key]), key
    eps = loader.load_model(checkpoints["sd2v"], torch.device("cpu"), torch.float32, prediction="eps")
    assert eps.prediction == "eps"


def test_yaml_beside_the_checkpoint_gives_the_same_model(checkpoints, sd1_model):
    loaded = loader.load_model(checkpoints["sd1"], torch.device("cpu"), torch.float32)
    assert (loaded.family, loaded.prediction, loaded.config_source) == ("sd1", "eps", "tiny-sd1.yaml")
    assert type(loaded.model.cond_stage_model).__mro__[1].__name__ == "FrozenCLIPEmbedder"
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    with torch.no_grad():
        ours = loaded.model.apply_model(x, t, loaded.model.get_learned_conditioning(["a photo", "a cat"]))
        theirs = sd1_model.apply_model(x, t, sd1_model.get_learned_conditioning(["a photo", "a cat"]))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_sdxl_checkpoints_are_refused_with_the_way_to_train_them(tmp_path, sdxl_model):
    path = tmp_path / "xl.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in sdxl_model.state_dict().items()}, str(path))
    with pytest.raises(UnsupportedModelError, match=r"SDXL.*Trainer tab"):
        loader.detect_family(loader.read_state_dict(path), path.name)


class _Payload:
    """A pickle that would write a marker file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["truncated", "not_safetensors", "lora_file", "pickle_with_code", "suffix", "missing"])
def test_bad_checkpoint_files_get_clear_errors(tmp_path, checkpoints, kind):
    marker = tmp_path / "code-ran"
    if kind == "truncated":
        path = tmp_path / "cut.safetensors"
        path.write_bytes(checkpoints["sd1"].read_bytes()[:5000])
        error, match = FormatError, "damaged, truncated"
    elif kind == "not_safetensors":
        path = tmp_path / "text.safetensors"
        path.write_text("hello", encoding="utf-8")
        error, match = FormatError, "cannot be read as a .safetensors"
    elif kind == "lora_file":
        path = tmp_path / "lora.safetensors"
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(path))
        error, match = UnsupportedModelError, "not a Stable Diffusion checkpoint"
    elif kind == "pickle_with_code":
        path = tmp_path / "evil.ckpt"
        with path.open("wb") as fh:
            pickle.dump({"state_dict": {"x": _Payload(marker)}}, fh)
        error, match = FormatError, "can run code"
    elif kind == "suffix":
        path = tmp_path / "model.onnx"
        path.write_bytes(b"\0" * 16)
        error, match = FormatError, "unknown checkpoint type"
    else:
        path = tmp_path / "absent.safetensors"
        error, match = FormatError, "does not exist"
    with pytest.raises(error, match=match):
        loader.load_model(path, torch.device("cpu"), torch.float32)
    assert not marker.exists()


def test_inpainting_and_incomplete_checkpoints_are_refused(tmp_path, checkpoints):
    state = load_file(str(checkpoints["sd2v"]))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    inpaint = {**state, key: torch.zeros(state[key].shape[0], 9, 3, 3)}
    with pytest.raises(UnsupportedModelError, match="9 latent channels"):
        loader.detect_family(inpaint, "inpaint.safetensors")
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if "output_blocks.1." not in k}, str(path))
    with pytest.raises(FormatError, match=r"lacks .* weight"):
        loader.load_model(path, torch.device("cpu"), torch.float32)


# ---- the command line ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(JOBS))
def test_cli_writes_the_files_the_api_writes(method, webui, checkpoints, tmp_path):
    config = JOBS[method](webui.data)
    job = webui.manager.wait(webui.manager.submit(method, config).id, timeout=120)
    assert job.state == "done", job.error
    api_tensors, api_meta = _contents(webui.root / MAIN_FILES[method])  # the fake WebUI's folders are the same
    job_file = write_job(tmp_path / "job.json", method, config, {"enabled": True, "prompt": "[name]"})
    result = run_cli(tmp_path, "train", str(job_file), "--checkpoint", str(checkpoints["sd1"]), "--out", "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "previews: off" in result.stderr
    assert "effective batch 2 = 2 per process x 1 process(es) x 1" in result.stderr
    cli_tensors, cli_meta = _contents(tmp_path / "out" / MAIN_FILES[method])
    assert sorted(cli_tensors) == sorted(api_tensors)
    for key, value in api_tensors.items():
        torch.testing.assert_close(
            cli_tensors[key], value, rtol=0, atol=1e-5
        )  # same model, seed, steps (threads differ)
    assert sorted(cli_meta) == sorted(api_meta)
    differing = {k for k in api_meta if api_meta[k] != cli_meta[k]}
    assert differing <= VARYING_METADATA, {k: (api_meta[k], cli_meta[k]) for k in differing - VARYING_METADATA}


def test_cli_refuses_bad_input_before_training(tmp_path, checkpoints):
    photos = write_images(tmp_path / "photos")
    job_file = write_job(tmp_path / "job.json", "lora", {**JOBS["lora"](photos), "train": {"steps": 0}})
    result = run_cli(tmp_path, "train", str(job_file), "--checkpoint", str(checkpoints["sd1"]))
    assert result.returncode == 2
    assert "error [train.steps]" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli(tmp_path, "train", str(job_file), "--checkpoint", str(tmp_path / "nothing.safetensors"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_saves_and_resume_finishes(tmp_path, checkpoints):
    photos = write_images(tmp_path / "photos")
    config = {**JOBS["lora"](photos), "train": {"steps": 2000, "save_every": 0, "batch_size": 1}}
    job_file = write_job(tmp_path / "job.json", "lora", config)
    args = ["train", str(job_file), "--checkpoint", str(checkpoints["sd1"]), "--out", "out", "--json-progress"]
    command = [sys.executable, "-m", "lib_trainer", *args]
    proc = subprocess.Popen(
        command, env=_stack_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seen = []
    try:
        for line in proc.stdout:
            if '"progress"' in line:
                seen.append(json.loads(line))
            if len(seen) >= 3:
                proc.send_signal(signal.SIGINT)
                break
        rest, err = proc.communicate(timeout=CLI_TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    done = events(rest)[-1]
    assert (done["event"], done["state"]) == ("done", "interrupted")
    stopped = done["step"]
    assert 3 <= stopped < 2000
    main = tmp_path / "out" / MAIN_FILES["lora"]
    assert _contents(main)[1]["ss_steps"] == str(stopped)
    resumed = {**config, "train": {**config["train"], "steps": stopped + 3}}
    write_job(job_file, "lora", resumed)
    result = run_cli(tmp_path, *args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [e["step"] for e in events(result.stdout) if e["event"] == "progress"]
    assert steps == [stopped + 1, stopped + 2, stopped + 3]
    assert _contents(main)[1]["ss_steps"] == str(stopped + 3)
    rows = (tmp_path / "out" / "trainer" / "lora" / "zqcli" / "loss.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, stopped + 4))


# ---- several processes --------------------------------------------------------------------------------------


def test_two_processes_train_what_one_process_trains(tmp_path, checkpoints):
    """torchrun --nproc-per-node 2 with batch 1 each == one process with batch 2; a run stopped at step 3 by one
    process and resumed by two ends the same; rank 0 alone writes."""
    photos = write_images(tmp_path / "photos", count=5)

    def job(name: str, batch: int, steps: int) -> Path:
        network = {"name": "zqcli", "rank": 4, "save_precision": "fp32"}  # compared to 1e-6: fp16 is 1e-3
        # SGD: Adam divides by the gradients' size, which turns float rounding in near-zero gradients (the
        # zero-initialised up weights' first steps) into full-size steps; SGD compares the data-parallel sums
        train = {"steps": steps, "save_every": 3, "batch_size": batch, "optimizer": "sgd", "learning_rate": 0.1}
        config = {**JOBS["lora"](photos), "network": network, "train": train}
        return write_job(tmp_path / f"{name}.json", "lora", config)

    checkpoint = ["--checkpoint", str(checkpoints["sd1"])]
    one = run_cli(tmp_path, "train", str(job("one", 2, 6)), *checkpoint, "--out", "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(tmp_path, "train", str(job("two", 1, 6)), *checkpoint, "--out", "two", processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "effective batch 2 = 1 per process x 2 process(es)" in two.stderr
    half = run_cli(tmp_path, "train", str(job("half", 2, 3)), *checkpoint, "--out", "mixed")
    assert half.returncode == 0, half.stderr[-3000:]
    mixed = run_cli(tmp_path, "train", str(job("two", 1, 6)), *checkpoint, "--out", "mixed", "--resume", processes=2)
    assert mixed.returncode == 0, mixed.stderr[-3000:]

    reference, _ = _contents(tmp_path / "one" / MAIN_FILES["lora"])
    for out in ("two", "mixed"):
        tensors, meta = _contents(tmp_path / out / MAIN_FILES["lora"])
        assert meta["ss_steps"] == "6"
        worst = max((tensors[k].float() - v.float()).abs().max().item() for k, v in reference.items())
        assert worst <= 1e-6, (out, worst)
        print(f"{out}: largest difference to one process {worst:.2e}")
    files = sorted(str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(tmp_path / "one")) for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert [p for p in files if p.endswith(".safetensors")] == [
        "models/Lora/zqcli.safetensors",
        "trainer/lora/zqcli/lora/zqcli-000003.safetensors",
        "trainer/lora/zqcli/lora/zqcli-000006.safetensors",
    ]
    rows = (tmp_path / "two" / "trainer" / "lora" / "zqcli" / "loss.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4, 5, 6]


def test_accelerate_launch_trains_what_one_process_trains(tmp_path, checkpoints):
    """``accelerate launch --multi_gpu --num_processes 2`` (it starts torchrun's agent; gloo on the CPU)."""
    pytest.importorskip("accelerate")
    photos = write_images(tmp_path / "photos")

    def job(name: str, batch: int) -> Path:
        config = {**JOBS["textual_inversion"](photos), "train": {"steps": 4, "save_every": 0, "batch_size": batch}}
        return write_job(tmp_path / f"{name}.json", "textual_inversion", config)

    checkpoint = ["--checkpoint", str(checkpoints["sd1"])]
    one = run_cli(tmp_path, "train", str(job("one", 2)), *checkpoint, "--out", "one")
    assert one.returncode == 0, one.stderr[-3000:]
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    args = ["train", str(job("two", 1)), *checkpoint, "--out", "two"]
    two = run_cli(tmp_path, *args, launcher=launch)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "1 per process x 2 process(es)" in two.stderr
    reference, _ = _contents(tmp_path / "one" / MAIN_FILES["textual_inversion"])
    tensors, _ = _contents(tmp_path / "two" / MAIN_FILES["textual_inversion"])
    worst = max((tensors[k] - v).abs().max().item() for k, v in reference.items())
    assert worst <= 1e-6, worst


# ---- packaging ----------------------------------------------------------------------------------------------


def test_wheel_has_the_console_script_and_the_configs(tmp_path):
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside pyproject.toml
    shutil.copytree(ROOT / "lib_trainer", source / "lib_trainer", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", source / "pyproject.toml")
    pip = ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)]
    result = run_python(tmp_path, *pip)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("sd_webui_trainer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("sd1.yaml", "sd2.yaml", "sd2-v.yaml", "clip-vit-l-14-text.json", "open-clip-vit-h-14-text.json"):
        assert f"lib_trainer/headless/configs/{data}" in names
    assert "lib_trainer/data/templates/subject.txt" in names
    assert not [n for n in names if n.startswith("tests/")]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sd-trainer = lib_trainer.headless.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
