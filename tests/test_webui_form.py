"""Drift: each method's tab fields, its config dataclass and the API schema agree; the tab builds with gradio."""

from __future__ import annotations

import importlib

import pytest

from lib_trainer.config import json_schema
from lib_trainer.webui.form import (
    CONCEPT_ROWS,
    FORMS,
    NOT_IN_FORM,
    config_paths,
    default_values,
    literal_choices,
    row_path,
    to_config_dict,
)
from tests.support import fake_webui


def schema_paths(schema: dict, prefix: str = "") -> set[str]:
    paths = set()
    for name, prop in schema["properties"].items():
        if prop.get("type") == "object" and "properties" in prop:
            paths |= schema_paths(prop, f"{prefix}{name}.")
        elif prop.get("type") == "array" and "properties" in prop["items"]:
            paths |= schema_paths(prop["items"], f"{prefix}{name}[].")
        else:
            paths.add(prefix + name)
    return paths


@pytest.mark.parametrize("method", sorted(FORMS))
def test_form_config_and_api_schema_agree(method):
    cls, fields = FORMS[method]
    form = {f.path for f in fields}
    config = set(config_paths(cls))
    assert len(form) == len(fields), "a config field appears twice in the form"
    assert form == config - NOT_IN_FORM
    assert schema_paths(json_schema(cls)) == config


@pytest.mark.parametrize("method", sorted(FORMS))
def test_choices_match_the_literals(method):
    cls, fields = FORMS[method]
    for field in fields:
        choices = literal_choices(field.path, cls)
        if choices:
            assert set(field.choices) == set(choices), field.path


@pytest.mark.parametrize(
    ("method", "name_path"),
    [("textual_inversion", "embedding.name"), ("lora", "network.name"), ("hypernetwork", "hypernetwork.name")],
)
def test_form_defaults_build_a_valid_config(method, name_path, tmp_path):
    cls, fields = FORMS[method]
    values = default_values(method)
    values.update({name_path: "zq", "data.data_dir": str(tmp_path), "train.steps": 10.0})
    config = cls.from_dict(to_config_dict(values, fields))
    assert config.train.steps == 10


def test_dreambooth_form_rows_become_the_concept_list(tmp_path):
    cls, fields = FORMS["dreambooth"]
    values = default_values("dreambooth")
    rows = {}
    for path, value in values.items():
        if "[]." in path:
            rows.update({row_path(path, i): value for i in range(CONCEPT_ROWS)})
        else:
            rows[path] = value
    rows.update({"dreambooth.name": "zq", "concepts.0.instance_dir": str(tmp_path / "a")})
    rows.update({"concepts.2.instance_dir": str(tmp_path / "c"), "concepts.2.class_dir": str(tmp_path / "cls")})
    config = cls.from_dict(to_config_dict(rows, fields))
    assert [c.instance_dir for c in config.concepts] == [str(tmp_path / "a"), str(tmp_path / "c")]
    assert [c.prior for c in config.concepts] == [False, True]
    assert config.train.optimizer == "adafactor"
    assert config.train.gradient_checkpointing


def test_api_schema_offers_every_method():
    from lib_trainer.webui.api import JOB_SCHEMA

    methods = [
        "textual_inversion",
        "lora",
        "hypernetwork",
        "dreambooth",
        "embedding_finetune",
        "preprocess",
        "test_grid",
    ]
    assert JOB_SCHEMA["properties"]["method"]["enum"] == methods
    assert len(JOB_SCHEMA["properties"]["config"]["oneOf"]) == len(methods)


def test_tab_builds_with_gradio(sd1_model, tmp_path):
    pytest.importorskip("gradio")
    fake_webui.install(sd1_model, tmp_path)
    try:
        entry = importlib.import_module("lib_trainer.webui.entry")
        ((tab, title, elem_id),) = entry.on_ui_tabs()
        assert (title, elem_id) == ("Trainer", "trainer")
        ids = {getattr(block, "elem_id", None) for block in tab.blocks.values()}
        for method, (_, fields) in FORMS.items():
            paths = {row_path(f.path, i) for f in fields for i in range(CONCEPT_ROWS)}
            assert {f"trainer_{method}_" + p.replace(".", "_") for p in paths} <= ids
        assert {
            "trainer_columns",
            "trainer_settings",
            "trainer_run",
            "trainer_train",
            "trainer_memory",
            "trainer_interrupt",
            "trainer_save_now",
            "trainer_job_id",
            "trainer_live",
            "trainer_jobs",
            "trainer_job_action",
            "trainer_preset",
            "trainer_job_import",
            "trainer_job_export",
            "trainer_preview_from_txt2img",
            "trainer_report",
        } <= ids
    finally:
        fake_webui.uninstall()
