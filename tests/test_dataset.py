"""Buckets (hypothesis properties), kohya repeat folders, caption options, flip, and the dataset report."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lib_trainer.config import DataConfig
from lib_trainer.data.buckets import BucketSpec, assign_bucket, make_buckets
from lib_trainer.data.dataset import LatentCache, PromptMaker, Sample, epoch_batches, scan_folder
from lib_trainer.data.report import dataset_report
from lib_trainer.models.parts import LatentEncoder

specs = st.builds(
    BucketSpec,
    width=st.sampled_from([256, 512, 768, 1024]),
    height=st.sampled_from([256, 512, 768, 1024]),
    min_side=st.sampled_from([128, 256, 320]),
    max_side=st.sampled_from([1024, 1536, 2048]),
    step=st.sampled_from([64, 128]),
    no_upscale=st.booleans(),
)
sizes = st.tuples(st.integers(1, 12000), st.integers(1, 12000))


@settings(max_examples=200, deadline=None)
@given(spec=specs)
def test_buckets_respect_step_sides_and_area(spec):
    buckets = make_buckets(spec)
    first = -(-spec.min_side // spec.step) * spec.step
    if first**2 > spec.area or first > spec.max_side:  # nothing fits: the training size is the only bucket
        assert buckets == [(spec.width, spec.height)]
        return
    for w, h in buckets:
        assert w % spec.step == 0
        assert h % spec.step == 0
        assert spec.min_side <= min(w, h)
        assert max(w, h) <= spec.max_side
        assert w * h <= spec.area


@settings(max_examples=300, deadline=None)
@given(spec=specs, size=sizes)
def test_assignment_picks_the_nearest_aspect_and_never_upscales_when_asked(spec, size):
    buckets = make_buckets(spec)
    bucket = assign_bucket(size, buckets, spec)
    assert bucket[0] % spec.step == 0
    assert bucket[1] % spec.step == 0
    if spec.no_upscale and size[0] * size[1] < spec.area:
        assert bucket[0] <= max(spec.step, size[0])
        assert bucket[1] <= max(spec.step, size[1])
        return
    error = abs(math.log(bucket[0] / bucket[1]) - math.log(size[0] / size[1]))
    assert all(error <= abs(math.log(w / h) - math.log(size[0] / size[1])) + 1e-12 for w, h in buckets)
    ratios = sorted(math.log(w / h) for w, h in buckets)
    inside = ratios[0] <= math.log(size[0] / size[1]) <= ratios[-1]
    widest_gap = max((b - a for a, b in itertools.pairwise(ratios)), default=0.0)
    if inside:
        assert error <= widest_gap / 2 + 1e-12


def write(path: Path, size: tuple[int, int], caption: str | None = None, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(len(str(path))).random((size[1], size[0], 3)) * 255).astype("uint8")
    Image.fromarray(pixels).convert(mode).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def test_repeat_folders_buckets_and_batches(tmp_path):
    write(tmp_path / "wide.png", (400, 200), "wide, sky")
    write(tmp_path / "3_sks dog" / "a.png", (200, 400))
    write(tmp_path / "3_sks dog" / "b.png", (210, 400), "dog, grass")
    write(tmp_path / "ignored" / "c.png", (200, 200), "not a repeat folder")
    config = DataConfig(
        data_dir=str(tmp_path), width=256, height=256, buckets=True, bucket_min_side=128, bucket_max_side=512
    )
    samples = scan_folder(config).samples
    by_name = {s.path.name: s for s in samples}
    assert sorted(by_name) == ["a.png", "b.png", "wide.png"]
    assert by_name["a.png"].repeats == 3
    assert by_name["a.png"].folder_caption == "sks dog"
    assert by_name["wide.png"].size[0] > by_name["wide.png"].size[1]
    assert by_name["a.png"].size == by_name["b.png"].size
    assert by_name["a.png"].size[1] > by_name["a.png"].size[0]
    batches = epoch_batches(samples, 2, random.Random(0))
    assert sorted(i for batch in batches for i in batch) == sorted([0, 1, 1, 1, 2, 2, 2])  # 1 + 3 + 3 with repeats
    for batch in batches:
        assert len({samples[i].size for i in batch}) == 1
    prompt = PromptMaker(["[filewords]"], "zq", config, random.Random(0)).prompt(by_name["a.png"])
    assert prompt == "sks dog"  # the folder's class tokens stand in for a missing caption


def test_caption_dropout_and_trigger_word(tmp_path):
    sample = Sample(tmp_path / "x.png", "red, blue", torch.zeros(3, 64, 64))
    config = DataConfig(data_dir=str(tmp_path), trigger_word="zqstyle", caption_dropout=0.5)
    maker = PromptMaker(["a photo, [filewords]"], "zq", config, random.Random(1))
    prompts = {maker.prompt(sample) for _ in range(40)}
    assert prompts == {"a photo, zqstyle, red, blue", "a photo, zqstyle"}


def mirror_encoder() -> LatentEncoder:
    def encode(images):
        mean = images[:, :, ::8, ::8].repeat(1, 2, 1, 1)[:, :4]
        return mean, torch.zeros_like(mean)

    return LatentEncoder(encode, scale_factor=1.0)


def test_flip_caches_both_orientations():
    pixels = torch.rand(3, 64, 64) * 2 - 1
    cache = LatentCache(
        [Sample(Path("a.png"), "", pixels)], mirror_encoder(), "deterministic", torch.Generator(), flip=True
    )
    seen = {tuple(cache.latents([0], torch.Generator().manual_seed(s))[0, 0, 0].tolist()) for s in range(20)}
    plain = tuple(pixels[:1, ::8, ::8][0, 0].tolist())
    mirrored = tuple(torch.flip(pixels, dims=[2])[:1, ::8, ::8][0, 0].tolist())
    assert seen == {plain, mirrored}


def test_report_lists_bad_files_without_touching_them(tmp_path):
    write(tmp_path / "ok.png", (256, 256), "red, blue")
    write(tmp_path / "gray16.png", (256, 256))
    Image.new("I;16", (300, 300), 30000).save(tmp_path / "gray16.png")
    Image.new("CMYK", (300, 300), (10, 20, 30, 0)).save(tmp_path / "cmyk.jpg")
    palette = Image.new("P", (300, 300))
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png")
    write(tmp_path / "tiny.png", (1, 1), "tiny")
    write(tmp_path / "strip.png", (12000, 50), "strip")
    (tmp_path / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (200, 200), "red").save(tmp_path / "cut.jpg", quality=95)
    raw = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    write(tmp_path / "latin.png", (256, 256))
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    config = DataConfig(
        data_dir=str(tmp_path), width=256, height=256, buckets=True, bucket_min_side=64, bucket_max_side=1024
    )
    report = dataset_report(config, count_tokens=lambda text: len(text.split(",")) * 40)
    assert report["images"] == 6  # ok, gray16, cmyk, palette, tiny, strip
    assert sorted(u["file"] for u in report["unreadable"]) == ["cut.jpg", "empty.jpg", "latin.txt"]
    assert {t["file"] for t in report["too_small"]} >= {"tiny.png"}
    assert "cmyk.jpg" in report["missing_captions"]
    assert report["tag_frequency"][tmp_path.name]["red"] == 1
    assert sum(report["buckets"].values()) == 6
    assert [o["file"] for o in report["over_length_captions"]] == ["ok.png"]  # 2 tags x 40 > 75
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_alpha_mask_weights_the_loss(tmp_path, sd1_model):
    from lib_trainer.models.diffusion import DiffusionObjective
    from lib_trainer.models.ldm import parts_from_ldm

    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, 32:, 3] = 255  # right half opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    (tmp_path / "cutout.txt").write_text("object")
    sample = scan_folder(DataConfig(data_dir=str(tmp_path), width=64, height=64, alpha_mask=True)).samples[0]
    assert sample.mask.shape == (1, 8, 8)
    assert sample.mask[0, :, :4].max() == 0
    assert sample.mask[0, :, 4:].min() == 1

    parts = parts_from_ldm(sd1_model)
    latents = torch.randn(1, 4, 8, 8)
    cond = parts.text_encoder.encode(["object"]).detach()

    def loss(mask):
        with torch.no_grad():
            return DiffusionObjective().loss(parts, latents, cond, torch.Generator().manual_seed(0), mask=mask)

    full, ones, half = loss(None), loss(torch.ones(1, 1, 8, 8)), loss(sample.mask.unsqueeze(0))
    torch.testing.assert_close(full, ones)
    assert not torch.allclose(full, half)


def test_regularisation_images_keep_their_captions_and_weight(tmp_path):
    write(tmp_path / "data" / "me.png", (64, 64), "photo of me")
    write(tmp_path / "reg" / "1_person" / "r1.png", (64, 64))
    write(tmp_path / "reg" / "1_person" / "r2.png", (64, 64), "a woman")
    config = DataConfig(
        data_dir=str(tmp_path / "data"),
        reg_dir=str(tmp_path / "reg"),
        width=64,
        height=64,
        prior_loss_weight=0.5,
        trigger_word="zq",
    )
    samples = scan_folder(config).samples
    regs = [s for s in samples if s.is_reg]
    assert [s.path.name for s in regs] == ["r1.png", "r2.png"]
    assert {s.loss_weight for s in regs} == {0.5}
    maker = PromptMaker(["photo, [filewords]"], "zq", config, random.Random(0))
    assert [maker.prompt(s) for s in samples] == ["photo, zq, photo of me", "person", "a woman"]

    from lib_trainer.data.dataset import TrainingBatches

    cache = LatentCache(samples, mirror_encoder(), "deterministic", torch.Generator())
    batches = TrainingBatches(samples, cache, maker, 3, 0)
    _latents, _prompts, extras = batches.next_batch()
    assert sorted(extras["weights"].tolist()) == [0.5, 0.5, 1.0]


def test_disk_latent_cache_is_reused_and_keyed_by_model(tmp_path):
    from lib_trainer.data.latent_store import LatentStore

    calls = []
    encoder = mirror_encoder()
    counting = LatentEncoder(lambda images: calls.append(len(images)) or encoder.encode(images), 1.0)
    path = write(tmp_path / "a.png", (64, 64), "x")
    samples = [Sample(path, "x", torch.rand(3, 64, 64) * 2 - 1)]
    first = LatentCache(samples, counting, "deterministic", torch.Generator(), store=LatentStore(tmp_path / "c", "m1"))
    second = LatentCache(samples, counting, "deterministic", torch.Generator(), store=LatentStore(tmp_path / "c", "m1"))
    assert calls == [1]
    assert torch.equal(first.mean[0], second.mean[0])
    LatentCache(samples, counting, "deterministic", torch.Generator(), store=LatentStore(tmp_path / "c", "m2"))
    assert calls == [1, 1]
    assert len(list((tmp_path / "c").iterdir())) == 2
