"""SDXL on a tiny sgm-layout model (tests/support/sdxl.py): adapter, conditioning, TI, LoRA (UNet, te1, te2 on
the fused attention), hypernetworks, kohya names on the real SDXL block layout, a spec-only reader, the host."""

from __future__ import annotations

import copy
import types

import open_clip
import pytest
import safetensors
import torch

from lib_trainer.errors import UnsupportedModelError
from lib_trainer.formats.embedding import read_embedding
from lib_trainer.formats.lora import read_network, save_network
from lib_trainer.loop.train import train
from lib_trainer.methods import hypernetwork as hn
from lib_trainer.methods.lora import (
    LoraConfig,
    NetworkConfig,
    NetworkTrainable,
    attached,
    build_network,
    network_tensors,
    train_lora,
)
from lib_trainer.methods.lora import OutputPaths as LoraPaths
from lib_trainer.methods.textual_inversion import (
    EmbeddingTrainable,
    TextualInversionConfig,
    initial_vectors,
    train_embedding,
)
from lib_trainer.methods.textual_inversion import OutputPaths as TiPaths
from lib_trainer.models.diffusion import add_noise
from lib_trainer.models.guard import state_fingerprint
from lib_trainer.models.parts import Prompts, SizeCondition
from lib_trainer.models.sgm import parts_from_sgm
from tests.support.known_answer import (
    FixedBatches,
    TeacherObjective,
    learning_train,
    loss_before_and_after,
    noisy_latents,
)
from tests.support.kohya_reference import delta_weight
from tests.support.sdxl import SIZE_KEYS, build_sdxl
from tests.test_lora import randomize

PROMPTS = ["a photo of a cat", "red, blue"]


@pytest.fixture
def parts(sdxl_model):
    return parts_from_sgm(sdxl_model)


@pytest.fixture(scope="module")
def layout_sdxl(tmp_path_factory):
    """SDXL's real block layout (3 levels, 2 res blocks, transformer depths 0/2/10, middle 10), tiny widths."""
    return build_sdxl("layout", tmp_path_factory.mktemp("sdxl-layout"))


