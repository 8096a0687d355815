"""Forge main as a host: models/forge.py's copies and webui/forge_host.py against a fake Forge surface built
around a real tiny model in Forge's layout (LDM-named UNet, HF CLIP, Forge-style layers, inference tensors)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lib_trainer.errors import ConfigError, TrainerError, UnsupportedModelError
from lib_trainer.models.forge import parts_from_forge, trainable_copy
from lib_trainer.models.ldm import parts_from_ldm
from tests.conftest import write_images
from tests.support import fake_forge
from tests.support.models import build_model

TI = {
    "embedding": {"name": "zqforge", "init_text": "cat"},
    "train": {"steps": 4, "save_every": 2, "preview_every": 2, "batch_size": 1},
}
LORA = {
    "network": {"name": "zqforgelora", "rank": 4, "alpha": 2.0, "train_text_encoder": True},
    "train": {"steps": 3, "save_every": 3, "preview_every": 3, "learning_rate": "1e-3"},
}
PREVIEW = {"prompt": "a photo of [name]", "steps": 2, "sampler": "Euler a", "width": 64, "height": 64}


@pytest.fixture(scope="module")
def layout_model(tmp_path_factory):
    """The real SD1 block layout (2 res blocks per level) at tiny widths: LoRA names as Forge maps them."""
    return build_model("sd1", "layout", tmp_path_factory.mktemp("forge-layout"))


def forge(model, root: Path, name: str = "tiny-sd1"):
    engine = fake_forge.build_engine(model, name)
    fake = fake_forge.install(engine, root)
    fake.engine, fake.root = engine, root
    fake.host = importlib.import_module("lib_trainer.webui.hosts").host_module()
    fake.manager = importlib.import_module("lib_trainer.webui.jobs").JobManager(fake.host)
    fake.data = write_images(root / "photos")
    return fake


@pytest.fixture
def forge_webui(sd1_model, tmp_path: Path):
    fake = forge(sd1_model, tmp_path)
    yield fake
    _close(fake)


def _close(fake) -> None:
    for job_id in list(fake.manager.jobs):
        fake.manager.cancel(job_id)
        fake.manager.wait(job_id, timeout=120)
    fake_forge.uninstall()


def job(fake, base: dict, **data) -> dict:
    return {**base, "data": {"data_dir": str(fake.data), "width": 64, "height": 64, **data}}


def assert_unchanged(engine, before) -> None:
    after = fake_forge.engine_state(engine)
    assert [name for name, *_ in after] == [name for name, *_ in before]
    for (name, tensor, grad, inference, device), (_, old, old_grad, old_inference, old_device) in zip(
        after, before, strict=True
    ):
        assert tensor is old, name  # the same tensor objects: nothing was swapped in Forge's modules
        assert (grad, inference, device) == (old_grad, old_inference, old_device), name
        assert tensor.grad is None, name


def test_copies_compute_what_the_host_model_computes(sd1_model):
    engine = fake_forge.build_engine(sd1_model)
    forge_parts = parts_from_forge(engine, "cpu", clip_skip=1, model_name="tiny-sd1")
    ldm_parts = parts_from_ldm(sd1_model, clip_skip=1)
    assert (forge_parts.family, forge_parts.prediction) == ("sd1", "eps")
    prompts = ["a photo of a cat, red", "zq"]
    with torch.no_grad():
        cond = forge_parts.condition(prompts)
        torch.testing.assert_close(cond, ldm_parts.condition(prompts), rtol=0, atol=1e-6)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([10, 900])
        torch.testing.assert_close(
            forge_parts.apply_model(x, t, cond), ldm_parts.apply_model(x, t, cond), atol=1e-5, rtol=0
        )
        images = torch.rand(1, 3, 64, 64) * 2 - 1
        mean, _std = forge_parts.latent_encoder.encode(images)
        dist = sd1_model.first_stage_model.encode(images)
        torch.testing.assert_close(mean, dist.mean, atol=1e-5, rtol=0)
    assert forge_parts.latent_encoder.scale_factor == pytest.approx(sd1_model.scale_factor)
    torch.testing.assert_close(forge_parts.alphas_cumprod, ldm_parts.alphas_cumprod.float())


def test_copies_are_plain_trainable_torch_layers(sd1_model):
    engine = fake_forge.build_engine(sd1_model)
    unet = engine.forge_objects.unet.model.diffusion_model
    copied = trainable_copy(unet, "cpu")
    forge_layers = [n for n, m in unet.named_modules() if isinstance(m, fake_forge.Linear)]
    assert forge_layers
    assert all(type(dict(copied.named_modules())[n]) is torch.nn.Linear for n in forge_layers)
    assert not any(p.is_inference() or p.requires_grad for p in copied.parameters())
    assert all(type(m) is not fake_forge.Conv2d for m in copied.modules())
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    cond = torch.randn(1, 77, 32)
    copied(x, torch.tensor([5]), context=cond).sum().backward()  # Forge's own tensors would refuse this
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert all(p.is_inference() for p in unet.parameters())


def test_forge_in_place_transformer_blocks_train_out_of_place(sd1_model):
    """Forge's blocks add into ``x`` in place after LayerNorm saved it; the copies compute the same out of place."""
    engine = fake_forge.build_engine(sd1_model)
    unet = engine.forge_objects.unet.model.diffusion_model
    copied = trainable_copy(unet, "cpu")
    names = [n for n, m in unet.named_modules() if type(m) is fake_forge.BasicTransformerBlock]
    assert names
    block = dict(copied.named_modules())[names[0]]
    assert isinstance(block, fake_forge.BasicTransformerBlock)
    assert type(block) is not fake_forge.BasicTransformerBlock
    x = torch.randn(1, 16, block.norm1.normalized_shape[0])
    context = torch.randn(1, 77, 32)
    with torch.no_grad():
        ours = block(x.clone(), context=context)
        forge_own = fake_forge.BasicTransformerBlock._forward(block, x.clone(), context)
    torch.testing.assert_close(ours, forge_own, rtol=0, atol=1e-6)
    for p in block.parameters():
        p.requires_grad_(True)
    block(x, context=context).sum().backward()
    assert all(p.grad is not None for p in block.attn1.to_q.parameters())
    with pytest.raises(RuntimeError, match="inplace"):  # what Forge's own block does under autograd
        fake_forge.BasicTransformerBlock._forward(block, x.clone(), context).sum().backward()


