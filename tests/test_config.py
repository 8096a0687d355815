"""Config building, validation messages, versions, and learning-rate schedules."""

from __future__ import annotations

import pytest

from lib_trainer.config import CONFIG_VERSION, DataConfig, TrainConfig, build, to_dict
from lib_trainer.errors import ConfigError
from lib_trainer.loop.schedules import LearningRate, parse_learning_rate
from lib_trainer.methods import get_method
from lib_trainer.methods.textual_inversion import TextualInversionConfig

BASE = {"embedding": {"name": "zqtoken"}, "data": {"data_dir": "/tmp/x"}}


def test_round_trip_through_a_dict():
    config = TextualInversionConfig.from_dict(BASE)
    assert TextualInversionConfig.from_dict(to_dict(config)) == config
    assert config.version == CONFIG_VERSION
    assert config.train.learning_rate == "0.005"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, "unknown setting.*colour.*valid settings"),
        ({"train": {"stepz": 3}}, r"train\.stepz"),
        ({"train": {"steps": "ten"}}, r"train\.steps must be a whole number"),
        ({"train": {"steps": 0}}, r"train\.steps must be between 1"),
        ({"train": {"batch_size": True}}, "batch_size must be a whole number"),
        ({"train": {"mixed_precision": "fp8"}}, "mixed_precision must be one of"),
        ({"data": {"data_dir": "/x", "width": 500}}, "multiple of 64.*try 512"),
        ({"data": {"data_dir": ""}}, "data_dir is empty"),
        ({"data": {"data_dir": "/x", "tag_dropout": 1.5}}, "tag_dropout"),
        ({"version": 99}, "config version 99"),
        ({"train": {"learning_rate": "0.01:10, 0.001", "lr_schedule": "cosine"}}, "stepped schedule"),
    ],
)
def test_invalid_settings_name_the_field_and_value(change, message):
    with pytest.raises(ConfigError, match=message):
        TextualInversionConfig.from_dict({**BASE, **change})


def test_floats_that_are_whole_numbers_are_accepted_for_ints():
    assert build(TrainConfig, {"steps": 10.0}).steps == 10
    assert build(DataConfig, {"data_dir": "/x", "width": 640}).width == 640


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.005", [(0.005, None)]),
        ("0.005:100, 1e-3:1000, 1e-5", [(0.005, 100), (0.001, 1000), (1e-5, None)]),
        ("1e-4:50", [(1e-4, 50)]),
    ],
)
def test_webui_learning_rate_syntax(text, expected):
    assert parse_learning_rate(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "0.1:10, 0.2:5", "0:10", "-1", "0.1, 0.2:10", "0.1:x"])
def test_bad_learning_rate_syntax(text):
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_learning_rate(text)


def test_stepped_rate_holds_through_its_step():
    lr = LearningRate("0.005:100, 1e-3:1000, 1e-5", "constant", 0, 2000)
    assert [lr.at(s) for s in (1, 100, 101, 1000, 1001, 2000)] == [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5]


def test_warmup_then_cosine_and_linear_decay():
    cosine = LearningRate("1.0", "cosine", 10, 110)
    assert cosine.at(5) == pytest.approx(0.5)
    assert cosine.at(10) == pytest.approx(1.0)
    assert cosine.at(60) == pytest.approx(0.5)
    assert cosine.at(110) == pytest.approx(0.0, abs=1e-12)
    restarts = LearningRate("1.0", "cosine_with_restarts", 0, 100, cycles=2)
    assert [restarts.at(s) for s in (0, 25, 50, 75)] == pytest.approx([1.0, 0.5, 1.0, 0.5])
    assert restarts.at(100) == 0.0
    poly = LearningRate("2.0", "polynomial", 10, 110, power=2.0)
    assert [poly.at(s) for s in (5, 10, 60, 110)] == pytest.approx([1.0, 2.0, 0.5, 0.0])
    linear = LearningRate("1.0", "linear", 0, 100)
    assert linear.at(50) == pytest.approx(0.5)
    assert linear.at(100) == pytest.approx(0.0)


def test_method_registry_raises_with_valid_names():
    assert get_method("textual_inversion").__name__.endswith("textual_inversion")
    with pytest.raises(ConfigError, match="textual_inversion"):
        get_method("dreambooth")
