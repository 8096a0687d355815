"""Regression tests for the reliability defects of issue 9: each was seen failing before its fix.

Saves checked as written, names the WebUI can find, safe .pt reading, Windows names, broken links, exact
resume from master weights, a continuous loss log, a deterministic test-model builder, LoRA targets that
ignore modules other tools attached.
"""

from __future__ import annotations

import pickle
import string
from functools import partial
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_trainer.config import DataConfig
from lib_trainer.data.report import dataset_report
from lib_trainer.data.templates import fill_template, load_template
from lib_trainer.errors import ConfigError, FormatError, TrainerError
from lib_trainer.formats.embedding import read_embedding, save_embedding
from lib_trainer.formats.files import check_name
from lib_trainer.formats.hypernetwork import read_hypernetwork
from lib_trainer.formats.lora import read_network
from lib_trainer.loop.checkpoint import read_sidecar
from lib_trainer.loop.hooks import TrainingHooks
from lib_trainer.methods import hypernetwork as hn
from lib_trainer.methods import lora
from lib_trainer.methods import textual_inversion as ti
from lib_trainer.models.guard import state_fingerprint
from lib_trainer.models.ldm import parts_from_ldm
from lib_trainer.models.text import PROMPT_CONTEXTS, check_prompt_word
from tests.conftest import write_images
from tests.support.fake_webui import FakeEmbeddingDb
from tests.support.models import build_model


class Recorder(TrainingHooks):
    """Warnings, and a stop after a given step (like the Interrupt button)."""

    def __init__(self, stop_after: int = 0):
        self.warnings, self.stop_after, self.step = [], stop_after, 0

    def on_progress(self, progress):
        self.step = progress.step

    def should_stop(self):
        return bool(self.stop_after) and self.step >= self.stop_after

    def on_warning(self, message):
        self.warnings.append(message)


def lora_config(data: Path, **changes) -> lora.LoraConfig:
    train = {"steps": 4, "save_every": 1, "preview_every": 0, "learning_rate": "1e-3", **changes.pop("train", {})}
    network = {"name": "zqnet", "rank": 4, "alpha": 2.0, **changes.pop("network", {})}
    data_config = {"data_dir": str(data), "width": 64, "height": 64, "template": "none"}
    return lora.LoraConfig.from_dict({"network": network, "data": data_config, "train": train, **changes})


# ----- 1. what is written is checked: finite after the cast; the previous file stays -----------------------------


def test_a_lora_that_overflows_fp16_is_refused_and_the_good_file_stays(sd1_model, image_dir, tmp_path):
    parts = parts_from_ldm(sd1_model)
    paths = lora.OutputPaths(tmp_path / "Lora", tmp_path / "log")
    lora.train_lora(lora_config(image_dir, train={"steps": 2}), parts, paths)
    main = paths.lora_dir / "zqnet.safetensors"
    good = main.read_bytes()
    before = state_fingerprint(sd1_model)
    hooks = Recorder()
    explosive = lora_config(image_dir, network={"overwrite": True}, train={"learning_rate": "1e30"})
    with pytest.raises(FormatError, match=r"overflows float16.*network\.save_precision to 'bf16' or 'fp32'") as err:
        lora.train_lora(explosive, parts, paths, hooks)
    assert err.value.field == "network.save_precision"
    assert "nothing was written and the previous file is unchanged" in str(err.value)
    assert main.read_bytes() == good
    for path in [*paths.lora_dir.rglob("*.safetensors"), *paths.log_dir.rglob("*.safetensors")]:
        assert all(torch.isfinite(t.float()).all() for t in read_network(path)[0].values()), path
    assert not list(tmp_path.rglob("*.tmp"))
    after = state_fingerprint(sd1_model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensors_are_never_written(tmp_path, bad):
    vectors = torch.ones(2, 8)
    vectors[1, 3] = bad
    with pytest.raises(FormatError, match="NaN or infinite"):
        save_embedding(tmp_path / "x.safetensors", vectors, {})
    assert list(tmp_path.iterdir()) == []


# ----- 2. names the WebUI could not find in prompts are refused at submit -----------------------------------------

NAME_ALPHABET = string.ascii_letters + string.digits + "-_.!?'~ " + "éü名前" + "🙂🐱" + "\u200b"


@pytest.fixture(scope="module")
def webui_db(sd1_model):
    return FakeEmbeddingDb(sd1_model), parts_from_ldm(sd1_model).text_encoder


def _template_prompts(name: str) -> list[str]:
    lines = load_template("subject_filewords") + load_template("style")
    return [fill_template(line, name, "red, blue") for line in lines]


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=NAME_ALPHABET, min_size=1, max_size=8))
def test_accepted_embedding_names_are_found_by_the_webuis_rule(webui_db, name):
    db, encoder = webui_db
    try:
        check_name(name, "embedding.name")
        check_prompt_word(encoder, name, "embedding.name")
    except ConfigError as exc:
        refused = exc.field
    else:
        refused = None
    if refused is not None:
        assert refused == "embedding.name"
        return
    db.register_embedding_by_name(object(), None, name)
    for prompt in _template_prompts(name):
        assert name in db.found_in(prompt), prompt
    db.ids_lookup.clear()


