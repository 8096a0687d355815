"""Speed and memory options (issue 12): SDPA attention for training, cached text-encoder outputs, models moved
off the GPU while idle, the VRAM preflight and the out-of-memory path, torch.compile, full bf16."""

from __future__ import annotations

import pytest
import torch

from lib_trainer.errors import ConfigError
from lib_trainer.formats.embedding import EmbeddingFile, read_embedding
from lib_trainer.formats.lora import read_network
from lib_trainer.loop import train as train_module
from lib_trainer.loop.checkpoint import read_sidecar
from lib_trainer.loop.hooks import TrainingHooks
from lib_trainer.methods import lora
from lib_trainer.methods import textual_inversion as ti
from lib_trainer.models import compiled as compiled_module
from lib_trainer.models.attention import cross_attentions, sdpa_attention
from lib_trainer.models.diffusion import DiffusionObjective
from lib_trainer.models.guard import frozen_host, state_fingerprint
from lib_trainer.models.ldm import parts_from_ldm
from lib_trainer.models.parts import Prompts, SizeCondition
from lib_trainer.models.sgm import parts_from_sgm


def _parts(request, family):
    model = request.getfixturevalue(f"{family}_model")
    return parts_from_sgm(model) if family == "sdxl" else parts_from_ldm(model)


def _prompts(family, texts):
    size = SizeCondition((64, 64), (0, 0), (64, 64))
    return Prompts(texts, [size] * len(texts)) if family == "sdxl" else texts


def _trainable(method, parts, tmp_path):
    data = {"data_dir": str(tmp_path)}
    train = {"steps": 1, "save_every": 0, "preview_every": 0}
    if method == "lora":
        config = lora.LoraConfig.from_dict({"network": {"name": "zqnet", "rank": 4}, "data": data, "train": train})
        trainable = lora.NetworkTrainable(config, parts, lora.OutputPaths(tmp_path / "L", tmp_path / "log"), [])
        with torch.no_grad():  # up factors start at zero: give every factor a gradient
            for p in trainable.parameters():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        return trainable
    emb = {"name": "zqtoken", "init_text": "cat", "num_vectors": 2}
    config = ti.TextualInversionConfig.from_dict({"embedding": emb, "data": data, "train": train})
    start = EmbeddingFile(ti.initial_vectors(parts, "cat", 2), 0, "zqtoken")
    return ti.EmbeddingTrainable(config, parts, ti.OutputPaths(tmp_path / "e", tmp_path / "log"), start)


def _gradients(parts, trainable, family, sdpa: bool) -> list[torch.Tensor]:
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = _prompts(family, ["a photo of zqtoken", "zqtoken, red"])
    with frozen_host(parts.host_modules.values()), trainable.attach(parts), sdpa_attention(parts.unet, sdpa):
        cond = trainable.condition(parts, prompts)
        loss = DiffusionObjective().loss(parts, latents, cond, torch.Generator().manual_seed(1)).mean()
        grads = torch.autograd.grad(loss, trainable.parameters())
    return [g.detach().clone() for g in grads]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("method", ["lora", "ti"])
def test_sdpa_training_attention_gives_the_host_attentions_gradients(request, tmp_path, family, method):
    parts = _parts(request, family)
    assert cross_attentions(parts.unet)  # every family's attentions are found
    trainable = _trainable(method, parts, tmp_path)
    host = _gradients(parts, trainable, family, sdpa=False)
    fast = _gradients(parts, trainable, family, sdpa=True)
    assert any(bool(g.abs().sum() > 0) for g in host)
    for a, b in zip(host, fast, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max())), float((a - b).abs().max())
    assert not any("forward" in m.__dict__ for m in parts.unet.modules())  # the host's forwards are back


def test_sdpa_is_not_used_without_gradients_or_for_xformers(sd1_model):
    parts = parts_from_ldm(sd1_model)
    attention = cross_attentions(parts.unet)[0]
    calls = []
    original = type(attention).forward

    def host_forward(self, x, context=None, mask=None, **kwargs):
        calls.append(x.shape)
        return original(self, x, context=context, mask=mask)

    cls = type(attention)
    try:
        cls.forward = host_forward  # as the WebUI's optimisation sets it, at class level
        x = torch.randn(1, 16, attention.to_q.in_features)
        with sdpa_attention(parts.unet):
            with torch.no_grad():
                attention(x)
            assert len(calls) == 1  # previews: the host's forward
            attention(x.requires_grad_())
            assert len(calls) == 1  # training: SDPA
        host_forward.__name__ = "xformers_attention_forward"
        assert cross_attentions(parts.unet) == []
    finally:
        cls.forward = original


