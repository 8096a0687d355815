"""The Trainer tab's own logic: tooltips, presets, job export/import, the dataset report, the job panel, and the
tab's event handlers run as gradio would run them (on the fake host)."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from lib_trainer.config import to_dict
from lib_trainer.errors import ConfigError, FormatError, TrainerError
from lib_trainer.presets import (
    PURPOSES,
    builtin_preset,
    complete_config,
    config_from_kohya,
    import_job,
    job_from_metadata,
    load_user_preset,
    merge,
    save_job,
    user_presets,
)
from lib_trainer.webui.form import CONCEPT_ROWS, FORMS, row_path, to_config_dict, to_form_values
from lib_trainer.webui.jobs import METHODS
from lib_trainer.webui.tips import ADVANCED, TIPS
from tests.test_webui_glue import PREVIEW, ti_request

TRAINED = [m for m in FORMS if m != "preprocess"]
NAMES = {
    "textual_inversion": {"embedding": {"name": "zq"}},
    "lora": {"network": {"name": "zq"}},
    "hypernetwork": {"hypernetwork": {"name": "zq"}},
    "dreambooth": {"dreambooth": {"name": "zq"}},
    "embedding_finetune": {"finetune": {"name": "zq", "tokens": "cat"}},
}


def test_every_setting_has_a_tooltip_and_advanced_names_real_fields():
    paths = {f.path for _, fields in FORMS.values() for f in fields}
    assert not sorted(p for p in paths if not (TIPS.get(p) or "").strip())
    assert paths >= ADVANCED
    assert all(len(tip) <= 120 for tip in TIPS.values())  # a tooltip, not a manual


@pytest.mark.parametrize("method", TRAINED)
@pytest.mark.parametrize("purpose", PURPOSES)
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_builtin_presets_give_valid_configs(method, purpose, family, tmp_path):
    preset = builtin_preset(method, purpose, family)
    whole = complete_config(METHODS[method].config, method, preset)  # what the tab checks before showing it
    assert {k: v for k, v in whole.items() if k in preset} != {}
    named = merge(preset, NAMES[method])
    named = merge(
        named,
        {"data": {"data_dir": str(tmp_path)}}
        if method != "dreambooth"
        else {"concepts": [{"instance_dir": str(tmp_path)}]},
    )
    config = METHODS[method].config.from_dict(named)
    assert config.train.steps == preset["train"]["steps"]
    if "width" in getattr(config.data, "__dataclass_fields__", {}):
        assert config.data.width == {"sd1": 512, "sd2": 768, "sdxl": 1024}[family]
    # shown in the form and submitted back, the preset is the same config
    values = to_form_values(to_dict(config), method)
    assert METHODS[method].config.from_dict(to_config_dict(values, FORMS[method][1])) == config


def test_unknown_presets_are_refused():
    with pytest.raises(ConfigError, match="Character / person"):
        builtin_preset("lora", "Landscapes")
    with pytest.raises(ConfigError, match="presets exist for"):
        builtin_preset("preprocess", "Style")


def test_dreambooth_concept_rows_fill_the_form_and_come_back(tmp_path):
    cls, fields = FORMS["dreambooth"]
    concepts = [
        {"instance_dir": str(tmp_path / "a"), "instance_prompt": "zq dog"},
        {"instance_dir": str(tmp_path / "b")},
    ]
    config = cls.from_dict({"dreambooth": {"name": "zq"}, "concepts": concepts})
    whole = complete_config(cls, "dreambooth", {"train": {"steps": 7}})  # nothing named yet: stays empty
    assert whole["concepts"] == []
    assert whole["dreambooth"]["name"] == ""
    assert whole["train"]["steps"] == 7
    values = to_form_values(to_dict(config), "dreambooth")
    assert values["concepts.0.instance_prompt"] == "zq dog"
    assert values[row_path("concepts[].instance_dir", CONCEPT_ROWS - 1)] == ""  # later rows are cleared
    assert cls.from_dict(to_config_dict(values, fields)) == config


def test_user_presets_and_exported_jobs_round_trip(tmp_path):
    job = {"method": "lora", "config": {"network": {"name": "zq", "rank": 4}}, "preview": PREVIEW}
    path = save_job(tmp_path, "my lora", job)
    assert path == tmp_path / "my lora.json"
    assert user_presets(tmp_path) == ["my lora"]
    assert load_user_preset(tmp_path, "my lora") == job
    assert import_job(str(path)) == job
    assert import_job(json.dumps(job)) == job
    with pytest.raises(ConfigError, match="exists"):
        save_job(tmp_path, "my lora", job, overwrite=False)
    for bad in ("../up", "a/b", "", "con"):
        with pytest.raises(ConfigError):
            save_job(tmp_path, bad, job)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my lora.json"]  # nothing else, no temporaries


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "nothing to import"),
        ("{not json", "not valid JSON"),
        ('{"config": {}}', "needs 'method' and 'config'"),
        ('{"method": "dance", "config": {}}', "unknown"),
        ('{"method": "lora", "config": []}', "must be an object"),
        ("/no/such/file.json", "neither JSON nor an existing file"),
    ],
)
def test_bad_imports_say_what_is_wrong(source, message):
    with pytest.raises(TrainerError, match=message):
        import_job(source)


def test_import_reads_a_trained_files_own_config(tmp_path):
    import torch
    from safetensors.torch import save_file

    config = METHODS["lora"].config.from_dict(
        {"network": {"name": "zq", "rank": 8, "algo": "locon"}, "data": {"data_dir": str(tmp_path)}}
    )
    meta = {
        "ss_network_dim": "8",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "trainer_config": json.dumps(to_dict(config)),
    }
    save_file({"x": torch.zeros(1)}, str(tmp_path / "zq.safetensors"), metadata=meta)
    job = import_job(str(tmp_path / "zq.safetensors"))
    assert job["method"] == "lora"
    assert METHODS["lora"].config.from_dict(job["config"]) == config
    embedding = {
        "modelspec.architecture": "stable-diffusion-v1/textual-inversion",
        "trainer_config": json.dumps(
            to_dict(
                METHODS["textual_inversion"].config.from_dict(
                    {"embedding": {"name": "zq"}, "data": {"data_dir": str(tmp_path)}}
                )
            )
        ),
    }
    assert job_from_metadata(embedding, "zq.safetensors")["method"] == "textual_inversion"
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FormatError, match="no training settings"):
        import_job(str(tmp_path / "plain.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(FormatError, match="not a readable"):
        import_job(str(tmp_path / "broken.safetensors"))


def test_kohya_metadata_becomes_a_lora_config():
    meta = {
        "ss_network_dim": "32",
        "ss_network_alpha": "16.0",
        "ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "4", "algo": "lokr"}),
        "ss_learning_rate": "0.0001",
        "ss_unet_lr": "0.0002",
        "ss_text_encoder_lr": "5e-05",
        "ss_max_train_steps": "1600",
        "ss_resolution": "(768, 640)",
        "ss_lr_scheduler": "cosine_with_restarts",
        "ss_lr_warmup_steps": "100",
        "ss_noise_offset": "0.05",
        "ss_min_snr_gamma": "5.0",
        "ss_clip_skip": "2",
        "ss_seed": "42",
        "ss_enable_bucket": "True",
        "ss_flip_aug": "False",
        "ss_shuffle_caption": "True",
        "ss_keep_tokens": "1",
        "ss_batch_size_per_device": "2",
        "ss_gradient_checkpointing": "True",
        "ss_output_name": "kohya_run",
        "ss_network_dropout": "None",
    }
    whole = complete_config(METHODS["lora"].config, "lora", config_from_kohya(meta))
    config = METHODS["lora"].config.from_dict({**whole, "data": {**whole["data"], "data_dir": "photos"}})
    net, train, data = config.network, config.train, config.data
    assert (net.name, net.algo, net.rank, net.alpha, net.conv_rank, net.conv_alpha) == (
        "kohya_run",
        "lokr",
        32,
        16.0,
        8,
        4.0,
    )
    assert net.train_text_encoder
    assert net.text_encoder_lr == 5e-5
    assert (train.learning_rate, train.steps, train.lr_schedule, train.lr_warmup_steps) == (
        "0.0002",
        1600,
        "cosine_with_restarts",
        100,
    )
    assert (train.noise_offset, train.min_snr_gamma, train.clip_skip, train.seed) == (0.05, 5.0, 2, 42)
    assert (train.batch_size, train.gradient_checkpointing) == (2, True)
    assert (data.width, data.height, data.buckets, data.flip, data.shuffle_tags, data.keep_tags) == (
        768,
        640,
        True,
        False,
        True,
        1,
    )
    minimal = METHODS["lora"].config.from_dict(
        merge(
            config_from_kohya({"ss_network_dim": "4", "ss_resolution": "512"}),
            {"data": {"data_dir": "photos"}, "network": {"name": "k"}},
        )
    )
    assert (minimal.network.rank, minimal.network.alpha, minimal.data.width) == (4, 4.0, 512)


def test_dataset_report_is_readable_html():
    from lib_trainer.webui.ui import format_report

    report = {
        "images": 12,
        "images_with_repeats": 30,
        "folders": {"5_zq": {"img_count": 6, "n_repeats": 5}},
        "buckets": {"512x512": 8, "448x576": 4},
        "tag_frequency": {"5_zq": {"zq": 6, "smile": 2, "<b>": 1}},
        "missing_captions": ["a.png"],
        "too_small": [],
        "over_length_captions": [{"file": "b.png", "tokens": 90}],
        "unreadable": [],
    }
    page = format_report(report)
    assert "<b>12</b> images" in page
    assert "<b>30</b> per epoch" in page
    assert "width:100%" in page
    assert "width:50%" in page
    assert page.index("<td>zq</td>") < page.index("<td>smile</td>")  # tags by frequency
    assert "&lt;b&gt;" in page
    assert "<td><b></td>" not in page
    assert "No caption (1)" in page
    assert "b.png (90)" in page
    assert "No problems" not in page
    clean = dict(report, missing_captions=[], over_length_captions=[], tag_frequency={}, buckets={})
    assert "No problems found" in format_report(clean)


def test_job_list_survives_a_new_page_without_the_full_api(webui):
    from tests.conftest import make_client

    webui.shared.cmd_opts.api = False  # the panel needs no --api
    job = webui.manager.submit("textual_inversion", ti_request(webui.data), PREVIEW)
    webui.manager.wait(job.id)
    listed = make_client(webui).get("/trainer/v1/jobs").json()["jobs"]  # a new page: nothing but the server's list
    (entry,) = [j for j in listed if j["id"] == job.id]
    assert entry["state"] == "done"
    assert entry["step"] == 4
    assert entry["loss"] is not None
    assert entry["history"] == []  # the list carries no loss histories; a job's own route does
    assert entry["output_dir"] == str(webui.root / "embeddings")
    assert entry["finished_at"] > 0
    assert any(s["path"].endswith("zqtoken.safetensors") for s in entry["saved"])
    importlib.import_module("lib_trainer.webui.entry")._manager = None


def handler(tab, elem_id: str, event: str = "click"):
    """The Python function gradio runs for ``event`` on the block with ``elem_id``, and its outputs' elem_ids."""
    ids = {block_id: getattr(block, "elem_id", None) for block_id, block in tab.blocks.items()}
    for dependency, fn in zip(tab.dependencies, tab.fns, strict=True):
        if dependency["trigger"] == event and any(ids.get(t) == elem_id for t in dependency["targets"]):
            return fn.fn, [ids[o] for o in dependency["outputs"]], [ids[i] for i in dependency["inputs"]]
    raise AssertionError(f"no {event} handler on {elem_id}")


