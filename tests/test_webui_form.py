"""Drift: the tab's fields, the config dataclasses and the API schema agree; the tab builds with gradio."""

from __future__ import annotations

import importlib

import pytest

from lib_trainer.config import json_schema
from lib_trainer.methods.textual_inversion import TextualInversionConfig
from lib_trainer.webui.form import NOT_IN_FORM, TI_FIELDS, config_paths, default_values, literal_choices, to_config_dict
from tests.support import fake_webui


def schema_paths(schema: dict, prefix: str = "") -> set[str]:
    paths = set()
    for name, prop in schema["properties"].items():
        if prop.get("type") == "object" and "properties" in prop:
            paths |= schema_paths(prop, f"{prefix}{name}.")
        else:
            paths.add(prefix + name)
    return paths


def test_form_config_and_api_schema_agree():
    form = {f.path for f in TI_FIELDS}
    config = set(config_paths())
    assert len(form) == len(TI_FIELDS), "a config field appears twice in the form"
    assert form == config - NOT_IN_FORM
    assert schema_paths(json_schema(TextualInversionConfig)) == config


def test_choices_match_the_literals():
    for field in TI_FIELDS:
        choices = literal_choices(field.path)
        if choices:
            assert set(field.choices) == set(choices), field.path


def test_form_defaults_build_a_valid_config(tmp_path):
    values = default_values()
    values.update({"embedding.name": "zq", "data.data_dir": str(tmp_path), "train.steps": 10.0})
    config = TextualInversionConfig.from_dict(to_config_dict(values))
    assert config.train.steps == 10
    assert config.train.learning_rate == "0.005"


def test_tab_builds_with_gradio(sd1_model, tmp_path):
    pytest.importorskip("gradio")
    fake_webui.install(sd1_model, tmp_path)
    try:
        entry = importlib.import_module("lib_trainer.webui.entry")
        ((tab, title, elem_id),) = entry.on_ui_tabs()
        assert (title, elem_id) == ("Trainer", "trainer")
        ids = {getattr(block, "elem_id", None) for block in tab.blocks.values()}
        assert {"trainer_" + f.path.replace(".", "_") for f in TI_FIELDS} <= ids
        assert {"trainer_train", "trainer_interrupt", "trainer_save_now", "trainer_job_id", "trainer_live"} <= ids
    finally:
        fake_webui.uninstall()