def test_forge_is_detected_and_its_host_is_used(forge_webui):
    assert forge_webui.host.__name__ == "lib_trainer.webui.forge_host"
    assert "Forge SD1 (epsilon) - tiny-sd1" in forge_webui.host.model_label()
    assert "hypernetworks have no effect" in forge_webui.host.model_label()


def test_the_tab_builds_on_forge_and_says_what_forge_cannot_train(forge_webui):
    pytest.importorskip("gradio")
    entry = importlib.import_module("lib_trainer.webui.entry")
    assert entry.host is forge_webui.host
    entry._manager = forge_webui.manager
    try:
        ((tab, title, _),) = entry.on_ui_tabs()
    finally:
        entry._manager = None
    assert title == "Trainer"
    notices = {
        b.elem_id: b.value for b in tab.blocks.values() if str(getattr(b, "elem_id", "")).endswith("_unavailable")
    }
    assert set(notices) == {f"trainer_{m}_unavailable" for m in ("hypernetwork", "dreambooth", "embedding_finetune")}
    assert "no effect in Forge main" in notices["trainer_hypernetwork_unavailable"]


def test_textual_inversion_on_forge_leaves_its_model_as_it_was(forge_webui):
    fake = forge_webui
    before = fake_forge.engine_state(fake.engine)
    done = fake.manager.wait(fake.manager.submit("textual_inversion", job(fake, TI), PREVIEW).id)
    assert done.state == "done", done.error
    saved = load_file(fake.root / "embeddings" / "zqforge.safetensors")
    assert list(saved) == ["emb_params"]
    assert saved["emb_params"].shape == (1, 32)
    assert "unload_all_models" in fake.memory.calls  # Forge's memory manager frees its GPU copies first
    assert fake.memory.calls[-1] == "soft_empty_cache"  # and the run's copies are gone afterwards
    text_engine = fake.engine.text_processing_engine
    assert "zqforge" in text_engine.embeddings.registered  # previews found the current vectors
    assert text_engine.embeddings.reloads >= 1  # the new file is usable without a restart
    assert fake.processing.StableDiffusionProcessing.cached_c == [None, None]
    assert fake.shared.rendered[0]["prompt"] == "a photo of zqforge"  # previews by the host's own txt2img
    assert_unchanged(fake.engine, before)
    assert fake.host._run is None


