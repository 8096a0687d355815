"""REST API under /trainer/v1: the same jobs the tab runs.

Every answer to a bad request is ``{"detail": {"field", "message"}}``: 422 for a TrainerError (403 for a path
outside the allowed folders), made in one place, ``error_response``; bodies are parsed here, so a body that
is not a JSON object gets the same form, never a 500 or FastAPI's own list format.

Which routes exist and who may call them is the host's rule (``host.route_access``): the job API only where
the WebUI serves its own API, behind ``--api-auth``; the two routes the tab's page script polls (a job's
status and its previews) and the job list the tab's job panel shows always, behind the WebUI's login when it
has one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from lib_trainer.config import DataConfig, PreviewConfig, json_schema
from lib_trainer.data.preprocess import PreprocessConfig
from lib_trainer.errors import AccessError, ConfigError, TrainerError
from lib_trainer.methods.hypernetwork import HypernetworkSpec
from lib_trainer.methods.textual_inversion import EmbeddingConfig
from lib_trainer.webui.jobs import METHODS, Job, JobManager

PREFIX = "/trainer/v1"
TAGS = ["sd-webui-trainer"]
JOB_SCHEMA = {
    "type": "object",
    "required": ["method", "config"],
    "properties": {
        "method": {"type": "string", "enum": list(METHODS)},
        "config": {
            "oneOf": [json_schema(spec.config) for spec in METHODS.values()],
            "description": "the config of the chosen method",
        },
        "preview": json_schema(PreviewConfig),
        "preflight": {
            "type": "boolean",
            "default": False,
            "description": "only check memory: 2 real steps, nothing saved; the job's 'memory' gives the peak, whether "
            "it fits and what to change",
        },
    },
}


def error_response(exc: TrainerError) -> JSONResponse:
    """The one place a TrainerError becomes an HTTP answer: 422 (403 for a refused path), the field and reason."""
    status = 403 if isinstance(exc, AccessError) else 422
    return JSONResponse(status_code=status, content={"detail": {"field": exc.field, "message": str(exc)}})


async def read_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object; ConfigError (field "body") for anything else."""
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the request body is not valid JSON ({exc}); send a JSON object", field="body") from exc
    if not isinstance(body, dict):
        raise ConfigError(
            f"the request body must be a JSON object ({{...}}), but is {type(body).__name__}", field="body"
        )
    return body


def _body_route(app: FastAPI, path: str, schema: dict, work: Callable[[dict], Any], dependencies: list) -> None:
    """A POST route whose JSON-object body goes to ``work`` (run in a worker thread); errors in our format."""

    async def route(request: Request):
        try:
            body = await read_object(request)
            return await run_in_threadpool(work, body)
        except TrainerError as exc:
            return error_response(exc)

    body = {"requestBody": {"content": {"application/json": {"schema": schema}}, "required": True}}
    app.add_api_route(path, route, methods=["POST"], tags=TAGS, openapi_extra=body, dependencies=dependencies)


def register_routes(app: FastAPI, manager: JobManager, actions: dict[str, Callable], access: Any) -> None:
    """Add the trainer's routes to the host's FastAPI app (they appear in its /docs).

    ``actions``: "embedding" / "hypernetwork" create files, "report" checks a dataset; ``access`` is the host's
    RouteAccess (full_api, api and ui dependencies).
    """
    _add_status_routes(app, manager, access.ui)
    if not access.full_api:
        return
    api = access.api

    def submit(body: dict) -> dict:
        preflight = body.get("preflight", False)
        if not isinstance(preflight, bool):
            raise ConfigError(f"preflight must be true or false, not {preflight!r}", field="preflight")
        job = manager.submit(body.get("method"), body.get("config"), body.get("preview"), preflight)
        return {"id": job.id, "state": job.state}

    _body_route(app, f"{PREFIX}/jobs", JOB_SCHEMA, submit, api)
    _body_route(
        app, f"{PREFIX}/preprocess", json_schema(PreprocessConfig), lambda b: submit_preprocess(manager, b), api
    )
    _body_route(app, f"{PREFIX}/dataset/report", json_schema(DataConfig), actions["report"], api)
    for route, schema, create in (
        ("embeddings", EmbeddingConfig, actions["embedding"]),
        ("hypernetworks", HypernetworkSpec, actions["hypernetwork"]),
    ):
        _body_route(app, f"{PREFIX}/{route}", json_schema(schema), lambda b, c=create: {"path": str(c(b))}, api)

    def cancel_job(job_id: str):
        _job_or_404(manager, job_id)
        return manager.cancel(job_id).summary()

    def save_job_now(job_id: str):
        job = _job_or_404(manager, job_id)
        job.save_requested = True
        return {"id": job.id, "save_requested": True}

    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}/cancel", cancel_job, methods=["POST"], tags=TAGS, dependencies=api)
    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}/save", save_job_now, methods=["POST"], tags=TAGS, dependencies=api)


def submit_preprocess(manager: JobManager, body: dict) -> dict:
    """POST /preprocess: the body is the preparation config itself."""
    job = manager.submit("preprocess", body)
    return {"id": job.id, "state": job.state}


def _add_status_routes(app: FastAPI, manager: JobManager, dependencies: list) -> None:
    """The routes the tab's page script polls: the job list (without loss histories), a job's status and its
    preview images."""

    def list_jobs():
        return {"jobs": [job.summary(-1) for job in list(manager.jobs.values())]}

    def get_job(job_id: str, since: str = "0"):
        if not since.isdigit():
            return error_response(ConfigError(f"since must be a step number, but is {since!r}", field="since"))
        return _job_or_404(manager, job_id).summary(int(since))

    def get_preview(job_id: str, index: str):
        job = _job_or_404(manager, job_id)
        if not index.isdigit() or not int(index) < len(job.previews):
            raise HTTPException(status_code=404, detail=f"job {job_id} has no preview {index}")
        path = job.previews[int(index)][1]
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise HTTPException(status_code=404, detail=f"preview {index} of job {job_id} is gone ({exc})") from exc
        return Response(content=content, media_type="image/png")

    app.add_api_route(f"{PREFIX}/jobs", list_jobs, methods=["GET"], tags=TAGS, dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}", get_job, methods=["GET"], tags=TAGS, dependencies=dependencies)
    app.add_api_route(
        f"{PREFIX}/jobs/{{job_id}}/previews/{{index}}",
        get_preview,
        methods=["GET"],
        tags=TAGS,
        dependencies=dependencies,
    )


def _job_or_404(manager: JobManager, job_id: str) -> Job:
    job = manager.get(job_id)
    if job is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
    return job
