"""LoRA / LyCORIS on tiny real-class models: exact restore, multiplier 0, save/load, kohya names, learning."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lib_trainer.errors import ConfigError, TrainerError
from lib_trainer.formats.lora import read_network, save_network
from lib_trainer.loop.train import train
from lib_trainer.methods.lora import (
    LoraConfig,
    NetworkConfig,
    NetworkTrainable,
    OutputPaths,
    attached,
    build_network,
    load_network_tensors,
    network_tensors,
    train_lora,
)
from lib_trainer.methods.lora import check as lora_check
from lib_trainer.models.diffusion import add_noise
from lib_trainer.models.guard import state_fingerprint
from lib_trainer.models.kohya_names import module_key_table, unet_key_table
from lib_trainer.models.ldm import parts_from_ldm
from tests.support.known_answer import FixedBatches, TeacherObjective
from tests.support.kohya_reference import count_kohya_targets, kohya_unet_names, merge_into
from tests.support.models import build_model

ALGOS = [("lora", 0), ("locon", 4), ("loha", 4), ("lokr", 4)]


def network_config(algo: str, conv: int, te: bool = True, **extra) -> NetworkConfig:
    return NetworkConfig(
        name="zqnet", algo=algo, rank=4, alpha=2.0, conv_rank=conv, conv_alpha=1.0, train_text_encoder=te, **extra
    )


def randomize(network, seed: int = 0, scale: float = 0.05) -> None:
    """Give every network tensor (incl. the zero-initialised up factors) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            for _name, param in lora.named_parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def sample_inputs(parts, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([100, 800])
    return x, t


def model_output(parts, x, t, prompts=("a photo of a cat", "red, blue")):
    with torch.no_grad():
        return parts.apply_model(x, t, parts.text_encoder.encode(list(prompts)))


@pytest.mark.parametrize(("algo", "conv"), ALGOS)
def test_attach_detach_restores_the_model_exactly(sd1_model, algo, conv):
    parts = parts_from_ldm(sd1_model)
    before = state_fingerprint(sd1_model)
    network = build_network(network_config(algo, conv), parts)
    randomize(network)
    x, t = sample_inputs(parts)
    base = model_output(parts, x, t)
    with attached(network):
        changed = model_output(parts, x, t)
    assert not torch.equal(base, changed)
    after = state_fingerprint(sd1_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("forward" in m.__dict__ or "_lycoris_wrappers" in m.__dict__ for m in sd1_model.modules())
    torch.testing.assert_close(model_output(parts, x, t), base, rtol=0, atol=0)


@pytest.mark.parametrize(("algo", "conv"), ALGOS)
def test_multiplier_zero_equals_the_base_model(sd1_model, algo, conv):
    parts = parts_from_ldm(sd1_model)
    network = build_network(network_config(algo, conv), parts)
    randomize(network)
    x, t = sample_inputs(parts)
    base = model_output(parts, x, t)
    network.set_multiplier(0.0)
    network.eval()
    with attached(network):
        zero = model_output(parts, x, t)
    torch.testing.assert_close(zero, base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("algo", "conv"), ALGOS)
def test_saved_file_reloads_and_means_what_was_trained(sd1_model, algo, conv, tmp_path):
    parts = parts_from_ldm(sd1_model)
    network = build_network(network_config(algo, conv), parts)
    randomize(network)
    network.eval()
    x, t = sample_inputs(parts)
    with attached(network):
        trained = model_output(parts, x, t)
    path = save_network(
        tmp_path / "zqnet.safetensors", network_tensors(network, parts), {"ss_output_name": "zqnet"}, "fp32"
    )
    tensors, meta = read_network(path)
    assert meta["sshs_model_hash"]
    assert meta["ss_output_name"] == "zqnet"

    fresh = build_network(network_config(algo, conv), parts)
    load_network_tensors(fresh, parts, tensors, path.name)
    fresh.eval()
    with attached(fresh):
        reloaded = model_output(parts, x, t)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=0)

    # an independent reader written from the format spec merges the deltas into the weights: same outputs
    merged_model = copy.deepcopy(sd1_model)
    merged = parts_from_ldm(merged_model)
    modules = {
        **{f"unet.{k}": v for k, v in merged.unet.named_modules()},
        **{f"te.{k}": v for k, v in merged.text_encoder.lora_roots()[0].named_modules()},
    }
    names = {k: f"unet.{v}" for k, v in kohya_unet_names(merged.unet, 1).items()}
    names.update({k: f"te.{v}" for k, v in module_key_table(merged.text_encoder.lora_roots()[0], "lora_te_").items()})
    assert merge_into(modules, tensors, names) == []
    torch.testing.assert_close(model_output(merged, x, t), trained, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def layout_parts(tmp_path_factory):
    """A tiny-width model with the real SD1 block layout (4 levels, 2 res blocks, attention on levels 0-2)."""
    return parts_from_ldm(build_model("sd1", "layout", tmp_path_factory.mktemp("layout")))


@pytest.mark.parametrize(("algo", "conv", "expected_unet"), [("lora", 0, 192), ("locon", 4, 192 + 86)])
def test_keys_are_kohya_diffusers_names_of_real_modules(layout_parts, algo, conv, expected_unet):
    parts = layout_parts
    network = build_network(network_config(algo, conv), parts)
    keys = {k.split(".")[0] for k in network_tensors(network, parts)}
    unet_keys = {k for k in keys if k.startswith("lora_unet_")}
    valid = kohya_unet_names(parts.unet, 2)  # docs/formats.md 4.1 rules applied to the real module list
    assert unet_keys <= set(valid), sorted(unet_keys - set(valid))[:5]
    assert len(unet_keys) == count_kohya_targets(parts.unet, conv=bool(conv)) == expected_unet
    te_keys = keys - unet_keys
    assert len(te_keys) == 6 * 3  # 3 tiny CLIP layers x (q, k, v, out, fc1, fc2)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te_keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet_keys
    assert len(unet_key_table(parts.unet)) > len(unet_keys)


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "lr"), [("lora", "3e-3"), ("loha", "3e-3")])
def test_learns_a_hidden_low_rank_change(sd1_model, tmp_path, algo, lr):
    parts = parts_from_ldm(sd1_model)
    prompts = ["a photo of a cat", "red, blue"]
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    x_t = add_noise(x0, torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([300, 600]), parts.alphas_cumprod)
    t = torch.tensor([300, 600])
    hidden = build_network(NetworkConfig(name="hidden", rank=2, alpha=2.0), parts)  # the known answer
    randomize(hidden, seed=11, scale=0.3)
    hidden.eval()
    with attached(hidden), torch.no_grad():
        target = parts.apply_model(x_t, t, parts.text_encoder.encode(prompts)).float()
    objective = TeacherObjective(x_t, t, target)

    config = LoraConfig.from_dict(
        {
            "network": {"name": "zqnet", "algo": algo, "rank": 4, "alpha": 4.0},
            "data": {"data_dir": str(tmp_path)},
            "train": {"steps": 200, "learning_rate": lr, "lr_schedule": "cosine", "save_every": 0, "preview_every": 0},
        }
    )
    trainable = NetworkTrainable(config, parts, OutputPaths(tmp_path / "Lora", tmp_path / "log"), [])
    trainable.save = lambda step, resume: []

    def loss_now():
        trainable.network.eval()
        with attached(trainable.network), torch.no_grad():
            return objective.loss(parts, x0, parts.text_encoder.encode(prompts), None).mean().item()

    before = loss_now()
    train(parts, trainable, FixedBatches(x0, prompts), objective, config.train)
    after = loss_now()
    print(f"{algo}: loss {before:.3e} -> {after:.3e} ({before / after:.0f}x) in 200 steps")
    assert before / after >= 20


