"""Hypernetworks in the WebUI's format on tiny real-class models."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lib_trainer.errors import ConfigError, TrainingError
from lib_trainer.loop.hooks import TrainingHooks
from lib_trainer.loop.train import train
from lib_trainer.methods.hypernetwork import (
    Hypernetwork,
    HypernetworkConfig,
    HypernetworkSpec,
    HypernetworkTrainable,
    OutputPaths,
    attention_widths,
    create_hypernetwork,
    train_hypernetwork,
)
from lib_trainer.models.diffusion import add_noise
from lib_trainer.models.guard import state_fingerprint
from lib_trainer.models.ldm import parts_from_ldm
from tests.support.hypernetwork_reference import load_pair
from tests.support.known_answer import FixedBatches, TeacherObjective

WEBUI_KEYS = {
    "step",
    "name",
    "layer_structure",
    "activation_func",
    "is_layer_norm",
    "weight_initialization",
    "sd_checkpoint",
    "sd_checkpoint_name",
    "activate_output",
    "use_dropout",
    "dropout_structure",
    "last_layer_dropout",
    "optional_info",
}


def spec(**kw) -> HypernetworkSpec:
    return HypernetworkSpec(**{"name": "zqhyper", "sizes": "32, 64", **kw})


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"activation": "relu"},
        {"activation": "swish", "layer_norm": True},
        {
            "activation": "mish",
            "activate_output": True,
            "use_dropout": True,
            "last_layer_dropout": True,
            "layer_structure": "1, 2, 2, 1",
        },
        {"activation": "softsign", "layer_norm": True, "dropout_structure": "0, 0.1, 0", "weight_init": "XavierNormal"},
        {"activation": "leakyrelu", "weight_init": "KaimingUniform", "layer_structure": "1, 1.5, 1"},
    ],
)
def test_saved_file_rebuilds_the_same_layout_and_outputs(sd1_model, tmp_path, options):
    parts = parts_from_ldm(sd1_model)
    path = create_hypernetwork(spec(**options), parts, tmp_path)
    assert not zipfile.is_zipfile(path), "legacy serialization, which the WebUI's safe unpickler accepts"
    ours = Hypernetwork.from_dict(torch.load(path, weights_only=True), path.name)
    ours.set_mode(False)
    x = torch.randn(3, 5, 32)
    k, v, data = load_pair(path, 32)
    assert set(data) - {32, 64} == WEBUI_KEYS
    assert [type(m) for m in k] == [type(m) for m in ours.layers[32][0].linear]
    torch.testing.assert_close(x + k(x), ours.layers[32][0](x), rtol=0, atol=0)
    torch.testing.assert_close(x + v(x), ours.layers[32][1](x), rtol=0, atol=0)
    copy = safetensors.torch.load_file(str(path.with_suffix(".safetensors")))
    assert torch.equal(copy["32.k.linear.0.weight"], data[32][0]["linear.0.weight"])


def test_sizes_are_the_models_attention_widths(sd1_model, sd2_model):
    assert attention_widths(parts_from_ldm(sd1_model)) == {32, 64}  # tiny: context 32, features 32 and 64
    assert attention_widths(parts_from_ldm(sd2_model)) == {32, 64}


def test_attach_detach_and_multiplier_zero(sd1_model):
    parts = parts_from_ldm(sd1_model)
    net = Hypernetwork.create(spec(weight_init="XavierNormal"))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    cond = parts.text_encoder.encode(["a cat", "a dog"]).detach()
    before = state_fingerprint(sd1_model)
    with torch.no_grad():
        base = parts.apply_model(x, t, cond)
        net.set_mode(False, multiplier=1.0)
        with net.attached(parts.unet):
            changed = parts.apply_model(x, t, cond)
        net.set_mode(False, multiplier=0.0)
        with net.attached(parts.unet):
            zero = parts.apply_model(x, t, cond)
    assert not torch.equal(base, changed)
    torch.testing.assert_close(zero, base, rtol=0, atol=0)
    assert all(len(m._forward_pre_hooks) == 0 for m in sd1_model.modules())
    after = state_fingerprint(sd1_model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_learns_a_hidden_hypernetwork(sd1_model, tmp_path):
    parts = parts_from_ldm(sd1_model)
    prompts = ["a photo of a cat", "red, blue"]
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([300, 600])
    x_t = add_noise(x0, torch.randn(2, 4, 8, 8, generator=gen), t, parts.alphas_cumprod)
    hidden = Hypernetwork.create(spec(weight_init="XavierNormal"), seed=3)  # the known answer
    hidden.set_mode(False)
    with hidden.attached(parts.unet), torch.no_grad():
        target = parts.apply_model(x_t, t, parts.text_encoder.encode(prompts)).float()
    objective = TeacherObjective(x_t, t, target)
    config = HypernetworkConfig.from_dict(
        {
            "hypernetwork": {"name": "zqhyper", "sizes": "32, 64"},
            "data": {"data_dir": str(tmp_path)},
            "train": {
                "steps": 200,
                "learning_rate": "3e-3",
                "lr_schedule": "cosine",
                "save_every": 0,
                "preview_every": 0,
            },
        }
    )
    trainable = HypernetworkTrainable(
        config, parts, OutputPaths(tmp_path / "hn", tmp_path / "log"), Hypernetwork.create(config.hypernetwork), 0
    )
    trainable.save = lambda step, resume: []

    def loss_now():
        trainable.net.set_mode(False)
        with trainable.net.attached(parts.unet), torch.no_grad():
            return objective.loss(parts, x0, parts.text_encoder.encode(prompts), None).mean().item()

    before = loss_now()
    train(parts, trainable, FixedBatches(x0, prompts), objective, config.train)
    after = loss_now()
    print(f"hypernetwork: loss {before:.3e} -> {after:.3e} ({before / after:.0f}x) in 200 steps")
    assert before / after >= 10


def hn_request(data: Path, **train) -> dict:
    return {
        "hypernetwork": {"name": "zqhyper", "sizes": "32, 64", "activation": "relu"},
        "data": {"data_dir": str(data), "width": 64, "height": 64, "template": "hypernetwork"},
        "train": {"steps": 4, "save_every": 2, "preview_every": 0, **train},
    }


class Warnings(TrainingHooks):
    def __init__(self):
        self.messages = []

    def on_warning(self, message):
        self.messages.append(message)


def test_training_writes_webui_files_resumes_and_warns(sd1_model, image_dir, tmp_path):
    parts = parts_from_ldm(sd1_model)
    paths = OutputPaths(tmp_path / "hypernetworks", tmp_path / "logs")
    before = state_fingerprint(sd1_model)
    hooks = Warnings()
    result = train_hypernetwork(
        HypernetworkConfig.from_dict(hn_request(image_dir, learning_rate="5e-4")), parts, paths, hooks
    )
    assert result.step == 4
    assert "above 0.0001" in hooks.messages[0]
    main = paths.hypernetwork_dir / "zqhyper.pt"
    data = torch.load(main, weights_only=True)
    assert data["step"] == 4
    assert data["activation_func"] == "relu"
    assert set(data) - {32, 64} == WEBUI_KEYS
    assert sorted(p.name for p in paths.hypernetwork_dir.iterdir()) == [
        "zqhyper.pt",
        "zqhyper.pt.trainer-state",
        "zqhyper.safetensors",
    ]
    assert (paths.log_dir / "zqhyper" / "hypernetworks" / "zqhyper-2.pt").is_file()
    after = state_fingerprint(sd1_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = train_hypernetwork(HypernetworkConfig.from_dict(hn_request(image_dir, steps=6)), parts, paths)
    assert again.start_step == 4
    assert again.step == 6


def test_divergence_stops_and_keeps_the_last_good_save(sd1_model, image_dir, tmp_path):
    class ExplodeAfter:
        calls = 0

        def loss(self, parts, latents, cond, generator):
            ExplodeAfter.calls += 1
            value = float("inf") if ExplodeAfter.calls > 3 else 1.0
            t = torch.zeros(latents.shape[0], dtype=torch.long)
            pred = parts.apply_model(latents, t, cond).float()  # goes through the hooked attention layers
            return pred.mean(dim=(1, 2, 3)) * 0 + value

    paths = OutputPaths(tmp_path / "hypernetworks", tmp_path / "logs")
    with pytest.raises(TrainingError, match=r"Lower train\.learning_rate"):
        train_hypernetwork(
            HypernetworkConfig.from_dict(hn_request(image_dir, steps=10)),
            parts_from_ldm(sd1_model),
            paths,
            objective=ExplodeAfter(),
        )
    data = torch.load(paths.hypernetwork_dir / "zqhyper.pt", weights_only=True)
    assert data["step"] == 3
    assert all(torch.isfinite(t).all() for pair in (data[32], data[64]) for s in pair for t in s.values())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layer_structure": "2, 2, 1"}, "must start and end with 1"),
        ({"layer_structure": "1, 2, 3"}, "must start and end with 1"),
        ({"activation": "sparkle"}, "activation 'sparkle' is unknown"),
        ({"dropout_structure": "0, 0.1"}, "has 2 values but the layer structure has 3"),
        ({"dropout_structure": "0, 1.5, 0"}, r"probabilities in \[0, 1\)"),
        ({"sizes": "768, x"}, "comma-separated list of numbers"),
        ({"name": "a\\b"}, "contains"),
    ],
)
def test_bad_hypernetwork_settings(options, message):
    with pytest.raises(ConfigError, match=message):
        spec(**options)


def test_size_not_in_the_model_is_refused_before_writing(sd1_model, image_dir, tmp_path):
    paths = OutputPaths(tmp_path / "hypernetworks", tmp_path / "logs")
    request = hn_request(image_dir)
    request["hypernetwork"]["sizes"] = "768, 320"
    with pytest.raises(ConfigError, match=r"\[768, 320\] do not occur.*has 32, 64"):
        train_hypernetwork(HypernetworkConfig.from_dict(request), parts_from_ldm(sd1_model), paths)
    assert not paths.hypernetwork_dir.exists()
    assert not paths.log_dir.exists()