def _lora_run(parts, data_dir, tmp_path, tag, **train):
    request = {
        "network": {"name": "zqnet", "rank": 4, "overwrite": True},
        "data": {"data_dir": str(data_dir), "width": 64, "height": 64, "template": "subject", "flip": True},
        "train": {"steps": 4, "save_every": 0, "preview_every": 0, "learning_rate": "1e-3", "batch_size": 2, **train},
    }
    paths = lora.OutputPaths(tmp_path / f"L{tag}", tmp_path / f"log{tag}")
    result = lora.train_lora(lora.LoraConfig.from_dict(request), parts, paths)
    return [r["loss"] for r in result.history], read_network(result.saved[-1])[0]


def _long_captions(folder):
    """One caption of over 75 tokens (two chunks) among short ones, and several template lines."""
    long = ", ".join(f"tag{i} word{i}" for i in range(60))
    (folder / "00-image.txt").write_text(long, encoding="utf-8")
    return folder


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cached_text_encoder_outputs_train_the_same_and_skip_the_encoder(request, image_dir, tmp_path, family):
    parts = _parts(request, family)
    data = _long_captions(image_dir)
    calls = []
    encode = parts.condition

    def counting(prompts, vectors=None):
        calls.append(len(prompts))
        return encode(prompts, vectors)

    parts.condition = counting
    live_loss, live_tensors = _lora_run(parts, data, tmp_path, "live", cache_text_encoder_outputs=False)
    assert len(calls) == 4  # one encoding per step
    calls.clear()
    cached_loss, cached_tensors = _lora_run(parts, data, tmp_path, "cached")
    assert all(n == 1 for n in calls)  # every prompt once, before training
    assert len(calls) > 4
    assert cached_loss == pytest.approx(live_loss, rel=1e-5)
    assert all(torch.allclose(live_tensors[k], cached_tensors[k], atol=1e-6) for k in live_tensors)


def test_varying_captions_or_a_training_text_encoder_are_not_cached(sd1_model, image_dir, tmp_path):
    parts = parts_from_ldm(sd1_model)
    calls = []
    encode = parts.condition
    parts.condition = lambda prompts, vectors=None: calls.append(1) or encode(prompts, vectors)
    request = {
        "network": {"name": "zqnet", "rank": 4},
        "data": {"data_dir": str(image_dir), "width": 64, "height": 64, "shuffle_tags": True},
        "train": {"steps": 3, "save_every": 0, "preview_every": 0},
    }
    lora.train_lora(lora.LoraConfig.from_dict(request), parts, lora.OutputPaths(tmp_path / "a", tmp_path / "la"))
    assert len(calls) == 3
    calls.clear()
    request["data"]["shuffle_tags"] = False
    request["network"]["train_text_encoder"] = True
    lora.train_lora(lora.LoraConfig.from_dict(request), parts, lora.OutputPaths(tmp_path / "b", tmp_path / "lb"))
    assert len(calls) == 3


def test_idle_modules_wait_elsewhere_and_come_back_for_previews_and_saves(sd1_model, image_dir, tmp_path, monkeypatch):
    """On CUDA the VAE and a cached text encoder leave the GPU; here the move is observed through ``.to``."""
    parts = parts_from_ldm(sd1_model)
    moves, seen = [], []
    for name in ("vae", "text_encoder"):
        module = parts.host_modules[name]
        monkeypatch.setattr(module, "to", lambda *a, _n=name, **k: moves.append((_n, str(a[0]))), raising=False)
    monkeypatch.setattr(train_module, "_offload_target", lambda parts, config: torch.device("meta"))

    class Hooks(TrainingHooks):
        def on_preview(self, step, trainable):
            seen.append(list(moves))

    request = {
        "network": {"name": "zqnet", "rank": 4},
        "data": {"data_dir": str(image_dir), "width": 64, "height": 64},
        "train": {"steps": 4, "save_every": 0, "preview_every": 2},
    }
    lora.train_lora(
        lora.LoraConfig.from_dict(request), parts, lora.OutputPaths(tmp_path / "L", tmp_path / "l"), Hooks()
    )
    away = [("vae", "meta"), ("text_encoder", "meta")]
    home = [("vae", "cpu"), ("text_encoder", "cpu")]
    assert seen[0] == away + home  # sent away, back for the preview at step 2
    assert moves == (away + home) * 4  # ... away again; back for the preview at step 4, the final save, the end


