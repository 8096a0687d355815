"""Embedding fine-tuning: existing token rows learn a hidden change, the host matrix is never written, and the rows
file applies to a checkpoint that then gives the trained outputs."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from lib_trainer.errors import ConfigError
from lib_trainer.formats.model_file import checkpoint_tensors
from lib_trainer.loop.hooks import TrainingHooks
from lib_trainer.loop.train import train
from lib_trainer.methods import token_finetune as rows
from lib_trainer.models.diffusion import add_noise
from lib_trainer.models.guard import parameter_versions, state_fingerprint
from lib_trainer.models.ldm import parts_from_ldm
from lib_trainer.models.sgm import parts_from_sgm
from lib_trainer.models.text import embedding_table
from tests.conftest import write_images
from tests.support.known_answer import FixedBatches, TeacherObjective
from tests.support.models import build_model


def job(data, **finetune) -> dict:
    return {
        "finetune": {"name": "zqrows", "tokens": "dog", **finetune},
        "data": {"data_dir": str(data), "width": 64, "height": 64, "template": "none"},
        "train": {"steps": 3, "learning_rate": "1e-2", "save_every": 0, "preview_every": 0},
    }


def paths(root) -> rows.OutputPaths:
    return rows.OutputPaths(root / "rows", root / "Stable-diffusion", root / "logs")


@pytest.mark.slow
def test_token_rows_recover_a_hidden_row_change(sd1_model, tmp_path):
    parts = parts_from_ldm(sd1_model)
    prompts = ["a photo of a dog", "dog, red"]
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([250, 650])
    x_t = add_noise(x0, torch.randn(2, 4, 8, 8, generator=gen), t, parts.alphas_cumprod)
    table = embedding_table(parts.text_encoder.token_embedding_module())
    ids = parts.text_encoder.tokenize("dog")
    saved = table.weight.detach().clone()
    with torch.no_grad():
        table.weight[ids] += torch.randn(len(ids), table.embedding_dim, generator=gen) * 0.05
        target = parts.apply_model(x_t, t, parts.text_encoder.encode(prompts)).float()
        table.weight.copy_(saved)
    objective = TeacherObjective(x_t, t, target)
    config = rows.EmbeddingFinetuneConfig.from_dict(job(tmp_path) | {"train": {"steps": 200, "learning_rate": "4e-3"}})
    trainable = rows.RowsTrainable(config, parts, paths(tmp_path))
    trainable.save = lambda step, resume: []
    versions = parameter_versions([sd1_model])
    losses = {}

    class Probe(TrainingHooks):
        def on_progress(self, progress):
            losses.setdefault("first", progress.loss)
            losses["last"] = progress.loss

    train(parts, trainable, FixedBatches(x0, prompts), objective, config.train, Probe())
    assert parameter_versions([sd1_model]) == versions  # the host matrix was never written
    assert torch.equal(table.weight, saved)
    assert not table._forward_hooks
    ratio = losses["first"] / losses["last"]
    print(f"token rows known answer: loss {losses['first']:.3e} -> {losses['last']:.3e} ({ratio:.0f}x)")
    assert ratio >= 20


def test_rows_file_applies_to_a_checkpoint_with_the_trained_outputs(sd1_model, tmp_path):
    parts = parts_from_ldm(sd1_model)
    data = write_images(tmp_path / "data")
    (data / "00-image.txt").write_text("a dog")
    config = rows.EmbeddingFinetuneConfig.from_dict(job(data, tokens="dog, red", apply_to_checkpoint=True))
    gen = torch.Generator().manual_seed(1)
    x_t, t = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([400])
    seen = []

    class Probe(TrainingHooks):
        def on_saved(self, path, step):
            if path.parent.name == "rows" and path.parent.parent == tmp_path:
                with torch.no_grad():
                    seen.append(parts.apply_model(x_t, t, parts.text_encoder.encode(["a red dog"])).clone())

    before = state_fingerprint(sd1_model)
    result = rows.train_rows(config, parts, paths(tmp_path), Probe())
    after = state_fingerprint(sd1_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    rows_file = tmp_path / "rows" / "zqrows.safetensors"
    tensors = safetensors.torch.load_file(str(rows_file))
    ids = sorted(set(parts.text_encoder.tokenize("dog") + parts.text_encoder.tokenize("red")))
    assert tensors["clip_l.token_ids"].tolist() == ids
    assert tensors["clip_l.rows"].shape == (len(ids), parts.text_encoder.dim)
    checkpoint = tmp_path / "Stable-diffusion" / "zqrows.safetensors"
    assert checkpoint in result.saved

    fresh = build_model("sd1", "tiny", tmp_path / "fresh", seed=4)
    fresh.load_state_dict(safetensors.torch.load_file(str(checkpoint)), strict=True)
    fresh_parts = parts_from_ldm(fresh)
    with torch.no_grad():
        again = fresh_parts.apply_model(x_t, t, fresh_parts.text_encoder.encode(["a red dog"]))
        base = parts.apply_model(x_t, t, parts.text_encoder.encode(["a red dog"]))
    assert torch.allclose(again, seen[-1], atol=1e-6)
    assert not torch.allclose(again, base, atol=1e-6)
    applied = rows.apply_rows(checkpoint_tensors(sd1_model), rows_file)  # the same from the file alone
    assert torch.equal(
        applied["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"],
        safetensors.torch.load_file(str(checkpoint))[
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
        ],
    )


def test_whole_matrix_and_sdxl_encoders(sdxl_model, tmp_path):
    parts = parts_from_sgm(sdxl_model)
    data = write_images(tmp_path / "data")
    config = rows.EmbeddingFinetuneConfig.from_dict(job(data, whole_matrix=True, tokens=""))
    versions = parameter_versions([sdxl_model])
    rows.train_rows(config, parts, paths(tmp_path))
    assert parameter_versions([sdxl_model]) == versions
    tensors = safetensors.torch.load_file(str(tmp_path / "rows" / "zqrows.safetensors"))
    assert set(tensors) == {"clip_l.token_ids", "clip_l.rows", "clip_g.token_ids", "clip_g.rows"}
    for key, encoder in rows.encoders(parts):
        table = embedding_table(encoder.token_embedding_module())
        assert tensors[f"{key}.rows"].shape == table.weight.shape


def test_bad_rows_settings(sd1_model, tmp_path):
    with pytest.raises(ConfigError, match=r"finetune\.tokens is empty"):
        rows.EmbeddingFinetuneConfig.from_dict(job(tmp_path, tokens=" , "))
    data = write_images(tmp_path / "data")
    parts = parts_from_ldm(sd1_model)
    with pytest.raises(ConfigError, match="no training prompt contains"):  # the captions never say "dog"
        rows.train_rows(rows.EmbeddingFinetuneConfig.from_dict(job(data)), parts, paths(tmp_path))
    config = rows.EmbeddingFinetuneConfig.from_dict(job(data, tokens="blue"))
    rows.train_rows(config, parts, paths(tmp_path))
    with pytest.raises(ConfigError, match="already exists"):
        rows.check(config, parts, paths(tmp_path))


def test_an_embedding_finetune_job_on_the_fake_webui(webui):
    request = job(webui.data, apply_to_checkpoint=True)
    request["data"]["template"] = "subject"  # "a photo of [name]": with [name] = zqrows no prompt says "dog"
    with pytest.raises(ConfigError, match="no training prompt contains") as info:
        webui.manager.submit("embedding_finetune", request)
    assert info.value.field == "finetune.tokens"
    request = job(webui.data, apply_to_checkpoint=True, tokens="red")  # the captions are "red, blue, tagN"
    request["data"]["template"] = "subject_filewords"
    done = webui.manager.wait(webui.manager.submit("embedding_finetune", request, {"enabled": False}).id, 120)
    assert done.state == "done", done.error
    assert (webui.root / "trainer" / "token_rows" / "zqrows.safetensors").is_file()
    assert (webui.root / "models" / "Stable-diffusion" / "zqrows.safetensors").is_file()