def lora_request(data: Path, **network) -> dict:
    return {
        "network": {"name": "zqnet", "rank": 4, "alpha": 2.0, **network},
        "data": {"data_dir": str(data), "width": 64, "height": 64, "template": "none"},
        "train": {"steps": 4, "save_every": 2, "preview_every": 0, "learning_rate": "1e-3"},
    }


def test_training_writes_a_kohya_file_with_metadata_and_resumes(sd1_model, image_dir, tmp_path):
    parts = parts_from_ldm(sd1_model)
    paths = OutputPaths(tmp_path / "Lora", tmp_path / "log")
    before = state_fingerprint(sd1_model)
    result = train_lora(LoraConfig.from_dict(lora_request(image_dir, train_text_encoder=True)), parts, paths)
    assert result.step == 4
    main = paths.lora_dir / "zqnet.safetensors"
    tensors, meta = read_network(main)
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    for key in (
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_args",
        "ss_base_model_version",
        "ss_v2",
        "ss_output_name",
        "ss_tag_frequency",
        "ss_dataset_dirs",
        "sshs_model_hash",
        "modelspec.architecture",
        "trainer_config",
    ):
        assert key in meta, key
    assert meta["ss_output_name"] == "zqnet"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_steps"] == "4"
    assert sorted(p.name for p in (paths.log_dir / "zqnet" / "lora").iterdir()) == [
        "zqnet-000002.safetensors",
        "zqnet-000004.safetensors",
    ]
    after = state_fingerprint(sd1_model)
    assert all(torch.equal(before[k], after[k]) for k in before)

    request = lora_request(image_dir, train_text_encoder=True, overwrite=True)
    request["train"]["steps"] = 6
    resumed = train_lora(LoraConfig.from_dict({**request, "resume_from": str(main)}), parts, paths)
    assert resumed.start_step == 4
    assert resumed.step == 6
    assert set(read_network(main)[0]) == set(tensors)