def test_compiled_unet_trains_the_same_and_reports_its_compile_time(sd1_model, image_dir, tmp_path, monkeypatch):
    """train.compile on CPU with the aot_eager backend (no C compiler): dynamo traces the real UNet with the LoRA
    wrappers and SDPA attention inside, and gives the eager run's losses and weights."""
    monkeypatch.setattr(compiled_module, "BACKEND", "aot_eager")
    parts = parts_from_ldm(sd1_model)
    statuses = []

    class Hooks(TrainingHooks):
        def on_status(self, text):
            statuses.append(text)

    results = []
    for compile_unet in (False, True):
        request = {
            "network": {"name": "zqnet", "rank": 4, "save_precision": "fp32"},
            "data": {"data_dir": str(image_dir), "width": 64, "height": 64},
            "train": {
                "steps": 3,
                "save_every": 0,
                "preview_every": 0,
                "compile": compile_unet,
                "learning_rate": "1e-3",
            },
        }
        paths = lora.OutputPaths(tmp_path / f"L{compile_unet}", tmp_path / f"l{compile_unet}")
        result = lora.train_lora(lora.LoraConfig.from_dict(request), parts, paths, Hooks())
        results.append(([r["loss"] for r in result.history], read_network(result.saved[-1])[0]))
    (loss_a, tensors_a), (loss_b, tensors_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert all(torch.allclose(tensors_a[k], tensors_b[k], atol=1e-6) for k in tensors_a)
    assert [s for s in statuses if "torch.compile" in s] == [statuses[-1]]  # one shape, compiled once
    assert "forward" not in parts.unet.__dict__


def test_full_bf16_lora_trains_from_fp32_masters_and_leaves_the_host_exact(sd1_model, image_dir, tmp_path):
    """The UNet is stored in bf16 for the run and put back bit-identically; the file and the resume state hold the
    fp32 masters (not their bf16 rounding), and the run learns like bf16 autocast does."""
    parts = parts_from_ldm(sd1_model)
    before = state_fingerprint(sd1_model)
    dtypes = {p.dtype for p in parts.unet.parameters()}
    seen = []

    class Hooks(TrainingHooks):
        def on_progress(self, progress):
            seen.append({p.dtype for p in parts.unet.parameters()})

    losses = {}
    for precision in ("bf16", "full_bf16"):
        request = {
            "network": {"name": "zqnet", "rank": 4, "save_precision": "fp32"},
            "data": {"data_dir": str(image_dir), "width": 64, "height": 64},
            "train": {"steps": 6, "save_every": 3, "preview_every": 0, "mixed_precision": precision},
        }
        paths = lora.OutputPaths(tmp_path / precision, tmp_path / f"log-{precision}")
        result = lora.train_lora(lora.LoraConfig.from_dict(request), parts, paths, Hooks())
        losses[precision] = [r["loss"] for r in result.history]
    assert torch.bfloat16 in seen[-1]  # full_bf16 steps ran on bf16 weights
    after = state_fingerprint(sd1_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {p.dtype for p in parts.unet.parameters()} == dtypes
    main = tmp_path / "full_bf16" / "zqnet.safetensors"
    tensors, masters = read_network(main)[0], read_sidecar(main).params
    assert any(m.dtype == torch.float32 and not torch.equal(m, m.bfloat16().float()) for m in masters)
    assert all(v.dtype == torch.float32 for v in tensors.values())
    assert sum(losses["full_bf16"]) == pytest.approx(sum(losses["bf16"]), rel=0.05)


def test_full_bf16_textual_inversion_trains_and_other_methods_refuse_it(sd1_model, image_dir, tmp_path):
    parts = parts_from_ldm(sd1_model)
    emb = {"name": "zqtoken", "init_text": "cat", "num_vectors": 2}
    train = {"steps": 3, "save_every": 0, "preview_every": 0, "mixed_precision": "full_bf16"}
    config = ti.TextualInversionConfig.from_dict(
        {"embedding": emb, "data": {"data_dir": str(image_dir)}, "train": train}
    )
    result = ti.train_embedding(config, parts, ti.OutputPaths(tmp_path / "e", tmp_path / "log"))
    assert result.step == 3
    vectors = read_embedding(result.saved[-1]).vectors
    assert vectors.dtype == torch.float32
    assert not torch.equal(vectors, vectors.bfloat16().float())  # the fp32 masters, not their bf16 rounding
    from lib_trainer.methods import hypernetwork as hn

    request = {"hypernetwork": {"name": "zqhn"}, "data": {"data_dir": str(image_dir)}, "train": train}
    with pytest.raises(ConfigError, match=r"full_bf16.*fp32") as info:
        hn.check(hn.HypernetworkConfig.from_dict(request), parts, hn.OutputPaths(tmp_path / "h", tmp_path / "hl"))
    assert info.value.field == "train.mixed_precision"
