"""The training loop's contract with hooks, precision and the host model's parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib_trainer.errors import ConfigError
from lib_trainer.loop.hooks import TrainingHooks
from lib_trainer.methods.textual_inversion import OutputPaths, TextualInversionConfig, train_embedding


def config(data_dir: Path, **train) -> TextualInversionConfig:
    settings = {"steps": 4, "save_every": 0, "preview_every": 0, **train}
    return TextualInversionConfig.from_dict(
        {
            "embedding": {"name": "zqtoken", "init_text": "cat"},
            "data": {"data_dir": str(data_dir), "width": 64, "height": 64},
            "train": settings,
        }
    )


class Recorder(TrainingHooks):
    """Records everything the loop reports; can ask for a save at a given step."""

    def __init__(self, parts=None, save_at: int = -1):
        self.parts, self.save_at = parts, save_at
        self.progress, self.previews, self.saved, self.trainable_host = [], [], [], []

    def on_progress(self, progress):
        self.progress.append(progress)
        if self.parts is not None:
            host = [p for m in self.parts.host_modules.values() for p in m.parameters()]
            self.trainable_host.append(sum(p.requires_grad or p.grad is not None for p in host))

    def should_save(self):
        return bool(self.progress) and self.progress[-1].step == self.save_at

    def on_saved(self, path, step):
        self.saved.append((path.name, step))

    def on_preview(self, step, state):
        self.previews.append((step, [tuple(p.shape) for p in state.parameters()]))


def test_hooks_progress_preview_and_save_now(parts, image_dir, tmp_path):
    hooks = Recorder(parts, save_at=2)
    train_embedding(
        config(image_dir, steps=4, preview_every=2), parts, OutputPaths(tmp_path / "e", tmp_path / "l"), hooks
    )
    assert [p.step for p in hooks.progress] == [1, 2, 3, 4]
    assert all(p.total_steps == 4 and p.loss > 0 and p.learning_rate == 0.005 for p in hooks.progress)
    assert hooks.progress[-1].eta_s == 0.0
    assert hooks.progress[0].eta_s > 0
    assert "zqtoken" in hooks.progress[0].prompt
    assert hooks.previews == [(2, [(1, parts.text_encoder.dim)]), (4, [(1, parts.text_encoder.dim)])]
    assert [s for s in hooks.saved if s[0] == "zqtoken.safetensors"] == [
        ("zqtoken.safetensors", 2),
        ("zqtoken.safetensors", 4),
    ]


def test_host_parameters_are_frozen_and_get_no_gradients(parts, image_dir, tmp_path):
    hooks = Recorder(parts)
    train_embedding(config(image_dir), parts, OutputPaths(tmp_path / "e", tmp_path / "l"), hooks)
    assert hooks.trainable_host == [0, 0, 0, 0]


def test_gradient_accumulation_draws_one_batch_per_micro_step(parts, image_dir, tmp_path, monkeypatch):
    from lib_trainer.data import dataset

    calls = []
    original = dataset.TrainingBatches.next_batch
    monkeypatch.setattr(dataset.TrainingBatches, "next_batch", lambda self: calls.append(1) or original(self))
    train_embedding(
        config(image_dir, steps=3, gradient_accumulation=3), parts, OutputPaths(tmp_path / "e", tmp_path / "l")
    )
    assert len(calls) == 9


def test_bf16_autocast_runs_on_cpu(sd1_model, image_dir, tmp_path):
    from lib_trainer.models.ldm import parts_from_ldm

    hooks = Recorder()
    train_embedding(
        config(image_dir, steps=2, mixed_precision="bf16"),
        parts_from_ldm(sd1_model),
        OutputPaths(tmp_path / "e", tmp_path / "l"),
        hooks,
    )
    assert all(torch.isfinite(torch.tensor(p.loss)) for p in hooks.progress)


def test_fp16_on_cpu_is_refused_before_anything_is_written(sd1_model, image_dir, tmp_path):
    from lib_trainer.models.ldm import parts_from_ldm

    with pytest.raises(ConfigError, match=r"fp16.*needs a CUDA GPU"):
        train_embedding(
            config(image_dir, mixed_precision="fp16"),
            parts_from_ldm(sd1_model),
            OutputPaths(tmp_path / "e", tmp_path / "l"),
        )
    assert not (tmp_path / "e").exists()
    assert not (tmp_path / "l").exists()