@pytest.mark.parametrize("name", ["🙂", "cat🙂", "cat!", "x_", "-x", "\u200b", "my(cat)", "a[b]c"])
def test_names_the_webui_cannot_find_are_refused_with_the_reason(webui_db, name):
    db, encoder = webui_db
    with pytest.raises(ConfigError, match=r"would not be recognised|emphasis") as caught:
        check_prompt_word(encoder, name, "embedding.name")
    assert caught.value.field == "embedding.name"
    if set(name) & set("()[]"):
        return
    db.register_embedding_by_name(object(), None, name)
    typed = [context.format(name) for context in PROMPT_CONTEXTS]  # how users type prompts: "red,x,blue"
    assert any(name not in db.found_in(prompt) for prompt in _template_prompts(name) + typed)  # justified
    db.ids_lookup.clear()


def test_an_emoji_name_is_refused_before_training(sd1_model, image_dir, tmp_path):
    config = ti.TextualInversionConfig.from_dict({"embedding": {"name": "🙂"}, "data": {"data_dir": str(image_dir)}})
    paths = ti.OutputPaths(tmp_path / "e", tmp_path / "l")
    with pytest.raises(ConfigError, match="would not be recognised"):
        ti.check(config, parts_from_ldm(sd1_model), paths)
    assert not (tmp_path / "e").exists()


# ----- 4. a .pt that holds other objects is refused by name, never unpickled -------------------------------------


class Payload:
    """Stands for the code a malicious pickle would run: unpickling it would construct this class."""

    def __reduce__(self):
        return (Payload, ())


def _unsafe_pt(path: Path) -> Path:
    with path.open("wb") as fh:
        pickle.dump({"string_to_param": {"*": torch.zeros(1, 32)}, "payload": Payload()}, fh)
    return path


def test_unsafe_pt_for_ti_resume_is_a_clear_error(sd1_model, image_dir, tmp_path):
    source = _unsafe_pt(tmp_path / "evil.pt")
    request = {"embedding": {"name": "zqtoken"}, "data": {"data_dir": str(image_dir)}, "resume_from": str(source)}
    config = ti.TextualInversionConfig.from_dict(request)
    with pytest.raises(FormatError) as caught:
        ti.check(config, parts_from_ldm(sd1_model), ti.OutputPaths(tmp_path / "e", tmp_path / "l"))
    message = str(caught.value)
    assert caught.value.field == "resume_from"
    assert "evil.pt holds Python objects other than tensors" in message
    assert "was not loaded" in message
    assert "weights_only" not in message


def test_unsafe_pt_for_a_hypernetwork_is_a_clear_error(sd1_model, image_dir, tmp_path):
    folder = tmp_path / "hypernetworks"
    folder.mkdir()
    _unsafe_pt(folder / "zqhn.pt")
    request = {"hypernetwork": {"name": "zqhn", "sizes": "32"}, "data": {"data_dir": str(image_dir)}}
    paths = hn.OutputPaths(folder, tmp_path / "l")
    with pytest.raises(FormatError, match="holds Python objects") as caught:
        hn.check(hn.HypernetworkConfig.from_dict(request), parts_from_ldm(sd1_model), paths)
    assert caught.value.field == "hypernetwork.name"
    other = _unsafe_pt(tmp_path / "other.pt")
    with pytest.raises(FormatError, match="holds Python objects") as caught:
        read_hypernetwork(other, "resume_from")
    assert caught.value.field == "resume_from"


def test_a_damaged_pt_says_so(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}}, path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(FormatError, match=r"cut\.pt cannot be read as an embedding"):
        read_embedding(path, "resume_from")


# ----- 6. Windows device names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["CON", "nul", "COM1", "aux.txt", "Lpt9.bak", "con.tar.gz", "PRN", "com²"])
def test_windows_reserved_names_are_refused(name):
    with pytest.raises(ConfigError, match="Windows reserves"):
        check_name(name, "network.name")


@pytest.mark.parametrize("name", ["console", "aux1", "com10", "nullify", "my-con"])
def test_names_that_only_look_reserved_are_fine(name):
    assert check_name(name, "network.name") == name


# ----- 9. broken links and link loops are reported, not skipped silently ------------------------------------------


