"""Fault injection: SIGKILL at random steps and in the middle of saves, a full or read-only disk, running out of
GPU memory, and the API under concurrent load. Bounded in time (tiny models, a few trials each).

Figures (inputs tried, kills survived, resume differences, jobs completed) are printed; run with ``-s``.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import safetensors
import torch

from lib_trainer.errors import FormatError, OutOfMemoryError
from lib_trainer.formats.embedding import read_embedding
from lib_trainer.formats.hypernetwork import read_hypernetwork
from lib_trainer.formats.lora import read_network
from lib_trainer.loop.checkpoint import read_sidecar, tensors_checksum
from lib_trainer.methods import lora
from lib_trainer.methods import textual_inversion as ti
from lib_trainer.models.guard import state_fingerprint
from lib_trainer.models.ldm import parts_from_ldm
from tests.conftest import write_images
from tests.support.fault_worker import METHODS, main_file, run_method

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
TRIALS = 3  # per method: a kill at a random step, and kills just before random file renames (inside saves)


def final_tensors(method: str, root: Path) -> list[torch.Tensor]:
    """What a run ends with: the saved file's tensors and the fp32 master copies in its resume state."""
    main = main_file(method, root)
    if method == "textual_inversion":
        saved = [read_embedding(main).vectors]
    elif method == "lora":
        saved = list(read_network(main)[0].values())
    else:
        data = read_hypernetwork(main)
        saved = [
            t
            for k, pair in sorted((k, v) for k, v in data.items() if isinstance(k, int))
            for s in pair
            for t in s.values()
        ]
    return saved + read_sidecar(main).params


def assert_every_file_loads(root: Path) -> list[Path]:
    """Every file a run wrote loads with its reader; returns the temporary files a kill left behind."""
    leftovers = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix == ".tmp":
            leftovers.append(path)
        elif path.suffix == ".safetensors":
            with safetensors.safe_open(str(path), framework="pt") as fh:
                [fh.get_tensor(k) for k in fh.keys()]  # noqa: SIM118
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.name.endswith(".trainer-state"):
            assert read_sidecar(path.with_name(path.name.removesuffix(".trainer-state"))) is not None, path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".csv":
            assert path.read_text().startswith("step,loss")
    return leftovers


class CountRenames:
    """Counts file renames (one per atomic write) while active."""

    def __init__(self, monkeypatch):
        self.count, original = 0, pathlib.Path.replace

        def replace(path, target):
            self.count += 1
            return original(path, target)

        monkeypatch.setattr(pathlib.Path, "replace", replace)


@pytest.fixture(scope="module")
def fault_data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("fault-data"), 4)


@pytest.fixture(scope="module")
def references(sd1_model, fault_data, tmp_path_factory):
    """Each method's uninterrupted run: its final tensors and how many files it renamed into place."""
    found = {}
    parts = parts_from_ldm(sd1_model)
    for method in METHODS:
        root = tmp_path_factory.mktemp(f"ref-{method}")
        with pytest.MonkeyPatch.context() as patch:
            renames = CountRenames(patch)
            run_method(method, parts, root, fault_data, STEPS)
        found[method] = (final_tensors(method, root), renames.count)
    return found


def kill_plans(method: str, renames: int) -> list[dict]:
    rng = random.Random(f"{method}-2026")
    plans = [{"kill_step": rng.randrange(1, STEPS)}]
    plans += [{"kill_replace": rng.randrange(3, renames + 1)} for _ in range(TRIALS - 1)]
    return plans


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_never_loses_a_run_and_resume_is_bit_exact(method, sd1_model, fault_data, references, tmp_path):
    reference, renames = references[method]
    parts = parts_from_ldm(sd1_model)
    for trial, plan in enumerate(kill_plans(method, renames)):
        root = tmp_path / f"trial-{trial}"
        root.mkdir()
        child = {"method": method, "root": str(root), "models": str(tmp_path / "models"), "data": str(fault_data)}
        done = subprocess.run(
            [sys.executable, "-m", "tests.support.fault_worker", json.dumps({**child, "steps": STEPS, **plan})],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
        assert (root / "model-checksum").read_text() == tensors_checksum(list(sd1_model.state_dict().values()))
        leftovers = assert_every_file_loads(root)
        run_method(method, parts, root, fault_data, STEPS)  # continue, as a user would
        assert assert_every_file_loads(root) == [], "the next run removes what a killed one left"
        resumed = final_tensors(method, root)
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(reference, resumed, strict=True))
        print(f"{method} {plan}: killed, {len(leftovers)} temporary file(s) left, resume max |diff| {diff}")
        assert len(resumed) == len(reference)
        assert all(torch.equal(a, b) for a, b in zip(reference, resumed, strict=True))


