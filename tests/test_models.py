"""The ldm adapter, the diffusion targets against ldm's own, and the freeze/restore guard."""

from __future__ import annotations

import types

import pytest
import torch

from lib_trainer.errors import UnsupportedModelError
from lib_trainer.models.diffusion import add_noise, target_for
from lib_trainer.models.guard import frozen_host
from lib_trainer.models.ldm import parts_from_ldm


def test_family_prediction_and_schedule(family, sd_model, parts):
    assert parts.family == family
    assert parts.prediction == ("eps" if family == "sd1" else "v")
    assert parts.alphas_cumprod.dtype == torch.float32
    assert parts.num_timesteps == 1000
    torch.testing.assert_close(parts.alphas_cumprod, sd_model.alphas_cumprod.float())


def test_prefers_the_webuis_unmodified_schedule(sd1_model):
    original = sd1_model.alphas_cumprod.clone()
    sd1_model.alphas_cumprod_original = original
    try:
        sd1_model.alphas_cumprod = original.half()  # what the WebUI's schedule override may leave
        assert torch.equal(parts_from_ldm(sd1_model).alphas_cumprod, original.float())
    finally:
        sd1_model.alphas_cumprod = original
        del sd1_model.alphas_cumprod_original


def test_noise_and_v_target_match_ldm(sd_model, parts):
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([3, 900])
    torch.testing.assert_close(add_noise(x0, noise, t, parts.alphas_cumprod), sd_model.q_sample(x0, t, noise))
    if parts.prediction == "v":
        torch.testing.assert_close(target_for("v", x0, noise, t, parts.alphas_cumprod), sd_model.get_v(x0, noise, t))


def test_latents_match_ldm_encoding(sd_model, parts):
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    mean, std = parts.latent_encoder.encode(images)
    with torch.no_grad():
        dist = sd_model.encode_first_stage(images)
    torch.testing.assert_close(mean * parts.latent_encoder.scale_factor, dist.mean * sd_model.scale_factor)
    torch.testing.assert_close(std, dist.std)


def test_sdxl_is_left_to_the_sgm_adapter():
    sdxl = types.SimpleNamespace(conditioner=object(), is_sdxl=True)
    with pytest.raises(UnsupportedModelError, match=r"SDXL.*parts_from_sgm"):
        parts_from_ldm(sdxl)


def test_inpainting_model_is_refused(sd1_model):
    sd1_model.model.conditioning_key = "hybrid"
    try:
        with pytest.raises(UnsupportedModelError, match="inpainting"):
            parts_from_ldm(sd1_model)
    finally:
        sd1_model.model.conditioning_key = "crossattn"


def test_frozen_host_restores_flags_modes_and_devices_even_on_error():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    net[0].bias.requires_grad_(False)
    net.train()
    seen = []

    def fail_inside():
        with frozen_host([net]):
            seen.append((net.training, any(p.requires_grad for p in net.parameters())))
            raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        fail_inside()
    assert seen == [(False, False)]
    assert net.training
    assert net[1].training
    assert net[0].weight.requires_grad
    assert not net[0].bias.requires_grad


class EmbeddingsWithFixesStandIn(torch.nn.Module):
    """The WebUI's hijack shape: the token embedding wrapped in a module whose ``.wrapped`` is the nn.Embedding."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, input_ids):
        return self.wrapped(input_ids)


class CustomWordsStandIn(torch.nn.Module):
    """The WebUI's ``FrozenCLIPEmbedderWithCustomWords`` shape: ``.wrapped`` is the ldm embedder."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped


def test_adapter_sees_through_the_webuis_wrappers(sd_model, family):
    embedder = sd_model.cond_stage_model
    holder = embedder.transformer.text_model.embeddings if family == "sd1" else embedder.model
    original = holder.token_embedding
    with torch.no_grad():
        expected = parts_from_ldm(sd_model).text_encoder.encode(["a photo of zq"], {"zq": torch.ones(2, 32)})
    holder.token_embedding = EmbeddingsWithFixesStandIn(original)
    sd_model.cond_stage_model = CustomWordsStandIn(embedder)
    try:
        parts = parts_from_ldm(sd_model)
        with torch.no_grad():
            got = parts.text_encoder.encode(["a photo of zq"], {"zq": torch.ones(2, 32)})
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert parts.host_modules["text_encoder"] is sd_model.cond_stage_model
        assert torch.equal(parts.text_encoder.token_vectors([320])[0], original.weight[320])
    finally:
        sd_model.cond_stage_model = embedder
        holder.token_embedding = original


def test_min_snr_weights(parts):
    from lib_trainer.models.diffusion import min_snr_weight

    t = torch.tensor([10, 500, 990])
    a = parts.alphas_cumprod[t]
    snr = a / (1 - a)
    eps = min_snr_weight(t, parts.alphas_cumprod, 5.0, "eps")
    torch.testing.assert_close(eps, torch.clamp(snr, max=5.0) / snr)
    assert eps[0] < 1
    assert eps[2] == 1
    torch.testing.assert_close(min_snr_weight(t, parts.alphas_cumprod, 5.0, "v"), torch.clamp(snr, max=5.0) / (snr + 1))


def test_noise_offset_changes_the_loss_deterministically(parts):
    from lib_trainer.models.diffusion import DiffusionObjective

    latents = torch.randn(2, 4, 8, 8)
    cond = parts.text_encoder.encode(["a", "b"]).detach()

    def run(offset):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return DiffusionObjective(noise_offset=offset).loss(parts, latents, cond, gen)

    assert torch.equal(run(0.0), run(0.0))
    assert not torch.equal(run(0.0), run(0.1))