def test_broken_links_and_loops_are_in_the_report_and_the_warnings(sd1_model, tmp_path):
    data = write_images(tmp_path / "data", 2)
    (data / "gone.png").symlink_to(tmp_path / "missing.png")
    (data / "loop-a.png").symlink_to(data / "loop-b.png")
    (data / "loop-b.png").symlink_to(data / "loop-a.png")
    (data / "3_dogs").symlink_to(tmp_path / "no-such-folder")
    report = dataset_report(DataConfig(data_dir=str(data), width=64, height=64))
    reasons = {item["file"]: item["reason"] for item in report["unreadable"]}
    assert "broken symbolic link" in reasons["gone.png"]
    assert "missing.png" in reasons["gone.png"]
    assert "symbolic link loop" in reasons["loop-a.png"]
    assert "symbolic link loop" in reasons["loop-b.png"]
    assert "broken symbolic link" in reasons["3_dogs"]
    hooks = Recorder()
    config = ti.TextualInversionConfig.from_dict(
        {
            "embedding": {"name": "zqtoken"},
            "data": {"data_dir": str(data), "width": 64, "height": 64},
            "train": {"steps": 1, "save_every": 0, "preview_every": 0},
        }
    )
    ti.train_embedding(config, parts_from_ldm(sd1_model), ti.OutputPaths(tmp_path / "e", tmp_path / "l"), hooks)
    assert "4 file(s)" in hooks.warnings[0]
    assert "gone.png" in hooks.warnings[0]


# ----- 10/11. exact resume from master weights; the loss log continues --------------------------------------------


def _master_and_file(paths: lora.OutputPaths) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    main = paths.lora_dir / "zqnet.safetensors"
    return read_sidecar(main).params, read_network(main)[0]


@pytest.mark.parametrize("optimizer", ["adamw", "lion", "prodigy", "adamw_schedulefree"])
def test_lora_resume_is_bit_exact_although_the_file_is_fp16(sd1_model, image_dir, tmp_path, optimizer):
    """Schedule-free AdamW saves its averaged point and converts back on resume: equal to float rounding only."""
    parts = parts_from_ldm(sd1_model)
    rate = "1.0" if optimizer == "prodigy" else "1e-3"
    train_section = {"steps": 6, "optimizer": optimizer, "learning_rate": rate}
    changes = {"network": {"dropout": 0.2, "rank_dropout": 0.1, "overwrite": True}, "train": train_section}
    straight = lora.OutputPaths(tmp_path / "a" / "Lora", tmp_path / "a" / "log")
    lora.train_lora(lora_config(image_dir, **changes), parts, straight)
    split = lora.OutputPaths(tmp_path / "b" / "Lora", tmp_path / "b" / "log")
    lora.train_lora(lora_config(image_dir, **changes), parts, split, Recorder(stop_after=3))
    main = split.lora_dir / "zqnet.safetensors"
    resumed = lora.train_lora(lora_config(image_dir, resume_from=str(main), **changes), parts, split)
    assert resumed.start_step == 3
    (a_master, a_file), (b_master, b_file) = _master_and_file(straight), _master_and_file(split)
    same = torch.equal if optimizer != "adamw_schedulefree" else partial(torch.allclose, rtol=1e-5, atol=1e-7)
    assert all(same(x, y) for x, y in zip(a_master, b_master, strict=True))
    assert a_file.keys() == b_file.keys()
    if optimizer != "adamw_schedulefree":  # fp16 rounding may flip on a 1e-7 difference
        assert all(torch.equal(a_file[k], b_file[k]) for k in a_file)


def test_a_kill_between_the_resume_state_and_the_file_continues_from_the_complete_save(sd1_model, image_dir, tmp_path):
    """Sidecar and numbered copy of step 3 written, the main file still step 2's: continue from step 3."""
    parts = parts_from_ldm(sd1_model)
    straight = lora.OutputPaths(tmp_path / "a" / "Lora", tmp_path / "a" / "log")
    lora.train_lora(lora_config(image_dir, train={"steps": 5}), parts, straight)
    split = lora.OutputPaths(tmp_path / "b" / "Lora", tmp_path / "b" / "log")
    main, saved_files = split.lora_dir / "zqnet.safetensors", {}

    class KeepFiles(Recorder):
        def on_saved(self, path, step):
            if path == main:
                saved_files[step] = main.read_bytes()

    lora.train_lora(lora_config(image_dir, train={"steps": 5}), parts, split, KeepFiles(stop_after=3))
    main.write_bytes(saved_files[2])  # as if killed after the sidecar of step 3, before its main file
    hooks = Recorder()
    resumed = lora.train_lora(
        lora_config(image_dir, resume_from=str(main), network={"overwrite": True}, train={"steps": 5}),
        parts,
        split,
        hooks,
    )
    assert resumed.start_step == 3
    assert "continuing from step 3" in hooks.warnings[0]
    a, b = _master_and_file(straight), _master_and_file(split)
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True))
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_a_sidecar_of_another_file_is_not_used(sd1_model, image_dir, tmp_path):
    parts = parts_from_ldm(sd1_model)
    paths = lora.OutputPaths(tmp_path / "Lora", tmp_path / "log")
    lora.train_lora(lora_config(image_dir, train={"steps": 2}), parts, paths)
    main = paths.lora_dir / "zqnet.safetensors"
    tensors, meta = read_network(main)
    safetensors.torch.save_file({k: v * 2 for k, v in tensors.items()}, str(main), metadata=meta)  # user's file
    resumed = lora.train_lora(
        lora_config(image_dir, resume_from=str(main), network={"overwrite": True}, train={"steps": 3}), parts, paths
    )
    assert resumed.start_step == 2  # from the file (its own step), without the unrelated optimizer state