@pytest.fixture
def tab(webui):
    pytest.importorskip("gradio")
    entry = importlib.import_module("lib_trainer.webui.entry")
    entry._manager = webui.manager
    ((tab, _, _),) = entry.on_ui_tabs()
    yield tab
    entry._manager = None


def form_values(tab, inputs: list) -> list:
    """The controls' current values, in the order a handler takes them."""
    by_id = {getattr(b, "elem_id", None): b for b in tab.blocks.values()}
    return [getattr(by_id[i], "value", None) for i in inputs]


def test_tab_trains_the_selected_method_and_the_job_panel_acts(tab, webui):
    train, outputs, inputs = handler(tab, "trainer_train")
    assert outputs == ["trainer_job_id", "trainer_status"]
    values = form_values(tab, inputs[1:])
    by_input = dict(zip(inputs[1:], values, strict=True))
    values = [
        {
            "trainer_textual_inversion_embedding_name": "zqtab",
            "trainer_textual_inversion_data_data_dir": str(webui.data),
            "trainer_textual_inversion_train_steps": 2,
            "trainer_textual_inversion_train_preview_every": 0,
            "trainer_textual_inversion_data_width": 64,
            "trainer_textual_inversion_data_height": 64,
        }.get(i, by_input[i])
        for i in inputs[1:]
    ]
    job_id, message = train("textual_inversion", *values)
    assert "queued" in message
    job = webui.manager.wait(job_id)
    assert job.state == "done", job.error
    act, act_out, _ = handler(tab, "trainer_job_action_button")
    assert act_out == ["trainer_status", "trainer_job_id"]
    message, grid_id = act(f"grid:{job_id}")  # "Test it" in the job panel: the grid job is shown next
    assert "Test grid" in message
    assert webui.manager.wait(grid_id).state == "done"
    render, render_out, _ = handler(tab, "trainer_test_grid")
    assert render_out == ["trainer_job_id", "trainer_status"]
    again, _ = render(grid_id, "1", 2)  # from a shown grid: a grid of its source job
    assert webui.manager.get(again).config.job == job_id
    webui.manager.wait(again)
    assert act(f"open:{job_id}")[0].startswith("Opened")
    assert webui.shared.opened == [str(webui.root / "embeddings")]
    webui.shared.cmd_opts.hide_ui_dir_config = True
    assert "turned off" in act(f"open:{job_id}")[0]
    assert len(webui.shared.opened) == 1
    assert "no longer known" in act("cancel:nope")[0]
    webui.shared.cmd_opts.hide_ui_dir_config = False
    del sys.modules["modules.util"].open_folder  # a WebUI before 1.8
    assert "cannot open folders" in act(f"open:{job_id}")[0]
    queued = webui.manager.submit("textual_inversion", ti_request(webui.data, name="zqlater", steps=50))
    assert "Cancel requested" in act(f"cancel:{queued.id}")[0]
    assert webui.manager.wait(queued.id).state in ("cancelled", "interrupted")


