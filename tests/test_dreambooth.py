"""DreamBooth on tiny real models: it learns, prior preservation holds the class, the checkpoint is complete and
loads, class images come from the host, and the host model is put back exactly however the run ends."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image

from lib_trainer.errors import ConfigError, DatasetError, TrainingError
from lib_trainer.formats.model_file import checkpoint_tensors
from lib_trainer.loop.hooks import TrainingHooks
from lib_trainer.loop.train import train
from lib_trainer.methods import dreambooth as db
from lib_trainer.models.checkpointing import checkpointed, unet_blocks
from lib_trainer.models.diffusion import add_noise
from lib_trainer.models.guard import state_fingerprint
from lib_trainer.models.ldm import parts_from_ldm
from lib_trainer.models.sgm import is_sgm, parts_from_sgm
from tests.conftest import write_images
from tests.support.known_answer import FixedBatches, TeacherObjective
from tests.support.models import build_model


class Hooks(TrainingHooks):
    """Renders flat class images (counting them) and records warnings and what was in place at each save."""

    def __init__(self, parts=None, probe=None):
        self.rendered, self.warnings, self.at_save, self.parts, self.probe = [], [], [], parts, probe

    def generate_images(self, settings):
        self.rendered.append(settings)
        return [Image.new("RGB", (settings["width"], settings["height"]), "gray")]

    def on_warning(self, message):
        self.warnings.append(message)

    def on_saved(self, path, step):
        if self.probe is not None and path.suffix == ".safetensors" and "Stable" in str(path.parent.name):
            with torch.no_grad():
                self.at_save.append(self.probe())


def job(root: Path, concepts: list[dict], **dreambooth) -> dict:
    return {
        "dreambooth": {"name": "zqdb", **dreambooth},
        "concepts": concepts,
        "data": {"width": 64, "height": 64},
        "train": {"steps": 4, "learning_rate": "1e-4", "save_every": 0, "preview_every": 0},
    }


def out_paths(root: Path) -> db.OutputPaths:
    return db.OutputPaths(root / "Stable-diffusion", root / "Lora", root / "logs")


def host_state(model):
    """Weights (bit for bit, with dtype), requires_grad, grads and instance forwards of every module."""
    state = state_fingerprint(model)
    return (
        {k: (v.dtype, v) for k, v in state.items()},
        [(p.requires_grad, p.grad is None) for p in model.parameters()],
        [("forward" in m.__dict__) for m in model.modules()],
    )


def same_state(a, b) -> bool:
    weights_a, flags_a, fwd_a = a
    weights_b, flags_b, fwd_b = b
    same = weights_a.keys() == weights_b.keys() and all(
        weights_a[k][0] == weights_b[k][0] and torch.equal(weights_a[k][1], weights_b[k][1]) for k in weights_a
    )
    return same and flags_a == flags_b and fwd_a == fwd_b


def probe_inputs(parts, seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([200, 700])
    return add_noise(x0, torch.randn(2, 4, 8, 8, generator=gen), t, parts.alphas_cumprod), t


def test_two_concepts_with_generated_class_images_save_a_full_checkpoint(sd1_model, tmp_path):
    parts = parts_from_ldm(sd1_model)
    a, b = write_images(tmp_path / "a"), write_images(tmp_path / "b", 3)
    concepts = [
        {"instance_dir": str(a), "instance_prompt": "photo of zkw person", "class_prompt": "photo of a person"}
        | {"class_dir": str(tmp_path / "cls"), "class_images": 3, "prior_loss_weight": 0.5},
        {"instance_dir": str(b), "instance_prompt": "[filewords], zqstyle"},
    ]
    config = db.DreamBoothConfig.from_dict(job(tmp_path, concepts, extract_lora_rank=4))
    x_t, t = probe_inputs(parts)
    cond = parts.text_encoder.encode(["photo of zkw person", "red"])
    hooks = Hooks(parts, lambda: parts.apply_model(x_t, t, cond).clone())
    before = host_state(sd1_model)
    result = db.train_dreambooth(config, parts, out_paths(tmp_path), hooks)
    assert same_state(before, host_state(sd1_model))  # the loaded model is exactly as it was

    assert [r["prompt"] for r in hooks.rendered] == ["photo of a person"] * 3
    assert [r["seed"] for r in hooks.rendered] == [0, 1, 2]
    generated = sorted(p.name for p in (tmp_path / "cls").iterdir())
    assert generated == [f"class-0000{i}.{ext}" for i in range(3) for ext in ("png", "txt")]
    assert (tmp_path / "cls" / "class-00000.txt").read_text() == "photo of a person"
    parts_logged = [h for h in result.history if "loss_prior" in h]
    assert parts_logged
    assert all(h["loss"] == pytest.approx(h["loss_instance"] + h["loss_prior"]) for h in parts_logged)

    ckpt = tmp_path / "Stable-diffusion" / "zqdb.safetensors"
    with safetensors.safe_open(str(ckpt), framework="pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    assert keys == set(checkpoint_tensors(sd1_model))
    assert (meta["trainer_method"], meta["ss_num_reg_images"]) == ("dreambooth", "3")
    assert db.DreamBoothConfig.from_dict(json.loads(meta["trainer_config"])) == config  # no epochs: as submitted
    lora = tmp_path / "Lora" / "zqdb.safetensors"
    assert any(k.startswith("lora_unet_") for k in safetensors.torch.load_file(str(lora)))

    # a second run reuses the class images
    again = db.DreamBoothConfig.from_dict(job(tmp_path, concepts, overwrite=True))
    hooks2 = Hooks()
    db.train_dreambooth(again, parts, out_paths(tmp_path), hooks2)
    assert hooks2.rendered == []


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_checkpoint_loads_into_a_fresh_model_and_gives_the_trained_outputs(sd1_model, tmp_path, precision):
    parts = parts_from_ldm(sd1_model)
    data = write_images(tmp_path / "a")
    config = db.DreamBoothConfig.from_dict(
        job(tmp_path, [{"instance_dir": str(data), "instance_prompt": "zkw"}], save_precision=precision)
    )
    x_t, t = probe_inputs(parts)
    cond = parts.text_encoder.encode(["zkw"])
    hooks = Hooks(parts, lambda: parts.apply_model(x_t, t, cond.expand(2, -1, -1)).clone())
    db.train_dreambooth(config, parts, out_paths(tmp_path), hooks)
    trained = hooks.at_save[-1]
    with torch.no_grad():
        base = parts.apply_model(x_t, t, cond.expand(2, -1, -1))
    assert not torch.equal(trained, base)  # it did train

    tensors = safetensors.torch.load_file(str(tmp_path / "Stable-diffusion" / "zqdb.safetensors"))
    floats = {v.dtype for v in tensors.values() if v.is_floating_point()}
    assert floats == {torch.float32 if precision == "fp32" else torch.float16}
    fresh = build_model("sd1", "tiny", tmp_path / "fresh", seed=9)
    fresh.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, strict=True)
    fresh_parts = parts_from_ldm(fresh)
    with torch.no_grad():
        again = fresh_parts.apply_model(x_t, t, fresh_parts.text_encoder.encode(["zkw"]).expand(2, -1, -1))
    tolerance = 0 if precision == "fp32" else 1e-2
    assert torch.allclose(again, trained, atol=tolerance, rtol=tolerance)


def test_checkpoint_has_the_loaded_files_keys_and_its_yaml(sd1_model, tmp_path):
    parts = parts_from_ldm(sd1_model)
    source = tmp_path / "Stable-diffusion" / "base.safetensors"
    source.parent.mkdir()
    state = {k: v.clone().contiguous() for k, v in checkpoint_tensors(sd1_model).items()}
    state["model_ema.decay"] = torch.tensor(0.999)  # EMA of a training checkpoint: not in the loaded model
    state["v_pred"] = torch.tensor([])  # a marker tensor the model object does not hold
    del state["alphas_cumprod_prev"]  # a file without a buffer the model has
    safetensors.torch.save_file(state, str(source))
    source.with_suffix(".yaml").write_text("model: {}\n")
    parts.checkpoint_file = str(source)
    data = write_images(tmp_path / "a")
    config = db.DreamBoothConfig.from_dict(job(tmp_path, [{"instance_dir": str(data)}], save_precision="bf16"))
    db.train_dreambooth(config, parts, out_paths(tmp_path), Hooks())
    written = safetensors.torch.load_file(str(tmp_path / "Stable-diffusion" / "zqdb.safetensors"))
    assert set(written) == set(state) - {"model_ema.decay"}
    assert all(written[k].shape == state[k].shape for k in written)
    assert {v.dtype for v in written.values() if v.is_floating_point() and v.numel()} == {torch.bfloat16}
    assert (tmp_path / "Stable-diffusion" / "zqdb.yaml").read_text() == "model: {}\n"

    config = db.DreamBoothConfig.from_dict(job(tmp_path, [{"instance_dir": str(data)}], name="base"))
    with pytest.raises(ConfigError, match="loaded checkpoint's own file"):
        db.check(config, parts, out_paths(tmp_path))
    config = db.DreamBoothConfig.from_dict(job(tmp_path, [{"instance_dir": str(data)}]))
    with pytest.raises(ConfigError, match="already exists"):
        db.check(config, parts, out_paths(tmp_path))


class Boom(Exception):
    pass


@pytest.mark.parametrize("how", ["error", "keyboard", "stop", "nan"])
def test_the_host_model_is_restored_however_the_run_ends(sd1_model, tmp_path, how):
    parts = parts_from_ldm(sd1_model)
    data = write_images(tmp_path / "a")
    cfg = job(tmp_path, [{"instance_dir": str(data)}], train_text_encoder=True, unet_blocks="output_blocks")
    config = db.DreamBoothConfig.from_dict(cfg)
    calls = {"n": 0}

    class Failing(TeacherObjective):
        def __init__(self):
            pass

        def loss(self, parts, latents, cond, generator, mask=None):
            calls["n"] += 1
            pred = parts.apply_model(latents, torch.tensor([500] * len(latents)), cond).float()
            if calls["n"] == 2 and how in ("error", "keyboard", "nan"):
                if how == "nan":
                    return pred.mean(dim=(1, 2, 3)) * float("nan")
                raise Boom() if how == "error" else KeyboardInterrupt()
            return pred.pow(2).mean(dim=(1, 2, 3))

    class Stopping(Hooks):
        def should_stop(self):
            return calls["n"] >= 2

    before = host_state(sd1_model)
    raises = {"error": Boom, "keyboard": KeyboardInterrupt, "nan": TrainingError}.get(how)
    hooks = Stopping() if how == "stop" else Hooks()
    if raises:
        with pytest.raises(raises):
            db.train_dreambooth(config, parts, out_paths(tmp_path), hooks, Failing())
    else:
        assert db.train_dreambooth(config, parts, out_paths(tmp_path), hooks, Failing()).stopped
    assert same_state(before, host_state(sd1_model))
    assert (tmp_path / "Stable-diffusion" / "zqdb.safetensors").is_file()  # the step before the fault is kept


@pytest.mark.slow
def test_dreambooth_recovers_a_hidden_unet_change(sd1_model, tmp_path):
    """Targets are the model's own predictions with a hidden change of one UNet block; full fine-tuning of that
    block from the unchanged weights must cut the loss on them by at least 20x."""
    parts = parts_from_ldm(sd1_model)
    prompts = ["photo of zkw person", "red, blue"]
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([300, 600])
    x_t = add_noise(x0, torch.randn(2, 4, 8, 8, generator=gen), t, parts.alphas_cumprod)
    block = sd1_model.model.diffusion_model.output_blocks[1]
    saved = {k: v.clone() for k, v in block.state_dict().items()}
    with torch.no_grad():
        for param in block.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
        target = parts.apply_model(x_t, t, parts.text_encoder.encode(prompts)).float()
    block.load_state_dict(saved)
    objective = TeacherObjective(x_t, t, target)
    cfg = job(tmp_path, [{"instance_dir": str(tmp_path)}], unet_blocks="output_blocks.1")
    cfg["train"] = {"steps": 150, "learning_rate": "2e-3", "lr_schedule": "cosine", "optimizer": "adamw"}
    config = db.DreamBoothConfig.from_dict(cfg)
    trainable = db.FullTrainable(config, parts, out_paths(tmp_path), [])
    trainable.save = lambda step, resume: []
    losses = {}

    class Probe(TrainingHooks):
        def on_progress(self, progress):
            losses.setdefault("first", progress.loss)
            losses["last"] = progress.loss

    before_state = host_state(sd1_model)
    train(parts, trainable, FixedBatches(x0, prompts), objective, config.train, Probe())
    assert same_state(before_state, host_state(sd1_model))
    ratio = losses["first"] / losses["last"]
    print(f"DreamBooth known answer: loss {losses['first']:.3e} -> {losses['last']:.3e} ({ratio:.0f}x) in 150 steps")
    assert ratio >= 20


class PairedTeacher:
    """Instance targets from a hidden change, class targets from the base model: what class images the base
    model generated teach (the anchor prior preservation gives)."""

    def __init__(self, x_t, t, targets):
        self.x_t, self.t, self.targets = x_t, t, targets

    def loss(self, parts, latents, cond, generator, mask=None):
        n = cond.shape[0]
        pred = parts.apply_model(self.x_t[:n], self.t[:n], cond).float()
        return (pred - self.targets[:n]).pow(2).mean(dim=(1, 2, 3))


@pytest.mark.slow
def test_prior_preservation_keeps_the_class_closer_to_the_base_model(sd1_model, tmp_path):
    parts = parts_from_ldm(sd1_model)
    gen = torch.Generator().manual_seed(8)
    x0 = torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([300, 600, 300, 600])
    x_t = add_noise(x0, torch.randn(4, 4, 8, 8, generator=gen), t, parts.alphas_cumprod)
    instance, klass = ["photo of zkw person"] * 2, ["photo of a person"] * 2
    with torch.no_grad():
        base_class = parts.apply_model(x_t[2:], t[2:], parts.text_encoder.encode(klass)).float()
        shifted = parts.apply_model(x_t[:2], t[:2], parts.text_encoder.encode(instance)).float() + 0.5
    held_out = probe_inputs(parts, seed=21)
    with torch.no_grad():
        class_cond = parts.text_encoder.encode(klass)
        reference = parts.apply_model(*held_out, class_cond).float()

    def drift_after(prior: bool) -> float:
        cfg = job(tmp_path, [{"instance_dir": str(tmp_path)}])
        cfg["train"] = {"steps": 60, "learning_rate": "1e-3", "optimizer": "adamw"}
        config = db.DreamBoothConfig.from_dict(cfg)
        trainable = db.FullTrainable(config, parts, out_paths(tmp_path), [])
        trainable.save = lambda step, resume: []
        drift = {}

        class Probe(TrainingHooks):
            def on_progress(self, progress):
                if progress.step == config.train.steps:
                    with torch.no_grad():
                        now = parts.apply_model(*held_out, class_cond).float()
                    drift["value"] = (now - reference).pow(2).mean().item()

        if prior:
            extras = {"prior": torch.tensor([False, False, True, True]), "weights": torch.ones(4)}
            batches = FixedBatches(torch.zeros(4, 4, 8, 8), instance + klass)
            batches.next_batch = lambda: (torch.zeros(4, 4, 8, 8), instance + klass, extras)
            objective = PairedTeacher(x_t, t, torch.cat([shifted, base_class]))
        else:
            batches = FixedBatches(torch.zeros(2, 4, 8, 8), instance)
            objective = PairedTeacher(x_t, t, shifted)
        train(parts, trainable, batches, objective, config.train, Probe())
        return drift["value"]

    without, with_prior = drift_after(False), drift_after(True)
    print(f"class-prompt drift on held-out noise: {without:.3e} without prior preservation, {with_prior:.3e} with")
    assert with_prior < 0.75 * without


def test_gradient_checkpointing_gives_the_same_gradients(sd1_model):
    parts = parts_from_ldm(sd1_model)
    x_t, t = probe_inputs(parts)
    cond = parts.text_encoder.encode(["a", "b"])
    unet = parts.unet
    params = list(unet.parameters())

    def grads(checkpoint: bool):
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with checkpointed(unet_blocks(unet) if checkpoint else []):
            parts.apply_model(x_t, t, cond).pow(2).mean().backward()
        out = [p.grad.clone() for p in params]
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        return out

    plain, checkpointed_grads = grads(False), grads(True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed_grads, strict=True))
    assert not any("forward" in m.__dict__ for m in unet.modules())


def test_extracted_lora_is_the_change_at_full_rank(sd1_model, tmp_path):
    from lib_trainer.methods.lora_extract import lora_tensors

    parts = parts_from_ldm(sd1_model)
    data = write_images(tmp_path / "a")
    config = db.DreamBoothConfig.from_dict(job(tmp_path, [{"instance_dir": str(data)}]))
    trainable = db.FullTrainable(config, parts, out_paths(tmp_path), [])
    target = sd1_model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    with trainable.attach(parts):
        with torch.no_grad():
            target.weight.add_(torch.randn(target.weight.shape) * 0.01)
        base = dict(zip((id(p) for p in trainable.parameters()), trainable.base, strict=True))
        tensors, _ = lora_tensors(parts, base, 1024, with_text=False)
        trained = target.weight.detach().clone()
    names = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert len(names) == 1  # only the changed module
    stem = names[0].removesuffix(".lora_down.weight")
    assert stem == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    rebuilt = base[id(target.weight)] + tensors[f"{stem}.lora_up.weight"] @ tensors[f"{stem}.lora_down.weight"]
    assert torch.allclose(rebuilt, trained, atol=1e-5)


def test_bad_dreambooth_settings(tmp_path):
    data = str(write_images(tmp_path / "a"))
    cases = [
        ({"concepts": []}, "concepts is empty"),
        ({"concepts": [{"instance_dir": data, "class_images": 5}]}, "class_dir is empty"),
        ({"concepts": [{"instance_dir": data, "class_images": 5, "class_dir": data + "c"}]}, "class_prompt is empty"),
        ({"concepts": [{"instance_dir": ""}]}, "instance_dir is empty"),
        ({"data": {"data_dir": data}}, "unknown setting"),
        ({"dreambooth": {"name": "a/b"}}, "dreambooth.name"),
    ]
    for change, message in cases:
        cfg = job(tmp_path, [{"instance_dir": data}]) | change
        with pytest.raises(ConfigError, match=message):
            db.DreamBoothConfig.from_dict(cfg)
    with pytest.raises(ConfigError) as info:
        db.DreamBoothConfig.from_dict(job(tmp_path, [{"instance_dir": data}, {"instance_dir": ""}]))
    assert info.value.field == "concepts.1.instance_dir"


def test_submit_time_checks_name_the_concept(sd1_model, tmp_path):
    parts = parts_from_ldm(sd1_model)
    data = str(write_images(tmp_path / "a"))
    empty = tmp_path / "empty"
    empty.mkdir()
    config = db.DreamBoothConfig.from_dict(job(tmp_path, [{"instance_dir": data}, {"instance_dir": str(empty)}]))
    with pytest.raises(DatasetError) as info:
        db.check(config, parts, out_paths(tmp_path))
    assert info.value.field == "concepts.1.instance_dir"
    config = db.DreamBoothConfig.from_dict(
        job(tmp_path, [{"instance_dir": data, "class_dir": str(empty)}], unet_blocks="nowhere")
    )
    with pytest.raises(ConfigError, match="'nowhere'"):
        db.check(config, parts, out_paths(tmp_path))
    config = db.DreamBoothConfig.from_dict(job(tmp_path, [{"instance_dir": data, "class_dir": str(empty)}]))
    with pytest.raises(DatasetError, match="holds no images and class_images is 0"):
        db.check(config, parts, out_paths(tmp_path))
    bf16 = db.DreamBoothConfig.from_dict(job(tmp_path, [{"instance_dir": data}], weights_precision="bf16"))
    with pytest.raises(ConfigError, match="computes under autocast"):
        db.check(bf16, parts, out_paths(tmp_path))
    cfg = job(tmp_path, [{"instance_dir": data}])
    cfg["train"] = {"optimizer": "adamw8bit"}
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        db.check(db.DreamBoothConfig.from_dict(cfg), parts, out_paths(tmp_path))


@pytest.mark.parametrize("model_fixture", ["sd2_model", "sdxl_model"])
def test_sd2_v_and_sdxl_train_and_restore(model_fixture, request, tmp_path):
    model = request.getfixturevalue(model_fixture)
    parts = parts_from_sgm(model) if is_sgm(model) else parts_from_ldm(model)
    data = write_images(tmp_path / "a")
    config = db.DreamBoothConfig.from_dict(
        job(tmp_path, [{"instance_dir": str(data), "instance_prompt": "zkw"}], train_text_encoder=True)
        | {"data": {"width": 64, "height": 64}}
    )
    before = host_state(model)
    db.train_dreambooth(config, parts, out_paths(tmp_path), Hooks())
    assert same_state(before, host_state(model))
    written = safetensors.torch.load_file(str(tmp_path / "Stable-diffusion" / "zqdb.safetensors"))
    assert set(written) == set(checkpoint_tensors(model))


def test_a_dreambooth_job_on_the_fake_webui(webui):
    """Class images through the host's txt2img, the checkpoint in its checkpoint folder and listed, the extracted
    LoRA checked against the WebUI's names, the WebUI switched to the result when asked, the model restored."""
    classes = webui.root / "classes"
    config = {
        "dreambooth": {"name": "zqdb", "keep_loaded": True, "extract_lora_rank": 4},
        "concepts": [
            {"instance_dir": str(webui.data), "instance_prompt": "photo of zkw person"}
            | {"class_prompt": "photo of a person", "class_dir": str(classes), "class_images": 2}
        ],
        "data": {"width": 64, "height": 64},
        "train": {"steps": 3, "learning_rate": "1e-4"},
        "class_generation": {"steps": 12, "width": 64, "height": 64},
    }
    model = webui.shared.sd_model
    before = host_state(model)
    job = webui.manager.submit("dreambooth", config, {"enabled": False})
    job = webui.manager.wait(job.id, timeout=300)
    assert job.state == "done", job.error
    assert same_state(before, host_state(model))
    rendered = [r for r in webui.shared.rendered if r["prompt"] == "photo of a person"]
    assert len(rendered) == 2
    assert rendered[0]["size"] == (64, 64)
    checkpoint = webui.root / "models" / "Stable-diffusion" / "zqdb.safetensors"
    assert checkpoint.is_file()
    sd_models = sys.modules["modules.sd_models"]
    assert "zqdb.safetensors" in sd_models.checkpoints_list  # listed without a restart
    assert [Path(info.filename) for info in sd_models.loaded] == [checkpoint]  # keep_loaded
    assert webui.shared.opts.data["sd_model_checkpoint"].startswith("zqdb.safetensors")
    assert not [w for w in job.warnings if "do not match" in w]  # the extracted LoRA's keys are the WebUI's
    assert job.summary()["history"][-1]["loss_prior"] >= 0

    again = webui.manager.submit("dreambooth", config | {"dreambooth": {"name": "zqdb2"}}, {"enabled": False})
    assert webui.manager.wait(again.id, timeout=300).state == "done"
    assert len([r for r in webui.shared.rendered if r["prompt"] == "photo of a person"]) == 2  # reused