def test_the_loss_log_continues_from_the_resumed_step(sd1_model, image_dir, tmp_path):
    parts = parts_from_ldm(sd1_model)
    paths = ti.OutputPaths(tmp_path / "e", tmp_path / "l")
    config = ti.TextualInversionConfig.from_dict(
        {
            "embedding": {"name": "zqtoken"},
            "data": {"data_dir": str(image_dir), "width": 64, "height": 64},
            "train": {"steps": 6, "save_every": 2, "preview_every": 0},
        }
    )
    ti.train_embedding(config, parts, paths, Recorder(stop_after=4))
    log = paths.log_dir / "zqtoken" / "loss.csv"
    with log.open("a") as fh:  # a killed run logged steps 5 and 6 but never saved them
        fh.write("5,0.1,0.005,1.0\n6,0.1,0.005,1.0\n")
    ti.train_embedding(config, parts, paths)
    steps = [int(line.split(",")[0]) for line in log.read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]


# ----- 12. the test-model builder is deterministic whatever is on disk --------------------------------------------


def test_the_model_builder_gives_the_same_model_whatever_is_on_disk(tmp_path):
    first = state_fingerprint(build_model("sd1", "tiny", tmp_path / "work"))
    again = state_fingerprint(build_model("sd1", "tiny", tmp_path / "work"))  # the folder exists now
    fresh = state_fingerprint(build_model("sd1", "tiny", tmp_path / "other"))
    assert first.keys() == again.keys() == fresh.keys()
    assert all(torch.equal(first[k], again[k]) and torch.equal(first[k], fresh[k]) for k in first)
    other_seed = state_fingerprint(build_model("sd1", "tiny", tmp_path / "work", seed=1))
    assert any(not torch.equal(first[k], other_seed[k]) for k in first)


# ----- 13. LoRA targets are the model's own modules, not children other tools attached ----------------------------


def test_foreign_children_on_attention_layers_are_not_trained(tmp_path, image_dir):
    model = build_model("sd1", "layout", tmp_path / "models")
    parts = parts_from_ldm(model)
    clean = set(lora.network_tensors(lora.build_network(lora.NetworkConfig(name="x", rank=4), parts), parts))
    for module in list(model.model.diffusion_model.modules()):
        if hasattr(module, "to_k") and hasattr(module, "to_v"):  # what the WebUI's hypernetwork trainer leaves
            width = module.to_k.in_features
            module.hyper_k = torch.nn.Sequential(torch.nn.Linear(width, width))
            module.hyper_v = torch.nn.Sequential(torch.nn.Linear(width, width))
    paths = lora.OutputPaths(tmp_path / "Lora", tmp_path / "log")
    lora.train_lora(lora_config(image_dir, train={"steps": 1}), parts, paths)
    keys = set(read_network(paths.lora_dir / "zqnet.safetensors")[0])
    assert keys == clean
    assert not any("hyper" in k for k in keys)


def test_a_target_without_a_file_name_fails_before_the_first_step(sd1_model, monkeypatch, image_dir, tmp_path):
    monkeypatch.setattr(lora, "unet_key_table", lambda unet: {})  # a UNet layout no kohya name exists for
    steps = []

    class Steps(Recorder):
        def on_progress(self, progress):
            steps.append(progress.step)

    paths, parts = lora.OutputPaths(tmp_path / "Lora", tmp_path / "log"), parts_from_ldm(sd1_model)
    with pytest.raises(TrainerError, match=r"the UNet module input_blocks\.\S+ has no kohya LoRA file name"):
        lora.train_lora(lora_config(image_dir), parts, paths, Steps())
    assert steps == []
