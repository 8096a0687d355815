"""Speed and memory options (issue 12): SDPA attention for training, cached text-encoder outputs, models moved
off the GPU while idle, the VRAM preflight and the out-of-memory path, torch.compile, full bf16."""

from __future__ import annotations

import pytest
import torch

from lib_trainer.formats.embedding import EmbeddingFile
from lib_trainer.methods import lora
from lib_trainer.methods import textual_inversion as ti
from lib_trainer.models.attention import cross_attentions, sdpa_attention
from lib_trainer.models.diffusion import DiffusionObjective
from lib_trainer.models.guard import frozen_host
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
