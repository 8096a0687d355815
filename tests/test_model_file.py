"""Full checkpoints in the loaded checkpoint's LDM key layout, and exact restore of changed host weights
(the foundations of full fine-tuning, issue 11)."""

from __future__ import annotations

import copy
import types

import pytest
import safetensors
import torch
from torch import nn

from lib_trainer.errors import FormatError
from lib_trainer.formats import model_file
from lib_trainer.formats.model_file import checkpoint_key, checkpoint_tensors, save_checkpoint
from lib_trainer.models.guard import restored_weights, state_fingerprint


class Hijack(nn.Module):
    """The WebUI's way of wrapping a module: the original under ``wrapped``."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped


def test_checkpoint_keys_drop_the_webuis_wrappers():
    assert checkpoint_key(
        "cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight"
    ) == ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
    assert checkpoint_key("conditioner.embedders.1.wrapped.model.ln_final.weight") == (
        "conditioner.embedders.1.model.ln_final.weight"
    )


def test_a_hijacked_model_writes_its_checkpoint_layout_and_it_loads_back(sd1_model, tmp_path):
    native = {k: v.clone() for k, v in sd1_model.state_dict().items()}  # the tiny model's checkpoint layout
    hijacked = copy.deepcopy(sd1_model)
    hijacked.cond_stage_model = Hijack(hijacked.cond_stage_model)
    embeddings = hijacked.cond_stage_model.wrapped.transformer.text_model.embeddings
    embeddings.token_embedding = Hijack(embeddings.token_embedding)
    tensors = checkpoint_tensors(hijacked, keys=list(native))
    assert list(tensors) == list(native)
    path = save_checkpoint(tmp_path / "new.safetensors", tensors, {"trainer": "sd-webui-trainer"}, "fp32")
    with safetensors.safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["trainer"] == "sd-webui-trainer"
        loaded = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    fresh = copy.deepcopy(sd1_model)
    fresh.load_state_dict(loaded, strict=True)
    assert all(torch.equal(loaded[k], native[k]) for k in native)


def test_save_precision_casts_and_an_overflow_is_refused(tmp_path):
    tensors = {"a.weight": torch.tensor([1.5, -2.0]), "a.steps": torch.tensor([3], dtype=torch.int64)}
    path = save_checkpoint(tmp_path / "h.safetensors", tensors, {}, "fp16")
    with safetensors.safe_open(str(path), framework="pt") as fh:
        assert fh.get_tensor("a.weight").dtype == torch.float16
        assert fh.get_tensor("a.steps").dtype == torch.int64
    with pytest.raises(FormatError, match="overflows float16") as info:
        save_checkpoint(tmp_path / "o.safetensors", {"a.weight": torch.tensor([1e6])}, {}, "fp16")
    assert info.value.field == "save_precision"
    assert not (tmp_path / "o.safetensors").exists()


def test_a_key_of_the_loaded_file_the_model_lacks_is_refused(sd1_model):
    with pytest.raises(FormatError, match="no tensor for 1 key"):
        checkpoint_tensors(sd1_model, keys=[*sd1_model.state_dict(), "model_ema.decay"])


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(model_file.shutil, "disk_usage", lambda _p: types.SimpleNamespace(free=10 * 2**20))
    big = {"w": torch.zeros(64, 2**20 // 4)}  # 64 MiB in fp32, 32 MiB in fp16
    with pytest.raises(FormatError, match="GiB free but the checkpoint needs"):
        save_checkpoint(tmp_path / "big.safetensors", big, {}, "fp16")
    assert list(tmp_path.iterdir()) == []


def _change_then_fail(params):
    with restored_weights(params), torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
        raise RuntimeError("boom")


def test_changed_host_weights_are_restored_bit_identically_also_after_an_error(sd1_model):
    before = state_fingerprint(sd1_model)
    params = list(sd1_model.model.parameters())
    with pytest.raises(RuntimeError, match="boom"):
        _change_then_fail(params)
    after = state_fingerprint(sd1_model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sdxl_keys_are_the_sgm_checkpoint_layout(sdxl_model):
    keys = set(checkpoint_tensors(sdxl_model))
    prefixes = {".".join(k.split(".")[:4]) for k in keys if k.startswith("conditioner.")}
    assert prefixes == {"conditioner.embedders.0.transformer", "conditioner.embedders.1.model"}  # as SDXL files
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.") for k in keys)