def inputs(parts, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([100, 800])


def test_adapter_reads_the_loaded_sdxl(parts, sdxl_model):
    assert (parts.family, parts.prediction, parts.resolution) == ("sdxl", "eps", 1024)
    assert parts.text_encoder.key_widths == {"clip_l": 32, "clip_g": 48}  # SDXL: 768 + 1280
    cross = {m.attn2.to_k.in_features for m in parts.unet.modules() if hasattr(m, "attn2")}
    assert parts.text_encoder.dim == 80
    assert cross == {80}
    assert parts.latent_encoder.scale_factor == pytest.approx(0.13025)
    assert parts.num_timesteps == 1000
    assert parts.host_modules["text_encoder"] is sdxl_model.conditioner
    assert parts.text_encoder.first.layer_idx == 2  # sgm's layer_idx: CLIP-L's penultimate hidden state


def reference_conditioning(model, prompts, sizes):
    """sgm GeneralConditioner.forward over the stand-in's embedders, written from sgm's documented behaviour."""
    clip_l, clip_g = model.conditioner.embedders[0].wrapped, model.conditioner.embedders[1].wrapped
    ids_l = clip_l.tokenizer(prompts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
    hidden = clip_l.transformer(input_ids=ids_l["input_ids"], output_hidden_states=True).hidden_states[clip_l.layer_idx]
    out_g = clip_g.encode_with_transformer(open_clip.tokenize(prompts))
    vector = [out_g["pooled"]]
    for embedder, key in zip(model.conditioner.embedders[2:], SIZE_KEYS, strict=True):
        assert embedder.input_key == key
        vector.append(embedder(torch.tensor([sizes[key]] * len(prompts), dtype=torch.float32)))
    return {"crossattn": torch.cat([hidden, out_g["penultimate"]], dim=2), "vector": torch.cat(vector, dim=1)}


def test_conditioning_equals_sgms_conditioner(parts, sdxl_model):
    size = SizeCondition((720, 960), (16, 32), (512, 768))
    with torch.no_grad():
        ours = parts.condition(Prompts(PROMPTS, [size, size]))
        ref = reference_conditioning(
            sdxl_model,
            PROMPTS,
            {
                "original_size_as_tuple": (720, 960),
                "crop_coords_top_left": (16, 32),
                "target_size_as_tuple": (512, 768),
            },
        )
    assert ours["vector"].shape == (2, 48 + 3 * 16)  # SDXL: 1280 + 3 * 512 = 2816
    torch.testing.assert_close(ours["crossattn"], ref["crossattn"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["vector"], ref["vector"], rtol=1e-5, atol=1e-5)


def test_empty_prompt_is_the_zero_unconditional_but_keeps_its_sizes(parts):
    size = SizeCondition((80, 72), (0, 4), (64, 64))
    with torch.no_grad():
        cond = parts.condition(Prompts(["", "a cat"], [size, size]))
    assert not cond["crossattn"][0].any()
    assert cond["crossattn"][1].any()
    assert not cond["vector"][0, :48].any()  # the pooled text
    torch.testing.assert_close(cond["vector"][0, 48:], cond["vector"][1, 48:])  # size embeddings stay


def test_size_conditioning_comes_from_each_image(tmp_path):
    from lib_trainer.data.dataset import Sample

    sample = Sample(tmp_path / "a.png", None, torch.zeros(3, 64, 128), original_size=(300, 100))
    cond = sample.size_condition()
    assert cond.original == (100, 300)
    assert cond.target == (64, 128)
    assert cond.crop_top_left == (0, 32)  # 300x100 -> 192x64 to cover 128x64, centre crop starts 32 px in
    assert sample.size_condition(mirrored=True).crop_top_left == (0, 192 - 128 - 32)


def test_batches_carry_sizes_and_they_change_the_vector(sdxl_model, parts, tmp_path):
    from lib_trainer.config import DataConfig
    from lib_trainer.data.dataset import LatentCache, PromptMaker, TrainingBatches, load_training_set
    from tests.conftest import write_images

    data = DataConfig(data_dir=str(write_images(tmp_path / "d", 2, size=(96, 64))), width=64, height=64)
    samples, template = load_training_set(data)
    import random

    cache = LatentCache(samples, parts.latent_encoder, "once", torch.Generator().manual_seed(0))
    batch = TrainingBatches(samples, cache, PromptMaker(template, "x", data, random.Random(0)), 2, 0).next_batch()
    assert batch[1].sizes[0] == SizeCondition((64, 96), (0, 16), (64, 64))
    with torch.no_grad():
        a = parts.condition(batch[1])["vector"]
        b = parts.condition(list(batch[1]))["vector"]  # no sizes: 1024x1024 defaults
    assert not torch.equal(a, b)


class View:
    """The model with some attributes replaced (the shared fixture itself is never changed)."""

    def __init__(self, base, **changes):
        self._base = base
        self.__dict__.update(changes)

    def __getattr__(self, name):
        return getattr(self._base, name)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: View(m, model=View(m.model, diffusion_model=View(m.model.diffusion_model, in_channels=9))),
            "inpainting",
        ),
        (lambda m: View(m, is_ssd=True), "SSD-1B"),
        (lambda m: View(m, conditioner=View(m.conditioner, embedders=list(m.conditioner.embedders)[1:])), "refiner"),
        (lambda m: View(m, parameterization="x0"), "eps- and v-prediction"),
        (
            lambda m: View(
                m,
                conditioner=View(
                    m.conditioner,
                    embedders=[
                        *list(m.conditioner.embedders)[:1],
                        View(m.conditioner.embedders[1].wrapped, legacy=True),
                        *list(m.conditioner.embedders)[2:],
                    ],
                ),
            ),
            "legacy",
        ),
    ],
)
def test_unsupported_sdxl_variants_are_refused_by_name(sdxl_model, change, message):
    with pytest.raises(UnsupportedModelError, match=message):
        parts_from_sgm(change(sdxl_model), model_name="tiny-sdxl")


