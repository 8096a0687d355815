"""REST API under /trainer/v1: the same jobs the tab runs. TrainerError -> HTTP 422, in one place."""

from __future__ import annotations

from typing import Any

from fastapi import Body, FastAPI, HTTPException
from fastapi.responses import JSONResponse, Response

from lib_trainer.config import DataConfig, json_schema
from lib_trainer.data.preprocess import PreprocessConfig
from lib_trainer.errors import TrainerError
from lib_trainer.methods.hypernetwork import HypernetworkSpec
from lib_trainer.methods.textual_inversion import EmbeddingConfig
from lib_trainer.webui.jobs import METHODS, JobManager

PREFIX = "/trainer/v1"
JOB_SCHEMA = {
    "type": "object",
    "required": ["method", "config"],
    "properties": {
        "method": {"type": "string", "enum": list(METHODS)},
        "config": {
            "oneOf": [json_schema(spec.config) for spec in METHODS.values()],
            "description": "the config of the chosen method",
        },
        "preview": {
            "type": "object",
            "description": "txt2img settings for previews: prompt ([name] allowed), "
            "negative_prompt, steps, sampler, cfg_scale, seed, width, height, enabled",
        },
    },
}


def error_response(exc: TrainerError) -> JSONResponse:
    """The one place a TrainerError becomes an HTTP answer: 422 with the field and the reason."""
    return JSONResponse(status_code=422, content={"detail": {"field": exc.field, "message": str(exc)}})


def register_routes(
    app: FastAPI, manager: JobManager, create_embedding: Any, create_hypernetwork: Any, dataset_report: Any
) -> None:
    """Add the trainer's routes to the host's FastAPI app (they appear in its /docs)."""
    tags = ["sd-webui-trainer"]

    @app.post(
        f"{PREFIX}/jobs",
        tags=tags,
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": JOB_SCHEMA}}, "required": True}},
    )
    def submit_job(body: dict = Body(...)):  # noqa: B008 (FastAPI's declaration style)
        try:
            if not isinstance(body.get("config"), dict):
                raise TrainerError("config is missing; send {'method': ..., 'config': {...}}", field="config")
            job = manager.submit(body.get("method", "textual_inversion"), body["config"], body.get("preview"))
        except TrainerError as exc:
            return error_response(exc)
        return {"id": job.id, "state": job.state}

    @app.get(f"{PREFIX}/jobs", tags=tags)
    def list_jobs():
        return {"jobs": [job.summary() for job in manager.jobs.values()]}

    @app.get(f"{PREFIX}/jobs/{{job_id}}", tags=tags)
    def get_job(job_id: str, since: int = 0):
        return _job_or_404(manager, job_id).summary(since)

    @app.post(f"{PREFIX}/jobs/{{job_id}}/cancel", tags=tags)
    def cancel_job(job_id: str):
        _job_or_404(manager, job_id)
        return manager.cancel(job_id).summary()

    @app.post(f"{PREFIX}/jobs/{{job_id}}/save", tags=tags)
    def save_job_now(job_id: str):
        job = _job_or_404(manager, job_id)
        job.save_requested = True
        return {"id": job.id, "save_requested": True}

    @app.get(f"{PREFIX}/jobs/{{job_id}}/previews/{{index}}", tags=tags)
    def get_preview(job_id: str, index: int):
        job = _job_or_404(manager, job_id)
        if not 0 <= index < len(job.previews):
            raise HTTPException(status_code=404, detail=f"job {job_id} has no preview {index}")
        return Response(content=job.previews[index][1], media_type="image/png")

    for route, schema, create in (
        ("embeddings", EmbeddingConfig, create_embedding),
        ("hypernetworks", HypernetworkSpec, create_hypernetwork),
    ):
        _add_create_route(app, f"{PREFIX}/{route}", schema, create, tags)

    _add_report_route(app, dataset_report, tags)
    _add_preprocess_route(app, manager, tags)


def _add_preprocess_route(app: FastAPI, manager: JobManager, tags: list[str]) -> None:
    body_schema = {"content": {"application/json": {"schema": json_schema(PreprocessConfig)}}, "required": True}

    @app.post(f"{PREFIX}/preprocess", tags=tags, openapi_extra={"requestBody": body_schema})
    def preprocess(body: dict = Body(...)):  # noqa: B008
        try:
            job = manager.submit("preprocess", body)
        except TrainerError as exc:
            return error_response(exc)
        return {"id": job.id, "state": job.state}


def _add_report_route(app: FastAPI, dataset_report: Any, tags: list[str]) -> None:
    report_body = {"content": {"application/json": {"schema": json_schema(DataConfig)}}, "required": True}

    @app.post(f"{PREFIX}/dataset/report", tags=tags, openapi_extra={"requestBody": report_body})
    def report(body: dict = Body(...)):  # noqa: B008
        try:
            return dataset_report(body)
        except TrainerError as exc:
            return error_response(exc)


def _add_create_route(app: FastAPI, path: str, schema: type, create: Any, tags: list[str]) -> None:
    body_schema = {"content": {"application/json": {"schema": json_schema(schema)}}, "required": True}

    @app.post(path, tags=tags, openapi_extra={"requestBody": body_schema})
    def create_file(body: dict = Body(...)):  # noqa: B008 (FastAPI's declaration style)
        try:
            created = create(body)
        except TrainerError as exc:
            return error_response(exc)
        return {"path": str(created)}


def _job_or_404(manager: JobManager, job_id: str):
    job = manager.get(job_id)
    if job is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
    return job