def test_lora_on_forge_loads_with_no_unmatched_keys_and_is_reloaded(layout_model, tmp_path):
    fake = forge(layout_model, tmp_path, "layout-sd1")
    try:
        before = fake_forge.engine_state(fake.engine)
        networks = fake.networks
        path = fake.root / "models" / "Lora" / "zqforgelora.safetensors"
        networks.load_lora_state_dict.cache_clear()
        networks.load_lora_state_dict = _cached_loader()
        networks.load_lora_state_dict(str(path))  # Forge read an older file of that name
        networks.available_network_aliases["zqforgelora"] = fake_forge.NetworkOnDisk("zqforgelora", str(path))
        preview = {**PREVIEW, "prompt": "a photo of a cat"}
        done = fake.manager.wait(fake.manager.submit("lora", job(fake, LORA, template="none"), preview).id)
        assert done.state == "done", done.error
        assert done.warnings == []  # the keys are checked with Forge's own maps after saving
        keys = sorted({k.partition(".")[0] for k in load_file(path)})
        assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
        assert any(k.startswith("lora_unet_down_blocks_") for k in keys)  # kohya's diffusers-style SD1 names
        assert fake.host.unmatched_lora_keys(path) == []
        assert networks.load_lora_state_dict.cache_info().currsize == 0  # a retrained file is read again
        assert fake.engine.current_lora_hash == "[]"
        assert networks.listed
        assert networks.available_network_aliases["zqforgelora"].filename == str(path)  # the user's entry is kept
        assert_unchanged(fake.engine, before)
    finally:
        _close(fake)


def test_lora_previews_on_forge_render_the_current_network_through_forges_loader(layout_model, tmp_path):
    """The network trains on copies, so Forge's txt2img sees it only as a file its LoRA extension loads."""
    fake = forge(layout_model, tmp_path, "layout-sd1")
    try:
        networks = fake.networks
        config = job(fake, {**LORA, "train": {**LORA["train"], "steps": 4, "preview_every": 2, "save_every": 4}})
        done = fake.manager.wait(fake.manager.submit("lora", config, {**PREVIEW, "prompt": "a [name]"}).id)
        assert done.state == "done", done.error
        prompts = [r["prompt"] for r in fake.shared.rendered]
        assert prompts == ["a zqforgelora <lora:zqforgelora-trainer-preview:1>"] * 2
        assert [a["name"] for a in networks.applied] == ["zqforgelora-trainer-preview"] * 2
        assert all(a["matched"] and a["unmatched"] == [] for a in networks.applied)
        first, second = (a["sd"] for a in networks.applied)
        assert any(not torch.equal(first[k], second[k]) for k in first)  # each preview shows the network at its step
        final = load_file(fake.root / "models" / "Lora" / "zqforgelora.safetensors")
        assert all(torch.equal(second[k], final[k]) for k in final)  # the last preview is what was saved at step 4
        assert "zqforgelora-trainer-preview" not in networks.available_network_aliases
        assert "zqforgelora-trainer-preview" not in networks.available_networks
        assert not list(Path(done.summary()["saved"][0]["path"]).parents[1].glob("previews/*.safetensors"))
        assert len(list(Path(done.summary()["saved"][0]["path"]).parents[1].glob("previews/*.png"))) == 2
        assert fake.engine.current_lora_hash == "[]"  # the user's LoRAs are applied again at the next generation
        after = fake.engine.forge_objects_after_applying_lora  # and nothing patched for a preview is kept
        assert vars(after) == vars(fake.engine.forge_objects_original)
        assert after is not fake.engine.forge_objects_original
    finally:
        _close(fake)