# ----- disk full, read-only folder -------------------------------------------------------------------------------


def ti_config(data: Path, steps: int = 4) -> ti.TextualInversionConfig:
    return ti.TextualInversionConfig.from_dict(
        {
            "embedding": {"name": "zqtoken"},
            "data": {"data_dir": str(data), "width": 64, "height": 64},
            "train": {"steps": steps, "save_every": 2, "preview_every": 0},
        }
    )


def test_a_full_disk_is_a_clear_error_and_nothing_is_lost(sd1_model, image_dir, tmp_path, monkeypatch):
    parts = parts_from_ldm(sd1_model)
    paths = ti.OutputPaths(tmp_path / "embeddings", tmp_path / "logs")
    ti.train_embedding(ti_config(image_dir, 2), parts, paths)
    main = paths.embeddings_dir / "zqtoken.safetensors"
    good, before = main.read_bytes(), state_fingerprint(sd1_model)
    original = pathlib.Path.write_bytes

    def full_disk(path, data):
        if path.parent == paths.embeddings_dir:
            original(path, data[: len(data) // 2])  # the disk filled up halfway through
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk)
    with pytest.raises(FormatError, match=r"cannot write zqtoken\.safetensors\S* in .*embeddings.*the disk is full"):
        ti.train_embedding(ti_config(image_dir, 6), parts, paths)
    assert main.read_bytes() == good
    assert sorted(p.name for p in paths.embeddings_dir.iterdir()) == [
        "zqtoken.safetensors",
        "zqtoken.safetensors.trainer-state",
    ]
    after = state_fingerprint(sd1_model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def _fill(path: Path) -> None:
    """Write zeros to ``path`` until its filesystem is full."""
    with path.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


def test_a_real_small_filesystem_full_then_read_only(sd1_model, image_dir, tmp_path):
    lora_dir = tmp_path / "Lora"
    if not _mount_tmpfs(lora_dir, "1m"):
        pytest.skip("no small filesystem can be mounted here (needs root and mount)")
    try:
        parts = parts_from_ldm(sd1_model)
        paths = lora.OutputPaths(lora_dir, tmp_path / "log")
        request = {
            "network": {"name": "zqnet", "rank": 4, "overwrite": True},
            "data": {"data_dir": str(image_dir), "width": 64, "height": 64, "template": "none"},
            "train": {"steps": 2, "save_every": 0, "preview_every": 0},
        }
        lora.train_lora(lora.LoraConfig.from_dict(request), parts, paths)
        main = lora_dir / "zqnet.safetensors"
        good = main.read_bytes()
        filler = lora_dir / "filler"
        _fill(filler)
        with pytest.raises(FormatError, match="the disk is full"):
            lora.train_lora(lora.LoraConfig.from_dict({**request, "train": {"steps": 4}}), parts, paths)
        assert main.read_bytes() == good
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(lora_dir)], check=True)
        with pytest.raises(FormatError, match="the folder is not writable"):
            lora.train_lora(lora.LoraConfig.from_dict({**request, "train": {"steps": 4}}), parts, paths)
        assert main.read_bytes() == good
        assert not [p for p in lora_dir.iterdir() if p.suffix == ".tmp"]
    finally:
        subprocess.run(["umount", str(lora_dir)], check=False)


# ----- out of GPU memory -------------------------------------------------------------------------------------------


