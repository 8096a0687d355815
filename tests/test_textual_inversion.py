"""Textual inversion end to end on tiny real models: create, save format, interrupt/resume, restore, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from lib_trainer.errors import ConfigError, DatasetError, TrainerError, TrainingError
from lib_trainer.formats.embedding import read_embedding
from lib_trainer.loop.checkpoint import sidecar_path
from lib_trainer.loop.hooks import TrainingHooks
from lib_trainer.methods.textual_inversion import (
    EmbeddingConfig,
    OutputPaths,
    TextualInversionConfig,
    create_embedding,
    initial_vectors,
    train_embedding,
)
from lib_trainer.models.guard import state_fingerprint


def ti_config(data_dir: Path, **train) -> TextualInversionConfig:
    """A small, fast configuration for the tiny models."""
    settings = {"steps": 6, "batch_size": 2, "save_every": 0, "preview_every": 0, **train}
    return TextualInversionConfig.from_dict(
        {
            "embedding": {"name": "zqtoken", "init_text": "cat", "num_vectors": 2},
            "data": {"data_dir": str(data_dir), "width": 64, "height": 64},
            "train": settings,
        }
    )


@pytest.fixture
def paths(tmp_path: Path) -> OutputPaths:
    return OutputPaths(tmp_path / "embeddings", tmp_path / "logs")


def webui_loads(path: Path, expected_dim: int) -> tuple[str, torch.Tensor]:
    """The WebUI 1.10 EmbeddingDatabase rule for .safetensors (docs/formats.md 1): one tensor [n, dim] -> usable."""
    data = safetensors.torch.load_file(str(path), device="cpu")
    assert "string_to_param" not in data
    assert not ("clip_l" in data and "clip_g" in data)
    assert len(data) == 1, "a diffusers-concept style file must hold exactly one tensor"
    vec = next(iter(data.values())).detach().to(torch.float32)
    vec = vec.unsqueeze(0) if vec.dim() == 1 else vec
    assert vec.shape[-1] == expected_dim, "else the WebUI puts it in skipped_embeddings"
    return path.stem, vec


class StopAfter(TrainingHooks):
    """Interrupt (like the Interrupt button) after a given step; record saves."""

    def __init__(self, step: int):
        self.step, self.saved = step, []

    def on_progress(self, progress):
        self.last = progress

    def should_stop(self):
        return self.last.step >= self.step

    def on_saved(self, path, step):
        self.saved.append((path.name, step))


def test_initial_vectors_repeat_tokens_like_the_webui(parts):
    rows = parts.text_encoder.token_vectors(parts.text_encoder.tokenize("red cat"))
    vectors = initial_vectors(parts, "red cat", 4)
    torch.testing.assert_close(vectors, torch.stack([rows[0], rows[0], rows[1], rows[1]]))
    torch.testing.assert_close(initial_vectors(parts, "red cat blue", 2), rows[:2])  # truncated to n tokens
    assert not initial_vectors(parts, "", 3).any()


def test_created_file_is_what_the_webui_loads(parts, tmp_path):
    path = create_embedding(EmbeddingConfig(name="zqtoken", init_text="cat", num_vectors=3), parts, tmp_path)
    assert path == tmp_path / "zqtoken.safetensors"
    name, vec = webui_loads(path, parts.text_encoder.dim)
    assert name == "zqtoken"
    assert vec.shape == (3, parts.text_encoder.dim)
    assert safetensors.torch.load_file(str(path))["emb_params"].dtype == torch.float32
    loaded = read_embedding(path)
    torch.testing.assert_close(loaded.vectors, initial_vectors(parts, "cat", 3), rtol=0, atol=0)
    assert loaded.step == 0
    assert loaded.name == "zqtoken"
    assert loaded.metadata["modelspec.architecture"].endswith("/textual-inversion")


def test_create_refuses_existing_name_unless_overwrite(parts, tmp_path):
    config = EmbeddingConfig(name="zqtoken")
    create_embedding(config, parts, tmp_path)
    with pytest.raises(ConfigError, match="already used"):
        create_embedding(config, parts, tmp_path)
    create_embedding(EmbeddingConfig(name="zqtoken", overwrite=True), parts, tmp_path)
    (tmp_path / "sub").mkdir()
    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}}, tmp_path / "sub" / "other.pt")
    with pytest.raises(ConfigError, match="already used"):
        create_embedding(EmbeddingConfig(name="other", overwrite=True), parts, tmp_path)


def test_reads_webui_pt_and_kohya_files(tmp_path):
    vec = torch.randn(2, 32)
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vec},
            "name": "x",
            "step": 1234,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
        },
        tmp_path / "webui.pt",
    )
    safetensors.torch.save_file({"emb_params": vec}, str(tmp_path / "kohya.safetensors"), metadata={"step": "7"})
    safetensors.torch.save_file({"clip_l": vec, "clip_g": vec.clone()}, str(tmp_path / "sdxl.safetensors"))
    webui = read_embedding(tmp_path / "webui.pt")
    assert webui.step == 1234
    assert torch.equal(webui.vectors, vec)
    kohya = read_embedding(tmp_path / "kohya.safetensors")
    assert kohya.step == 7
    assert torch.equal(kohya.vectors, vec)
    sdxl = read_embedding(tmp_path / "sdxl.safetensors")  # SDXL: clip_l's part, then clip_g's
    assert torch.equal(sdxl.vectors, torch.cat([vec, vec], dim=1))


def test_training_saves_numbered_copies_log_and_main_file(parts, image_dir, paths):
    result = train_embedding(ti_config(image_dir, steps=6, save_every=3), parts, paths)
    run = paths.log_dir / "zqtoken"
    assert result.step == 6
    assert not result.stopped
    assert sorted(p.name for p in (run / "embeddings").iterdir()) == ["zqtoken-3.safetensors", "zqtoken-6.safetensors"]
    main = paths.embeddings_dir / "zqtoken.safetensors"
    assert read_embedding(main).step == 6
    assert sidecar_path(main).is_file()
    webui_loads(main, parts.text_encoder.dim)
    lines = (run / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,learning_rate,elapsed_s,loss_instance,loss_prior"  # parts: prior preservation only
    assert len(lines) == 7
    assert [row["step"] for row in result.history] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in paths.embeddings_dir.iterdir()) == [
        "zqtoken.safetensors",
        "zqtoken.safetensors.trainer-state",
    ]


def test_only_the_new_vectors_change(parts, image_dir, paths):
    before = initial_vectors(parts, "cat", 2)
    train_embedding(ti_config(image_dir, steps=3), parts, paths)
    after = read_embedding(paths.embeddings_dir / "zqtoken.safetensors").vectors
    assert not torch.equal(before, after)


def test_interrupt_saves_and_resume_continues_the_step_count(parts, image_dir, paths):
    hooks = StopAfter(4)
    first = train_embedding(ti_config(image_dir, steps=10), parts, paths, hooks)
    assert first.stopped
    assert first.step == 4
    assert ("zqtoken.safetensors", 4) in hooks.saved
    assert read_embedding(paths.embeddings_dir / "zqtoken.safetensors").step == 4
    second = train_embedding(ti_config(image_dir, steps=10), parts, paths)
    assert second.start_step == 4
    assert second.step == 10
    assert [row["step"] for row in second.history] == [5, 6, 7, 8, 9, 10]
    assert read_embedding(paths.embeddings_dir / "zqtoken.safetensors").step == 10


def test_resume_with_sidecar_reproduces_an_uninterrupted_run(parts, image_dir, tmp_path):
    straight = OutputPaths(tmp_path / "a" / "emb", tmp_path / "a" / "log")
    train_embedding(ti_config(image_dir, steps=6), parts, straight)
    split = OutputPaths(tmp_path / "b" / "emb", tmp_path / "b" / "log")
    train_embedding(ti_config(image_dir, steps=6), parts, split, StopAfter(3))
    train_embedding(ti_config(image_dir, steps=6), parts, split)
    a = read_embedding(straight.embeddings_dir / "zqtoken.safetensors").vectors
    b = read_embedding(split.embeddings_dir / "zqtoken.safetensors").vectors
    torch.testing.assert_close(a, b)


def test_resume_from_another_file(parts, image_dir, paths, tmp_path):
    source = tmp_path / "old.pt"
    torch.save({"string_to_param": {"*": torch.randn(3, parts.text_encoder.dim)}, "step": 2}, source)
    config = TextualInversionConfig.from_dict({**_as_dict(ti_config(image_dir, steps=4)), "resume_from": str(source)})
    result = train_embedding(config, parts, paths)
    assert result.start_step == 2
    assert result.step == 4
    assert read_embedding(paths.embeddings_dir / "zqtoken.safetensors").vectors.shape[0] == 3


def _as_dict(config):
    from lib_trainer.config import to_dict

    return to_dict(config)


class Boom(TrainingHooks):
    """Fails in the second step's progress report, as a crashing UI callback would."""

    def __init__(self):
        self.calls = 0

    def on_progress(self, progress):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom")