def test_names_the_webui_could_not_find_are_refused_on_sdxl(parts):
    from lib_trainer.errors import ConfigError
    from lib_trainer.models.text import check_prompt_word

    check_prompt_word(parts.text_encoder, "zqcat", "embedding.name")
    with pytest.raises(ConfigError, match="would not be recognised"):
        check_prompt_word(parts.text_encoder, "cat!", "embedding.name")


def test_v_prediction_is_read_from_the_model_and_a_marked_file_checked(sdxl_model):
    bare = View(sdxl_model, parameterization=None, denoiser=types.SimpleNamespace(scaling=type("VScaling", (), {})()))
    assert parts_from_sgm(bare).prediction == "v"  # a bare sgm model: the denoiser's scaling decides
    with pytest.raises(UnsupportedModelError, match="v_pred"):
        parts_from_sgm(sdxl_model, checkpoint_keys=frozenset({"v_pred"}))


def ti_config(data, name="zqxl", **train):
    return TextualInversionConfig.from_dict(
        {
            "embedding": {"name": name, "init_text": "cat dog", "num_vectors": 2},
            "data": {"data_dir": str(data), "width": 64, "height": 64, "template": "subject"},
            "train": {"steps": 2, "save_every": 1, "preview_every": 0, **train},
        }
    )