def _cached_loader():
    import functools

    @functools.lru_cache(maxsize=5)
    def load_lora_state_dict(filename):
        return {}

    return load_lora_state_dict


def test_a_failing_run_leaves_forge_model_as_it_was(forge_webui, monkeypatch):
    fake = forge_webui
    before = fake_forge.engine_state(fake.engine)

    def broken(*_args, **_kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(fake.host, "report_progress", broken)
    done = fake.manager.wait(fake.manager.submit("textual_inversion", job(fake, TI), None).id)
    assert done.state == "failed"
    assert "illegal memory access" in done.error
    assert_unchanged(fake.engine, before)
    assert fake.host._run is None


@pytest.mark.parametrize("method", ["hypernetwork", "dreambooth", "embedding_finetune"])
def test_methods_forge_cannot_use_are_refused_at_submit(forge_webui, method):
    with pytest.raises(ConfigError) as err:
        forge_webui.manager.submit(method, {})
    assert err.value.field == "method"
    assert "Forge" in str(err.value)


def test_quantized_and_other_engines_are_refused_by_name(sd1_model):
    engine = fake_forge.build_engine(sd1_model)
    layer = next(
        m for m in engine.forge_objects.unet.model.diffusion_model.modules() if isinstance(m, fake_forge.Linear)
    )
    with torch.inference_mode():
        layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.shape, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(UnsupportedModelError, match=r"stored as quantized \(torch.uint8\)"):
        parts_from_forge(engine, "cpu")
    flux = fake_forge.build_engine(sd1_model)
    flux.is_sd1 = False
    with pytest.raises(UnsupportedModelError, match=r"SD1\.x, SD2\.x and SDXL"):
        parts_from_forge(flux, "cpu")
    v = fake_forge.build_engine(sd1_model)
    v.forge_objects_original.unet.model.predictor.prediction_type = "v_prediction"
    assert parts_from_forge(v, "cpu").prediction == "v"
    v.forge_objects_original.unet.model.predictor.sigmas = torch.ones(1000)  # a rescaled schedule
    with pytest.raises(TrainerError, match="noise schedule was changed"):
        parts_from_forge(v, "cpu")


def test_fp8_storage_is_trained_in_the_computation_dtype(sd1_model):
    engine = fake_forge.build_engine(sd1_model)
    kmodel = engine.forge_objects.unet.model
    unet = kmodel.diffusion_model
    with torch.inference_mode():
        for module in unet.modules():
            if isinstance(module, fake_forge.Linear):
                module.weight = torch.nn.Parameter(module.weight.to(torch.float8_e4m3fn), requires_grad=False)
    kmodel.storage_dtype, kmodel.computation_dtype = torch.float8_e4m3fn, torch.float32
    parts = parts_from_forge(engine, "cpu")
    assert {p.dtype for p in parts.unet.parameters()} == {torch.float32}
    linear = next(m for m in unet.modules() if isinstance(m, fake_forge.Linear))
    name = next(n for n, m in unet.named_modules() if m is linear)
    torch.testing.assert_close(dict(parts.unet.named_modules())[name].weight, linear.weight.float())


def test_a1111_host_is_used_without_forge(webui):
    assert importlib.import_module("lib_trainer.webui.hosts").host_module() is webui.host


def test_fp16_weights_on_the_cpu_are_copied_to_fp32(sd1_model):
    engine = fake_forge.build_engine(sd1_model)
    clip = engine.forge_objects.clip.cond_stage_model.clip_l
    with torch.inference_mode():
        clip.half()  # Forge keeps the text encoder in fp16 on the CPU by default
    parts = parts_from_forge(engine, "cpu")
    assert {p.dtype for p in parts.host_modules["text_encoder"].parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.isfinite(parts.condition(["a photo of a cat"])).all()