def test_model_is_bit_identical_after_training_and_after_an_error(sd_model, parts, image_dir, paths):
    before = state_fingerprint(sd_model)
    flags = [(p.requires_grad) for p in sd_model.parameters()]
    sd_model.model.train()  # an unusual host state must come back as it was, too
    modes = [m.training for m in sd_model.modules()]
    train_embedding(ti_config(image_dir, steps=3), parts, paths)
    with pytest.raises(RuntimeError, match="boom"):
        train_embedding(ti_config(image_dir, steps=6), parts, paths, Boom())
    after = state_fingerprint(sd_model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in sd_model.parameters()] == flags
    assert [m.training for m in sd_model.modules()] == modes
    sd_model.eval()


def test_crash_keeps_the_work_done_so_far(parts, image_dir, paths):
    with pytest.raises(RuntimeError, match="boom"):
        train_embedding(ti_config(image_dir, steps=6), parts, paths, Boom())
    assert read_embedding(paths.embeddings_dir / "zqtoken.safetensors").step == 2


def test_non_finite_loss_stops_with_a_clear_error(parts, image_dir, paths):
    class NaNObjective:
        calls = 0

        def loss(self, parts, latents, cond, generator):
            NaNObjective.calls += 1
            value = cond.float().mean() * 0 + (float("nan") if NaNObjective.calls > 2 else 1.0)
            return value.expand(latents.shape[0])

    with pytest.raises(TrainingError, match=r"Lower train\.learning_rate"):
        train_embedding(ti_config(image_dir, steps=6), parts, paths, objective=NaNObjective())
    saved = read_embedding(paths.embeddings_dir / "zqtoken.safetensors")
    assert saved.step == 2
    assert torch.isfinite(saved.vectors).all()


