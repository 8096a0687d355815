"""Dataset pieces: image loading, captions, tags, templates, latent sampling."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from lib_trainer.config import DataConfig
from lib_trainer.data.captions import augment_tags, caption_from_filename, read_caption
from lib_trainer.data.dataset import LatentCache, Sample, scan_folder
from lib_trainer.data.images import load_rgb, resize_crop
from lib_trainer.data.templates import builtin_templates, fill_template, load_template
from lib_trainer.models.parts import LatentEncoder


def test_shipped_templates():
    assert builtin_templates() == ["hypernetwork", "none", "style", "style_filewords", "subject", "subject_filewords"]
    uses_filewords = {"hypernetwork", "none", "style_filewords", "subject_filewords"}
    for name in builtin_templates():
        lines = load_template(name)
        assert lines
        assert all("[name]" in line for line in lines) == (name != "hypernetwork")
        assert all("[filewords]" in line for line in lines) == (name in uses_filewords)


@pytest.mark.parametrize(
    ("line", "caption", "expected"),
    [
        ("a photo of [name], [filewords]", "red, blue", "a photo of zq, red, blue"),
        ("a photo of [name], [filewords]", "", "a photo of zq"),
        ("[filewords], art by [name]", "", "art by zq"),
        ("[name]", "ignored", "zq"),
    ],
)
def test_fill_template(line, caption, expected):
    assert fill_template(line, "zq", caption) == expected


def test_tag_shuffle_keeps_the_first_tags_and_drops_none_at_zero():
    rng = random.Random(0)
    caption = "keep1, keep2, a, b, c, d, e"
    for _ in range(20):
        tags = augment_tags(caption, rng, shuffle=True, keep=2, dropout=0.0).split(", ")
        assert tags[:2] == ["keep1", "keep2"]
        assert sorted(tags[2:]) == ["a", "b", "c", "d", "e"]
    dropped = [augment_tags(caption, rng, shuffle=False, keep=2, dropout=0.5) for _ in range(50)]
    assert all(d.startswith("keep1, keep2") for d in dropped)
    assert any(len(d.split(", ")) < 7 for d in dropped)


def test_captions(tmp_path: Path):
    image = tmp_path / "0012-my_cat.png"
    assert read_caption(image, ".txt") is None
    assert caption_from_filename(image) == "my cat"
    image.with_suffix(".txt").write_text("\ufefffirst line\nsecond line\n", encoding="utf-8")
    assert read_caption(image, ".txt") == "first line"
    image.with_suffix(".caption").write_bytes(b"\xff\xfe bad")
    with pytest.raises(UnicodeDecodeError):
        read_caption(image, ".caption")


def test_exif_orientation_modes_and_crop(tmp_path: Path):
    img = Image.new("RGB", (40, 20), "red")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_rgb(tmp_path / "rot.jpg").size == (20, 40)
    Image.new("LA", (10, 10)).save(tmp_path / "la.png")
    Image.new("I;16", (10, 10), 40000).save(tmp_path / "deep.png")
    Image.new("CMYK", (10, 10)).save(tmp_path / "cmyk.jpg")
    for name in ("la.png", "deep.png", "cmyk.jpg"):
        assert load_rgb(tmp_path / name).mode == "RGB"
    assert resize_crop(Image.new("RGB", (300, 100)), 64, 128).size == (64, 128)


def test_scan_reports_unreadable_files_and_bad_captions(tmp_path: Path):
    Image.new("RGB", (64, 64)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"")
    Image.new("RGB", (64, 64)).save(tmp_path / "latin.png")
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "readme.md").write_text("not an image")
    result = scan_folder(DataConfig(data_dir=str(tmp_path), width=64, height=64))
    assert [s.path.name for s in result.samples] == ["good.png"]
    assert sorted(p.name for p, _ in result.problems) == ["bad.png", "latin.txt"]


def fake_encoder() -> LatentEncoder:
    def encode(images):
        mean = images[:, :, ::8, ::8].repeat(1, 2, 1, 1)[:, :4]
        return mean, torch.ones_like(mean)

    return LatentEncoder(encode, scale_factor=0.5)


@pytest.mark.parametrize("method", ["once", "deterministic", "random"])
def test_latent_sampling(method):
    samples = [Sample(Path(f"{i}.png"), "", torch.rand(3, 64, 64) * 2 - 1) for i in range(3)]
    cache = LatentCache(samples, fake_encoder(), method, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    a, b = cache.latents([0, 1], gen), cache.latents([0, 1], gen)
    assert a.shape == (2, 4, 8, 8)
    assert torch.equal(a, b) == (method != "random")
    mean = samples[0].pixels[:, ::8, ::8].repeat(2, 1, 1)[:4] * 0.5
    assert torch.equal(a[0], mean) == (method == "deterministic")