def test_epochs_set_the_step_count(sd1_model, image_dir, tmp_path):
    request = lora_request(image_dir)
    request.update({"epochs": 2, "save_every_epochs": 1})
    request["train"]["batch_size"] = 2
    result = train_lora(
        LoraConfig.from_dict(request), parts_from_ldm(sd1_model), OutputPaths(tmp_path / "Lora", tmp_path / "log")
    )
    assert result.step == 4  # 4 images / batch 2 = 2 steps per epoch
    assert [s.name for s in sorted((tmp_path / "log" / "zqnet" / "lora").iterdir())] == [
        "zqnet-000002.safetensors",
        "zqnet-000004.safetensors",
    ]


@pytest.mark.parametrize(
    ("network", "message"),
    [
        ({"rank": 0}, r"network\.rank must be between 1"),
        ({"alpha": -1.0}, r"network\.alpha must be between 0"),
        ({"algo": "dora"}, r"network\.algo must be one of"),
        ({"algo": "lora", "conv_rank": 4}, "needs algo 'locon'"),
        ({"train_unet": False}, "nothing would train"),
        ({"name": "none"}, "reserved"),
        ({"name": "a/b"}, "contains '/'"),
    ],
)
def test_bad_network_settings(network, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        LoraConfig.from_dict(lora_request(tmp_path, **network))


def test_sd2_text_encoder_lora_writes_q_k_v_and_out_of_each_fused_attention(sd2_model, image_dir, tmp_path):
    paths = OutputPaths(tmp_path / "Lora", tmp_path / "log")
    parts = parts_from_ldm(sd2_model)
    before = state_fingerprint(sd2_model)
    train_lora(LoraConfig.from_dict(lora_request(image_dir, train_text_encoder=True)), parts, paths)
    tensors, _ = read_network(paths.lora_dir / "zqnet.safetensors")
    te = {k.partition(".")[0] for k in tensors if k.startswith("lora_te_")}
    layers = len(sd2_model.cond_stage_model.model.transformer.resblocks) - 1  # penultimate: the last is unused
    kinds = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
    assert te == {f"lora_te_text_model_encoder_layers_{i}_{k}" for i in range(layers) for k in kinds}
    after = state_fingerprint(sd2_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("forward" in m.__dict__ for m in sd2_model.modules())


def test_sd2_unet_lora_saves_v2_metadata(sd2_model, image_dir, tmp_path):
    paths = OutputPaths(tmp_path / "Lora", tmp_path / "log")
    train_lora(LoraConfig.from_dict(lora_request(image_dir)), parts_from_ldm(sd2_model), paths)
    tensors, meta = read_network(paths.lora_dir / "zqnet.safetensors")
    assert meta["ss_v2"] == "True"
    assert meta["ss_base_model_version"] == "sd_v2_v"
    assert all(k.startswith("lora_unet_") for k in tensors)


def test_name_collision_is_refused_unless_overwrite(sd1_model, image_dir, tmp_path):
    paths = OutputPaths(tmp_path / "Lora", tmp_path / "log")
    paths.lora_dir.mkdir()
    (paths.lora_dir / "zqnet.safetensors").write_bytes(b"user file")
    with pytest.raises(TrainerError, match="already exists"):
        train_lora(LoraConfig.from_dict(lora_request(image_dir)), parts_from_ldm(sd1_model), paths)
    assert (paths.lora_dir / "zqnet.safetensors").read_bytes() == b"user file"
    assert not paths.log_dir.exists()


def test_text_encoder_stops_training_at_its_step_and_has_its_own_rate(sd1_model, image_dir, tmp_path):
    from lib_trainer.loop.hooks import TrainingHooks

    parts = parts_from_ldm(sd1_model)
    request = lora_request(image_dir, train_text_encoder=True, stop_text_encoder_at=2, text_encoder_lr=5e-4)
    config = LoraConfig.from_dict(request)
    trainable = NetworkTrainable(config, parts, OutputPaths(tmp_path / "Lora", tmp_path / "log"), [])
    groups = trainable.param_groups()
    assert [g["lr_scale"] for g in groups] == [1.0, 0.5]
    assert groups[1]["stop_at"] == 2

    snapshots = {}

    class Snap(TrainingHooks):
        def on_preview(self, step, state):  # called every step with the trainable (preview_every=1)
            net = state.network
            snapshots[step] = (
                [p.detach().clone() for lora in net.text_encoder_loras for p in lora.parameters()],
                [p.detach().clone() for lora in net.unet_loras for p in lora.parameters()],
            )

    config = LoraConfig.from_dict({**request, "train": {**request["train"], "preview_every": 1}})
    train_lora(config, parts, OutputPaths(tmp_path / "Lora", tmp_path / "log"), Snap())
    te2, unet2 = snapshots[2]
    te4, unet4 = snapshots[4]
    assert all(torch.equal(a, b) for a, b in zip(te2, te4, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(unet2, unet4, strict=True))


def test_training_with_buckets_and_repeats(sd1_model, tmp_path):
    from tests.test_dataset import write

    data = tmp_path / "data"
    write(data / "wide.png", (128, 64), "wide")
    write(data / "2_sks" / "tall.png", (64, 128), "tall")
    write(data / "2_sks" / "tall2.png", (60, 130))
    request = lora_request(data)
    request["data"].update(
        {"width": 128, "height": 64, "buckets": True, "bucket_min_side": 64, "bucket_max_side": 128, "flip": True}
    )
    request["train"]["batch_size"] = 2
    paths = OutputPaths(tmp_path / "Lora", tmp_path / "log")
    result = train_lora(LoraConfig.from_dict(request), parts_from_ldm(sd1_model), paths)
    assert result.step == 4
    meta = read_network(paths.lora_dir / "zqnet.safetensors")[1]
    import json

    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert sorted(tuple(b["resolution"]) for b in buckets.values()) == [(64, 128), (128, 64)]
    assert json.loads(meta["ss_dataset_dirs"]) == {
        "data": {"n_repeats": 1, "img_count": 1},
        "2_sks": {"n_repeats": 2, "img_count": 2},
    }
    assert meta["ss_num_train_images"] == "5"


def test_training_with_masks_regularisation_and_disk_cache(sd1_model, tmp_path):
    import numpy as np
    from PIL import Image

    from tests.test_dataset import write

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        rgba = (np.random.default_rng(i).random((64, 64, 4)) * 255).astype("uint8")
        Image.fromarray(rgba, "RGBA").save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("thing")
    write(tmp_path / "reg" / "2_object" / "r.png", (64, 64))
    request = lora_request(data)
    request["data"].update(
        {"alpha_mask": True, "reg_dir": str(tmp_path / "reg"), "prior_loss_weight": 0.3, "latent_cache": "disk"}
    )
    paths = OutputPaths(tmp_path / "Lora", tmp_path / "log")
    parts = parts_from_ldm(sd1_model)
    assert train_lora(LoraConfig.from_dict(request), parts, paths).step == 4
    cached = sorted((paths.log_dir / "latent-cache").iterdir())
    assert len(cached) == 3
    request["network"]["overwrite"] = True
    train_lora(LoraConfig.from_dict(request), parts, paths)
    assert sorted((paths.log_dir / "latent-cache").iterdir()) == cached


@pytest.mark.parametrize("text_encoder", [False, True])
def test_gradient_checkpointing_trains_the_same_network(sd1_model, image_dir, tmp_path, text_encoder):
    """train.gradient_checkpointing (UNet blocks, and text-encoder layers when they train) changes memory, not
    results: the same weights after a few steps, and no block keeps a wrapped forward."""
    parts = parts_from_ldm(sd1_model)
    results = []
    for checkpointing in (False, True):
        request = lora_request(image_dir, train_text_encoder=text_encoder, save_precision="fp32")
        request["train"] |= {"gradient_checkpointing": checkpointing, "save_every": 0}
        config = LoraConfig.from_dict(request)
        result = train_lora(config, parts, OutputPaths(tmp_path / f"L{checkpointing}", tmp_path / f"g{checkpointing}"))
        results.append(([r["loss"] for r in result.history], read_network(result.saved[-1])[0]))
    (loss_a, tensors_a), (loss_b, tensors_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert all(torch.allclose(tensors_a[k], tensors_b[k], atol=1e-6) for k in tensors_a)
    assert not any("forward" in m.__dict__ for m in sd1_model.modules())


def test_adafactor_trains_and_is_named_in_the_metadata(sd1_model, image_dir, tmp_path):
    parts = parts_from_ldm(sd1_model)
    request = lora_request(image_dir, save_precision="fp32")
    request["train"] |= {"optimizer": "adafactor", "lr_schedule": "cosine_with_restarts", "lr_cycles": 2}
    result = train_lora(LoraConfig.from_dict(request), parts, OutputPaths(tmp_path / "Lora", tmp_path / "log"))
    tensors, meta = read_network(result.saved[-1])
    assert (meta["ss_optimizer"], meta["ss_lr_scheduler"]) == (
        "transformers.optimization.Adafactor",
        "cosine_with_restarts",
    )
    assert any(bool(v.any()) for k, v in tensors.items() if "lora_up" in k)  # up factors start at 0: it trained
    request["train"]["optimizer"] = "adamw8bit"
    request["network"]["overwrite"] = True
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        train_lora(LoraConfig.from_dict(request), parts, OutputPaths(tmp_path / "Lora", tmp_path / "log"))


def test_sgd_with_optimizer_args_trains_and_bad_args_are_refused_by_field(sd1_model, image_dir, tmp_path):
    parts = parts_from_ldm(sd1_model)
    request = lora_request(image_dir, save_precision="fp32")
    request["train"] |= {"optimizer": "sgd", "optimizer_args": "momentum=0.5 nesterov=True", "learning_rate": "0.5"}
    result = train_lora(LoraConfig.from_dict(request), parts, OutputPaths(tmp_path / "Lora", tmp_path / "log"))
    tensors, meta = read_network(result.saved[-1])
    assert meta["ss_optimizer"] == "torch.optim.SGD"
    assert any(bool(v.any()) for k, v in tensors.items() if "lora_up" in k)
    for args, message in [("momentum", "not key=value"), ("momentum=abc", "not a number"), ("nope=1", "nope")]:
        request["train"]["optimizer_args"] = args
        with pytest.raises(ConfigError, match=message) as info:
            lora_check(LoraConfig.from_dict(request), parts, OutputPaths(tmp_path / "Lora2", tmp_path / "log2"))
        assert info.value.field == "train.optimizer_args"


def test_resuming_with_another_optimizer_is_refused_by_field(sd1_model, image_dir, tmp_path):
    parts = parts_from_ldm(sd1_model)
    paths = OutputPaths(tmp_path / "Lora", tmp_path / "log")
    request = lora_request(image_dir)
    first = train_lora(LoraConfig.from_dict(request), parts, paths)
    request["train"] |= {"optimizer": "sgd", "steps": 6}
    with pytest.raises(ConfigError, match="another optimizer") as info:
        train_lora(LoraConfig.from_dict({**request, "resume_from": str(first.saved[-1])}), parts, paths)
    assert info.value.field == "train.optimizer"