def test_tab_presets_export_and_import_fill_the_form(tab, webui):
    apply, outputs, inputs = handler(tab, "trainer_preset_apply")
    assert outputs[1:3] == ["trainer_tabs", "trainer_train"]
    assert outputs[-1] == "trainer_status"
    values = form_values(tab, inputs[2:])
    result = apply("lora", "Style", *values)
    shown = dict(zip(outputs[3:-1], result[3:-1], strict=True))
    assert shown["trainer_lora_network_rank"]["value"] == 32
    assert shown["trainer_lora_network_algo"]["value"] == "locon"
    assert "value" not in shown["trainer_lora_network_name"]  # the user's name and folders stay
    assert "value" not in shown["trainer_textual_inversion_train_steps"]  # other methods untouched

    export, export_out, export_in = handler(tab, "trainer_job_export")
    assert export_out == ["trainer_job_file", "trainer_status"]
    text, message = export("lora", "exported", *form_values(tab, export_in[2:]))
    job = json.loads(text)
    assert job["method"] == "lora"
    assert "preview" in job
    assert (webui.root / "trainer" / "jobs" / "exported.json").is_file()
    assert "exported.json" in message
    job["config"]["network"]["rank"] = 12
    load, load_out, _ = handler(tab, "trainer_job_import")
    result = load(json.dumps(job))
    assert result[0] == "lora"
    assert result[1]["selected"] == "lora"
    assert result[2]["value"] == "Train LoRA"
    shown = dict(zip(load_out[3:-1], result[3:-1], strict=True))
    assert shown["trainer_lora_network_rank"]["value"] == 12
    job["config"]["network"]["rank"] = "big"
    with pytest.raises(Exception, match="rank"):
        load(json.dumps(job))

    save, _, save_in = handler(tab, "trainer_preset_save")
    update, message = save("lora", "mine", *form_values(tab, save_in[2:]))
    assert update["value"] == "saved: mine"
    assert "saved: mine" in update["choices"]
    result = apply("textual_inversion", "saved: mine", *values)  # a saved LoRA preset switches to the LoRA tab
    assert result[0] == "lora"
    assert result[1]["selected"] == "lora"


def test_use_txt2img_settings_keeps_sane_values(tab):
    use, outputs, inputs = handler(tab, "trainer_preview_from_txt2img")
    assert outputs == inputs
    result = use("a cat", "blurry", "No such sampler", "30", "6.5", "768", "640", "-1")
    order = ["prompt", "negative_prompt", "sampler", "steps", "cfg_scale", "width", "height", "seed"]
    got = dict(zip(order, result, strict=True))
    assert got["prompt"]["value"] == "a cat"
    assert got["steps"]["value"] == 30
    assert got["width"]["value"] == 768
    assert "value" not in got["sampler"]