def _nothing_written(paths: OutputPaths) -> bool:
    return not paths.embeddings_dir.exists() and not paths.log_dir.exists()


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("empty folder", DatasetError, "holds no images"),
        ("only non-images", DatasetError, "holds no images"),
        ("only a text file named .png", DatasetError, "none of its 1 image file"),
        ("missing captions", DatasetError, "no caption file"),
        ("missing folder", DatasetError, "not an existing folder"),
    ],
)
def test_bad_data_is_a_clear_error_and_nothing_is_written(sd1_model, tmp_path, case, error, message):
    from lib_trainer.models.ldm import parts_from_ldm
    from tests.conftest import write_images

    data = tmp_path / "data"
    data.mkdir()
    if case == "only non-images":
        (data / "notes.md").write_text("hello")
    elif case == "only a text file named .png":
        (data / "fake.png").write_text("not an image")
    elif case == "missing captions":
        write_images(data, 2, captions=False)
    elif case == "missing folder":
        data = tmp_path / "nope"
    paths = OutputPaths(tmp_path / "embeddings", tmp_path / "logs")
    with pytest.raises(error, match=message):
        train_embedding(ti_config(data), parts_from_ldm(sd1_model), paths)
    assert _nothing_written(paths)


class Warnings(TrainingHooks):
    def __init__(self):
        self.messages = []

    def on_warning(self, message):
        self.messages.append(message)


def test_unreadable_files_among_good_ones_are_skipped_with_a_warning(sd1_model, tmp_path):
    from PIL import Image

    from lib_trainer.models.ldm import parts_from_ldm
    from tests.conftest import write_images

    data = write_images(tmp_path / "data", 2)
    (data / "fake.png").write_text("not an image")
    Image.new("RGB", (64, 64), "red").save(data / "t.jpg", quality=95)
    raw = (data / "t.jpg").read_bytes()
    (data / "t.jpg").write_bytes(raw[: len(raw) // 2])
    (data / "t.txt").write_text("red")
    hooks = Warnings()
    paths = OutputPaths(tmp_path / "embeddings", tmp_path / "logs")
    result = train_embedding(ti_config(data, steps=2), parts_from_ldm(sd1_model), paths, hooks)
    assert result.step == 2
    (message,) = hooks.messages
    assert "2 file(s)" in message
    assert "fake.png: cannot be read as an image" in message
    assert "t.jpg: cannot be read as an image" in message


@pytest.mark.parametrize(
    ("embedding", "message"),
    [
        ({"name": "a/b"}, "contains '/'"),
        ({"name": "..\\evil"}, "contains"),
        ({"name": ""}, "empty"),
        ({"name": "ok", "num_vectors": 0}, "between 1 and 75, but is 0"),
        ({"name": "ok", "num_vectors": 100}, "between 1 and 75, but is 100"),
    ],
)
def test_bad_embedding_settings(embedding, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        TextualInversionConfig.from_dict({"embedding": embedding, "data": {"data_dir": str(tmp_path)}})


def test_unknown_template_lists_the_valid_ones(sd1_model, image_dir, tmp_path):
    from lib_trainer.models.ldm import parts_from_ldm

    config = TextualInversionConfig.from_dict(
        {"embedding": {"name": "zqtoken"}, "data": {"data_dir": str(image_dir), "template": "portrait"}}
    )
    paths = OutputPaths(tmp_path / "embeddings", tmp_path / "logs")
    with pytest.raises(ConfigError, match="subject_filewords"):
        train_embedding(config, parts_from_ldm(sd1_model), paths)
    assert _nothing_written(paths)


def test_embedding_of_another_width_is_refused(parts, image_dir, paths):
    paths.embeddings_dir.mkdir(parents=True)
    safetensors.torch.save_file({"emb_params": torch.zeros(1, 768)}, str(paths.embeddings_dir / "zqtoken.safetensors"))
    with pytest.raises(TrainerError, match="width 768"):
        train_embedding(ti_config(image_dir), parts, paths)


def test_saved_files_get_normal_permissions(parts, tmp_path):
    import os
    import stat

    path = create_embedding(EmbeddingConfig(name="zqperm"), parts, tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["zqperm.safetensors"]  # no temporary file left behind
