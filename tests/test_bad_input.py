"""Every config field, a wrong type and an out-of-range value, through the REST API: 422 (403 for a path outside
the allowed folders) naming that field, never a job. Generated from the config dataclasses, so a new field is
covered the day it is added; a number without declared bounds, or text that is neither free text nor refused
for any bad candidate, fails here.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, get_origin

import pytest

from lib_trainer.config import PreviewConfig
from lib_trainer.webui.jobs import METHODS

BAD_TEXT = ["", "x", "a/b", "/nonexistent-trainer-folder/x.txt", "CON", "🙂"]
TRIED: list[int] = []  # (for the closing figures) how many bad inputs were sent


def leaves(cls: type, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """(dotted path, type hint, field) of every leaf setting of a config dataclass."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            found += leaves(hint, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            found += leaves(typing.get_args(hint)[0], f"{prefix}{f.name}.0.")  # a list setting: its first item
        else:
            found.append((prefix + f.name, hint, f))
    return found


def bad_values(path: str, hint: Any, field: dataclasses.Field) -> tuple[list[Any], list[Any]]:
    """(values every one of which must be refused, candidates of which at least one must be refused)."""
    low, high = field.metadata.get("low"), field.metadata.get("high")
    if path.endswith("version"):
        return ["one", 0, 99], []
    if hint is bool:
        return ["yes", 1, None], []
    if hint in (int, float):
        assert low is not None or high is not None, f"{path}: declare its bounds with setting(low=, high=)"
        out_of_range = ([low - 1] if low is not None else []) + ([high + 1] if high is not None else [])
        return ["ten", [1], {"a": 1}, *([1.5] if hint is int else []), *out_of_range], []
    if get_origin(hint) is Literal:
        return ["no-such-choice", 3, None], []
    if get_origin(hint) in (typing.Union, types.UnionType):  # a number or text: the learning rate
        return [["a"], {"a": 1}, True, -1.0, 0], BAD_TEXT
    if field.metadata.get("free_text"):
        return [5, ["a"]], []
    return [5, ["a"], {"a": 1}], BAD_TEXT  # text with rules


def valid_request(method: str, webui) -> dict[str, Any]:
    data = {"data_dir": str(webui.data), "width": 64, "height": 64}
    train = {"steps": 2, "save_every": 0, "preview_every": 0}
    if method == "textual_inversion":
        return {"embedding": {"name": "zqbad"}, "data": data, "train": train}
    if method == "lora":
        return {"network": {"name": "zqbad", "rank": 4}, "data": {**data, "template": "none"}, "train": train}
    if method == "hypernetwork":
        return {"hypernetwork": {"name": "zqbad", "sizes": "32"}, "data": data, "train": train}
    if method == "dreambooth":
        concept = {"instance_dir": str(webui.data), "class_dir": str(webui.root / "classes"), "class_images": 1}
        concept["class_prompt"] = "a photo"
        return {"dreambooth": {"name": "zqbad"}, "concepts": [concept], "data": {"width": 64, "height": 64}}
    if method == "embedding_finetune":
        return {"finetune": {"name": "zqbad", "tokens": "red"}, "data": data, "train": train}
    if method == "test_grid":
        return {"job": finished_ti_job(webui), "strengths": "1"}
    return {"input_dir": str(webui.data), "output_dir": str(webui.root / "prepared")}


def finished_ti_job(webui) -> str:
    """A finished embedding job with one saved step, as the grid tests need (recorded, not trained)."""
    from lib_trainer.webui.jobs import Job

    saved = webui.root / "zqbad-2.safetensors"
    saved.write_bytes(b"")
    config = METHODS["textual_inversion"].config.from_dict(valid_request("textual_inversion", webui))
    job = Job(id="finished-1", method="textual_inversion", config=config, state="done")
    job.saved.append({"path": str(saved), "step": 2})
    webui.manager.jobs[job.id] = job
    return job.id


def with_value(request: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    request = json.loads(json.dumps(request))
    *parents, leaf = path.split(".")
    node = request
    for parent in parents:
        node = node[int(parent)] if isinstance(node, list) else node.setdefault(parent, {})
    node[leaf] = value
    return request


def post(client, method: str, config: dict, preview: dict | None = None):
    body = {"method": method, "config": config, **({"preview": preview} if preview is not None else {})}
    TRIED.append(1)
    reply = client.post("/trainer/v1/jobs", content=json.dumps(body))
    if reply.status_code == 200:  # an accepted candidate: never let it train
        client.post(f"/trainer/v1/jobs/{reply.json()['id']}/cancel")
    return reply


def refused_with(reply, path: str) -> bool:
    return reply.status_code in (403, 422) and reply.json()["detail"]["field"] == path


CASES = [(method, *leaf) for method, spec in METHODS.items() for leaf in leaves(spec.config)]
CASES += [("preview", *leaf) for leaf in leaves(PreviewConfig)]


@pytest.mark.parametrize(("method", "path", "hint", "field"), CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_every_field_refuses_wrong_types_and_out_of_range_values(client, webui, method, path, hint, field):
    target = "textual_inversion" if method == "preview" else method
    base = valid_request(target, webui)
    webui.manager.validate(target, base)  # the base request is valid (checked without queueing a job)
    always, candidates = bad_values(path, hint, field)
    expected = f"preview.{path}" if method == "preview" else path
    for value in always:
        if method == "preview":
            reply = post(client, target, base, {path: value})
        else:
            reply = post(client, target, with_value(base, path, value))
        assert refused_with(reply, expected), (value, reply.status_code, reply.text)
    if candidates:
        replies = [
            post(client, target, base, {path: v})
            if method == "preview"
            else post(client, target, with_value(base, path, v))
            for v in candidates
        ]
        assert any(refused_with(r, expected) for r in replies), f"{expected}: no bad text refused; mark it free_text"


@pytest.mark.parametrize("method", [*METHODS, "preview"])
def test_unknown_settings_are_refused_by_name(client, webui, method):
    target = "textual_inversion" if method == "preview" else method
    base = valid_request(target, webui)
    if method == "preview":
        reply = post(client, target, base, {"colour": 1})
        assert refused_with(reply, "preview.colour")
        return
    assert refused_with(post(client, target, {**base, "colour": 1}), "colour")
    for section in [k for k, v in base.items() if isinstance(v, dict)]:
        assert refused_with(post(client, target, with_value(base, f"{section}.colour", 1)), f"{section}.colour")


def test_report_how_many_bad_inputs_were_tried():
    print(f"bad-input table: {len(CASES)} fields, {len(TRIED)} requests")
    assert len(CASES) > 150