def test_dreambooth_submit_errors_name_the_field(webui):
    config = {"dreambooth": {"name": "zqdb"}, "concepts": [{"instance_dir": str(webui.root / "missing")}]}
    with pytest.raises(DatasetError) as info:
        webui.manager.submit("dreambooth", config)
    assert info.value.field == "concepts.0.instance_dir"
    config = {
        "dreambooth": {"name": "zqdb"},
        "concepts": [{"instance_dir": str(webui.data)}],
        "class_generation": {"sampler": "Nope"},
    }
    with pytest.raises(ConfigError) as info:
        webui.manager.submit("dreambooth", config)
    assert info.value.field == "class_generation.sampler"


def test_bf16_weights_train_and_the_fp32_host_comes_back_bit_identical(sd1_model, tmp_path):
    """The storage-dtype change path (the WebUI's fp16 weights trained in fp32 take the same one)."""
    parts = parts_from_ldm(sd1_model)
    data = write_images(tmp_path / "a")
    cfg = job(tmp_path, [{"instance_dir": str(data)}], weights_precision="bf16", train_text_encoder=True)
    cfg["train"]["mixed_precision"] = "bf16"
    config = db.DreamBoothConfig.from_dict(cfg)
    dtypes = []

    class Probe(Hooks):
        def on_progress(self, progress):
            dtypes.append({p.dtype for p in sd1_model.model.diffusion_model.parameters() if p.dim() > 1})

    before = host_state(sd1_model)
    db.train_dreambooth(config, parts, out_paths(tmp_path), Probe())
    assert dtypes[0] == {torch.bfloat16}
    assert same_state(before, host_state(sd1_model))


def test_a_partly_given_train_section_keeps_the_methods_defaults(tmp_path):
    """An API job giving only some train settings keeps DreamBooth's (not the generic) learning rate, optimizer
    and checkpointing for the rest."""
    config = db.DreamBoothConfig.from_dict(job(tmp_path, [{"instance_dir": str(tmp_path)}]) | {"train": {"steps": 9}})
    train_cfg = config.train
    assert (train_cfg.steps, train_cfg.learning_rate, train_cfg.optimizer) == (9, "2e-6", "adafactor")
    assert train_cfg.gradient_checkpointing