def test_running_out_of_gpu_memory_keeps_the_work_and_says_what_to_change(sd1_model, image_dir, tmp_path):
    class OutOfMemoryAtStep3:
        calls = 0

        def loss(self, parts, latents, cond, generator, mask=None):
            OutOfMemoryAtStep3.calls += 1
            if OutOfMemoryAtStep3.calls == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
            return (
                parts.apply_model(latents, torch.zeros(latents.shape[0], dtype=torch.long), cond)
                .float()
                .mean(dim=(1, 2, 3))
                ** 2
            )

    before = state_fingerprint(sd1_model)
    paths = ti.OutputPaths(tmp_path / "embeddings", tmp_path / "logs")
    config = ti_config(image_dir, 6)
    expected = r"ran out of memory at step 3.*step 2\) is saved.*restored.*train\.gradient_checkpointing.*adafactor"
    with pytest.raises(OutOfMemoryError, match=expected) as info:
        ti.train_embedding(config, parts_from_ldm(sd1_model), paths, objective=OutOfMemoryAtStep3())
    assert info.value.field == "train.gradient_checkpointing"  # the first thing to change
    assert read_embedding(paths.embeddings_dir / "zqtoken.safetensors").step == 2
    after = state_fingerprint(sd1_model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----- the API under load ------------------------------------------------------------------------------------------


def test_the_api_under_concurrent_submits_polls_and_cancels(webui, client, tmp_path, monkeypatch):
    jobs_module = sys.modules["lib_trainer.webui.jobs"]
    printed, ran = [], []
    monkeypatch.setattr(jobs_module.traceback, "print_exc", lambda *a, **k: printed.append(1))
    original_state = webui.host.job_state
    monkeypatch.setattr(webui.host, "job_state", lambda title, total: ran.append(title) or original_state(title, total))
    submitted, errors, lock = [], [], threading.Lock()
    empty = tmp_path / "empty"
    empty.mkdir()

    def submitter(worker: int) -> None:
        for i in range(5):
            name = f"zqload{worker}x{i}"
            config = {
                "embedding": {"name": name},
                "data": {"data_dir": str(webui.data), "width": 64, "height": 64},
                "train": {"steps": 2, "save_every": 0, "preview_every": 0},
            }
            try:
                with lock:  # ids are handed out in this order, so this is the queue's order too
                    reply = client.post("/trainer/v1/jobs", json={"method": "textual_inversion", "config": config})
                    submitted.append((reply.json()["id"], name))
                assert reply.status_code == 200
                job_id = reply.json()["id"]
                if i % 4 == 3:
                    assert client.post(f"/trainer/v1/jobs/{job_id}/cancel").status_code == 200
                assert client.get(f"/trainer/v1/jobs/{job_id}").status_code == 200
                bad = client.post("/trainer/v1/dataset/report", json={"data_dir": str(empty / "nope")})
                assert bad.status_code == 422
                bad = client.post("/trainer/v1/preprocess", json={"input_dir": str(empty), "output_dir": str(tmp_path)})
                assert bad.status_code == 422
            except Exception as exc:  # collected and asserted below; a thread must not die silently
                errors.append(repr(exc))

    threads = [threading.Thread(target=submitter, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert errors == []
    ids = [job_id for job_id, _ in submitted]
    finished = [webui.manager.wait(job_id, timeout=300) for job_id in ids]
    states = [job.state for job in finished]
    print(
        f"API load: {len(ids)} jobs submitted, {states.count('done')} done, {states.count('cancelled')} cancelled, "
        f"{states.count('interrupted')} interrupted"
    )
    assert len(ids) == 20
    assert len(set(ids)) == 20
    assert set(states) <= {"done", "cancelled", "interrupted"}
    assert states.count("done") >= 15
    names = [f"trainer: {name}" for (_, name), job in zip(submitted, finished, strict=True) if job.state != "cancelled"]
    assert ran == names, "jobs ran in the order they were queued"
    assert printed == []
    listed = client.get("/trainer/v1/jobs").json()["jobs"]
    assert {job["id"] for job in listed} >= set(ids)