def test_embedding_file_holds_exactly_clip_l_and_clip_g(parts, sdxl_model, image_dir, tmp_path):
    before = state_fingerprint(sdxl_model)
    paths = TiPaths(tmp_path / "embeddings", tmp_path / "log")
    train_embedding(ti_config(image_dir), parts, paths)
    path = paths.embeddings_dir / "zqxl.safetensors"
    with safetensors.safe_open(str(path), framework="pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    assert shapes == {"clip_l": (2, 32), "clip_g": (2, 48)}
    start = initial_vectors(parts, "cat dog", 2)  # through both encoders' token tables
    assert torch.equal(start[:, :32], parts.text_encoder.first.token_vectors(parts.text_encoder.tokenize("cat dog")))
    assert read_embedding(path).vectors.shape == (2, 80)
    train_embedding(ti_config(image_dir, steps=3), parts, paths)  # resumes from the SDXL file
    assert read_embedding(path).step == 3
    after = state_fingerprint(sdxl_model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_textual_inversion_recovers_both_hidden_vectors(parts, tmp_path):
    gen = torch.Generator().manual_seed(1)
    prompts = ["a photo of zqtoken", "zqtoken, a picture"]
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([250, 700])
    x_t = add_noise(x0, noise, t, parts.alphas_cumprod)
    hidden = torch.randn(2, parts.text_encoder.dim, generator=gen) * 0.05
    with torch.no_grad():
        target = parts.apply_model(x_t, t, parts.condition(prompts, {"zqtoken": hidden})).float()
    objective = TeacherObjective(x_t, t, target)
    config = ti_config(tmp_path, "zqtoken", steps=400, learning_rate="0.004", lr_schedule="linear", save_every=0)
    start = initial_vectors(parts, "cat dog", 2)
    trainable = EmbeddingTrainable(
        config, parts, TiPaths(tmp_path / "e", tmp_path / "l"), types.SimpleNamespace(vectors=start.clone(), step=0)
    )
    trainable.save = lambda step, resume: []

    def loss_now():
        with torch.no_grad():
            return objective.loss(parts, x0, trainable.condition(parts, prompts), None).mean().item()

    before = loss_now()
    train(parts, trainable, FixedBatches(x0, prompts), objective, config.train)
    after = loss_now()
    with torch.no_grad():
        want = parts.condition(prompts, {"zqtoken": hidden})
        errors = {}
        for vectors in (start, trainable.vectors.detach()):
            got = parts.condition(prompts, {"zqtoken": vectors})
            for key, part in (
                ("clip_l", got["crossattn"][..., :32] - want["crossattn"][..., :32]),
                ("clip_g", got["crossattn"][..., 32:] - want["crossattn"][..., 32:]),
                ("pooled", got["vector"][:, :48] - want["vector"][:, :48]),
            ):
                errors.setdefault(key, []).append(float(part.norm()))
    print(f"sdxl TI: loss {before:.3e} -> {after:.3e} ({before / after:.0f}x); conditioning error {errors}")
    assert before / after >= 100
    assert all(after_err * 2 < before_err for before_err, after_err in errors.values())  # each encoder's output


def test_lora_names_and_counts_on_the_real_sdxl_layout(layout_sdxl):
    parts = parts_from_sgm(layout_sdxl)
    unet_paths = {name for name, _ in parts.unet.named_modules()}
    for conv, expected in ((0, 722), (4, 722 + 66)):  # kohya's SDXL counts (docs/formats.md 3.3)
        config = NetworkConfig(
            name="x", algo="locon" if conv else "lora", rank=4, conv_rank=conv, train_text_encoder=True
        )
        tensors = network_tensors(build_network(config, parts), parts)
        modules = {k.partition(".")[0] for k in tensors}
        unet = {m for m in modules if m.startswith("lora_unet_")}
        assert len(unet) == expected
        # every UNet key is "lora_unet_" + a real LDM/sgm module path ('.' -> '_'), kohya's SDXL rule
        assert unet <= {"lora_unet_" + p.replace(".", "_") for p in unet_paths}
        te1 = {m for m in modules if m.startswith("lora_te1_")}
        te2 = {m for m in modules if m.startswith("lora_te2_")}
        assert len(te1) == 6 * 3
        assert len(te2) == 6 * 3
        for i in range(3):
            stem = f"lora_te2_text_model_encoder_layers_{i}_"
            assert {stem + f"self_attn_{p}_proj" for p in "qkv"} | {stem + "self_attn_out_proj"} <= te2
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in unet
    assert "lora_unet_input_blocks_7_1_transformer_blocks_9_ff_net_2" in unet  # depth 10 on the last level
    assert "lora_unet_output_blocks_2_2_conv" in modules
    assert "lora_unet_input_blocks_1_0_in_layers_2" in modules
    d = 48
    assert tensors["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape == (4, d)
    assert tensors["lora_te2_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight"].shape == (d, 4)


def spec_reader_targets(model) -> dict[str, torch.Tensor]:
    """Kohya SDXL module name -> the weight (or fused-attention rows) it changes, from docs/formats.md alone."""
    targets = {}
    for name, module in model.model.diffusion_model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            targets["lora_unet_" + name.replace(".", "_")] = module.weight
    clip_l = model.conditioner.embedders[0].wrapped.transformer
    for name, module in clip_l.named_modules():
        if isinstance(module, torch.nn.Linear):
            targets["lora_te1_" + name.replace(".", "_")] = module.weight
    for i, block in enumerate(model.conditioner.embedders[1].wrapped.model.transformer.resblocks):
        stem, w, d = f"lora_te2_text_model_encoder_layers_{i}_", block.attn.in_proj_weight, block.attn.embed_dim
        for j, p in enumerate("qkv"):
            targets[f"{stem}self_attn_{p}_proj"] = w[j * d : (j + 1) * d]  # a view: rows of the fused weight
        targets[stem + "self_attn_out_proj"] = block.attn.out_proj.weight
        targets[stem + "mlp_fc1"], targets[stem + "mlp_fc2"] = block.mlp.c_fc.weight, block.mlp.c_proj.weight
    return targets


@pytest.mark.parametrize(("algo", "conv"), [("lora", 0), ("locon", 4), ("loha", 4), ("lokr", 4)])
def test_a_spec_reader_merging_the_file_reproduces_the_trained_outputs(sdxl_model, algo, conv, tmp_path):
    parts = parts_from_sgm(sdxl_model)
    before = state_fingerprint(sdxl_model)
    config = NetworkConfig(name="zq", algo=algo, rank=4, alpha=2.0, conv_rank=conv, train_text_encoder=True)
    network = build_network(config, parts)
    randomize(network, seed=2, scale=0.1)
    network.eval()
    x, t = inputs(parts)
    with torch.no_grad():
        base = parts.apply_model(x, t, parts.condition(PROMPTS))
        with attached(network):
            trained = parts.apply_model(x, t, parts.condition(PROMPTS))
    path = save_network(tmp_path / "zq.safetensors", network_tensors(network, parts), {}, "fp32")
    assert state_fingerprint(sdxl_model).keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in state_fingerprint(sdxl_model).items())
    merged = copy.deepcopy(sdxl_model)
    targets = spec_reader_targets(merged)
    grouped: dict[str, dict] = {}
    for key, value in read_network(path)[0].items():
        module, _, tensor = key.partition(".")
        grouped.setdefault(module, {})[tensor] = value
    assert set(grouped) <= set(targets)  # nothing unmatched
    assert any(k.startswith("lora_te2_") and k.endswith("_q_proj") for k in grouped)
    with torch.no_grad():
        for module, tensors in grouped.items():
            targets[module] += delta_weight(tensors, targets[module].shape)
        merged_parts = parts_from_sgm(merged)
        out = merged_parts.apply_model(x, t, merged_parts.condition(PROMPTS))
    assert not torch.allclose(base, trained)
    torch.testing.assert_close(out, trained, rtol=2e-4, atol=2e-5)


def test_network_detach_restores_the_fused_attention_exactly(sdxl_model):
    parts = parts_from_sgm(sdxl_model)
    network = build_network(NetworkConfig(name="zq", rank=4, train_text_encoder=True), parts)
    x, t = inputs(parts)
    with torch.no_grad():
        base = parts.apply_model(x, t, parts.condition(PROMPTS))
        with attached(network):  # fresh network: up factors are zero, so the output is the base model's
            fresh = parts.apply_model(x, t, parts.condition(PROMPTS))
    torch.testing.assert_close(fresh, base, rtol=1e-6, atol=1e-6)
    assert not any("forward" in m.__dict__ for m in sdxl_model.modules())


@pytest.mark.slow
def test_lora_learns_a_hidden_change_in_unet_and_both_text_encoders(sdxl_model, tmp_path):
    parts = parts_from_sgm(sdxl_model)
    x0, x_t, t = noisy_latents(parts, 5)
    hidden = build_network(NetworkConfig(name="hidden", rank=2, alpha=2.0, train_text_encoder=True), parts)
    randomize(hidden, seed=11, scale=0.3)
    hidden.eval()
    with attached(hidden), torch.no_grad():
        objective = TeacherObjective(x_t, t, parts.apply_model(x_t, t, parts.condition(PROMPTS)).float())
    config = LoraConfig.from_dict(
        {
            "network": {"name": "zqnet", "rank": 4, "alpha": 4.0, "train_text_encoder": True},
            "data": {"data_dir": str(tmp_path)},
            "train": learning_train(200, "3e-3"),
        }
    )
    trainable = NetworkTrainable(config, parts, LoraPaths(tmp_path / "Lora", tmp_path / "log"), [])
    assert len(trainable.network.text_encoder_loras) == 36  # te1 and te2: 3 layers x 6 each

    def loss_now():
        trainable.network.eval()
        with attached(trainable.network), torch.no_grad():
            return objective.loss(parts, x0, parts.condition(PROMPTS), None).mean().item()

    before, after = loss_before_and_after(parts, trainable, objective, x0, PROMPTS, config.train, loss_now)
    te2_q = [
        lo
        for lo in trainable.network.text_encoder_loras
        if lo.lora_name.startswith("lora_te2") and "q_proj" in lo.lora_name
    ]
    print(f"sdxl lora: loss {before:.3e} -> {after:.3e} ({before / after:.0f}x) in 200 steps")
    assert before / after >= 20
    assert all(lo.lora_up.weight.abs().sum() > 0 for lo in te2_q)  # the fused attention's q got gradients


def test_lora_training_writes_sdxl_metadata(sdxl_model, image_dir, tmp_path):
    paths = LoraPaths(tmp_path / "Lora", tmp_path / "log")
    request = {
        "network": {"name": "zqxl", "rank": 4, "train_text_encoder": True},
        "data": {"data_dir": str(image_dir), "width": 64, "height": 64, "template": "none"},
        "train": {"steps": 2, "save_every": 0, "preview_every": 0, "learning_rate": "1e-3"},
    }
    train_lora(LoraConfig.from_dict(request), parts_from_sgm(sdxl_model), paths)
    tensors, meta = read_network(paths.lora_dir / "zqxl.safetensors")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert {k.split("_")[1] for k in tensors} == {"unet", "te1", "te2"}


def test_hypernetwork_sizes_follow_the_model_and_apply_on_sgm_attention(sdxl_model, image_dir, tmp_path):
    parts = parts_from_sgm(sdxl_model)
    assert hn.for_model(hn.HypernetworkSpec(name="x"), parts).sizes == "80"  # the text context (SDXL: 2048, 640, 1280)
    paths = hn.OutputPaths(tmp_path / "hn", tmp_path / "log")
    request = {
        "hypernetwork": {"name": "zqhx", "sizes": "auto"},
        "data": {"data_dir": str(image_dir), "width": 64, "height": 64, "template": "hypernetwork"},
        "train": {"steps": 2, "save_every": 0, "preview_every": 0},
    }
    result = hn.train_hypernetwork(hn.HypernetworkConfig.from_dict(request), parts, paths)
    assert result.step == 2
    data = hn.read_hypernetwork(paths.hypernetwork_dir / "zqhx.pt")
    assert [k for k in data if isinstance(k, int)] == [80]


@pytest.mark.slow
def test_hypernetwork_learns_a_hidden_one_on_sdxl(sdxl_model, tmp_path):
    parts = parts_from_sgm(sdxl_model)
    x0, x_t, t = noisy_latents(parts, 7)
    hidden = hn.Hypernetwork.create(hn.HypernetworkSpec(name="h", sizes="80, 64", weight_init="XavierNormal"), seed=3)
    hidden.set_mode(False)
    with hidden.attached(parts.unet), torch.no_grad():
        objective = TeacherObjective(x_t, t, parts.apply_model(x_t, t, parts.condition(PROMPTS)).float())
    config = hn.HypernetworkConfig.from_dict(
        {
            "hypernetwork": {"name": "zqhyper", "sizes": "80, 64"},
            "data": {"data_dir": str(tmp_path)},
            "train": learning_train(200, "3e-3"),
        }
    )
    start = hn.Hypernetwork.create(config.hypernetwork)
    trainable = hn.HypernetworkTrainable(config, parts, hn.OutputPaths(tmp_path / "hn", tmp_path / "log"), start, 0)

    def loss_now():
        trainable.net.set_mode(False)
        with trainable.net.attached(parts.unet), torch.no_grad():
            return objective.loss(parts, x0, parts.condition(PROMPTS), None).mean().item()

    before, after = loss_before_and_after(parts, trainable, objective, x0, PROMPTS, config.train, loss_now)
    print(f"sdxl hypernetwork: loss {before:.3e} -> {after:.3e} ({before / after:.0f}x) in 200 steps")
    assert before / after >= 10


def test_lora_without_lycoris_installed_is_refused_at_submit(sdxl_model, image_dir, tmp_path, monkeypatch):
    import importlib.util

    from lib_trainer.methods import lora

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lycoris" else real(name, *a))
    config = LoraConfig.from_dict(
        {"network": {"name": "zq"}, "data": {"data_dir": str(image_dir), "width": 64, "height": 64}}
    )
    with pytest.raises(UnsupportedModelError, match="lycoris-lora"):
        lora.check(config, parts_from_sgm(sdxl_model), LoraPaths(tmp_path / "Lora", tmp_path / "log"))
    monkeypatch.setattr(importlib.util, "find_spec", real)
    from lib_trainer import requirements

    versions = {"torch": "2.3.1+cu121", "lycoris-lora": "4.1.3"}  # Forge main's torch with lycoris 4.1
    monkeypatch.setattr(requirements, "installed_version", versions.get)
    with pytest.raises(UnsupportedModelError, match=r"4\.1\.3 is installed.*torch 2\.3\.1.*lycoris-lora==3\.4\.0"):
        lora.check(config, parts_from_sgm(sdxl_model), LoraPaths(tmp_path / "Lora", tmp_path / "log"))


@pytest.fixture
def sdxl_webui(sdxl_model, tmp_path):
    from tests.conftest import installed_webui

    yield from installed_webui(sdxl_model, tmp_path, "tiny-sdxl")


def test_sdxl_jobs_through_the_host_embedding_with_previews(sdxl_webui, sdxl_model):
    from tests.test_webui_glue import ti_request

    webui = sdxl_webui
    assert webui.host.model_label().startswith("SDXL (eps-prediction) - tiny-sdxl")
    before = state_fingerprint(sdxl_model)
    preview = {"prompt": "a photo of [name]", "steps": 2, "sampler": "Euler a"}  # no size: the model's 1024
    job = webui.manager.wait(webui.manager.submit("textual_inversion", ti_request(webui.data), preview).id)
    assert job.state == "done", job.error
    with safetensors.safe_open(str(webui.root / "embeddings" / "zqtoken.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == {"clip_l", "clip_g"}
    registered = webui.db.registered["zqtoken"].vec  # what the previews rendered with: the WebUI's SDXL dict
    assert set(registered) == {"clip_l", "clip_g"}
    assert registered["clip_g"].shape[1] == 48
    assert webui.shared.rendered[-1]["size"] == (1024, 1024)
    assert webui.db.reloads
    assert webui.db.reloads[-1] is True
    after = state_fingerprint(sdxl_model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sdxl_sizes_default_to_1024_and_lora_keys_all_match_the_webui(sdxl_webui, sdxl_model, monkeypatch):
    import sys

    from tests.test_webui_glue import FakeNetworks, lora_job

    webui = sdxl_webui
    request = lora_job(webui.data, steps=2, save_every=0, preview_every=0)
    unsized = {**request, "data": {k: v for k, v in request["data"].items() if k not in ("width", "height")}}
    parsed, _ = webui.manager.validate("lora", unsized)
    assert (parsed.data.width, parsed.data.height, parsed.data.bucket_max_side) == (1024, 1024, 2048)
    small = {**request, "data": {**request["data"], "width": 512, "height": 512, "buckets": True}}  # sides stay
    assert webui.manager.validate("lora", small)[0].data.bucket_min_side == 256
    monkeypatch.setitem(sys.modules, "networks", FakeNetworks(sdxl_model))
    request["network"].update({"train_text_encoder": True, "algo": "locon", "conv_rank": 4})
    job = webui.manager.wait(webui.manager.submit("lora", request).id, timeout=120)
    assert job.state == "done", job.error
    assert job.warnings == []  # every unet, te1 and te2 key is placed by the WebUI's own SDXL rules
    tensors, _ = read_network(webui.root / "models" / "Lora" / "zqlora.safetensors")
    assert {k.split("_")[1] for k in tensors} == {"unet", "te1", "te2"}
    del sdxl_model.network_layer_mapping


def test_merged_webui_loras_are_unmerged_under_no_grad(sdxl_webui, sdxl_model, monkeypatch):
    """Every layer still holding merged LoRA weights (UNet ones too) is put back by the Lora extension's own
    network_apply_weights before training, under no_grad (DreamBooth then trains those weights)."""
    import sys

    from tests.test_webui_glue import FakeNetworks

    networks = FakeNetworks(sdxl_model)
    networks.loaded_networks.append("a LoRA the user generated with")
    monkeypatch.setitem(sys.modules, "networks", networks)
    merged = [sdxl_model.model.diffusion_model.out[2], sdxl_model.conditioner.embedders[0]]
    calls = []

    def apply(module):
        calls.append((module, torch.is_grad_enabled()))
        module.network_current_names = ()

    networks.network_apply_weights = apply
    for module in merged:
        module.network_current_names = (("zq", 1.0, 1.0, None),)
    sdxl_webui.host.clear_merged_networks()
    assert networks.loaded_networks == []
    assert calls == [(m, False) for m in sdxl_model.modules() if m in merged]
    assert all(not m.__dict__.pop("network_current_names") for m in merged)
