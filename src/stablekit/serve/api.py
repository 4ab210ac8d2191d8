"""The native API: ``/v1/...``, ``/health`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import json
import re

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse

from ..errors import StablekitError
from . import tasks
from .jobs import FINAL_EVENT, Jobs
from .schemas import PARAMS, Accepted, ApiError, JobOut, JobRequest, KeyRequest, Status

ID = re.compile(r"[0-9a-f]{32}")
KEEPALIVE_S = 15.0
router = APIRouter()


def _jobs(request: Request) -> Jobs:
    return request.app.state.jobs


def _id(job_id: str, what: str = "job") -> str:
    if not ID.fullmatch(job_id):
        raise ApiError(f"no {what} with id '{job_id[:64]}'", 404)
    return job_id


@router.post("/v1/jobs", status_code=202, response_model=Accepted, tags=["jobs"])
def submit(req: JobRequest, request: Request):
    """Queue a job: `task` with its `params` and `plugins` ([{name, args}] from GET /v1/plugins)."""
    job = _jobs(request).submit(req)
    return {"id": job["id"], "status": job["status"], "position": job["position"]}


@router.get("/v1/jobs", response_model=list[JobOut], tags=["jobs"])
def history(request: Request, status: Status | None = None, limit: int = Query(50, ge=1, le=1000)):
    """The latest jobs, newest first (optionally of one status)."""
    jobs = _jobs(request)
    return [jobs.view(job) for job in jobs.store.jobs(status, limit)]


@router.get("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
def job(job_id: str, request: Request):
    """A job's status, progress (step, total, ETA), result (images, seeds, sha256, metadata) or error."""
    return _jobs(request).get(_id(job_id))


@router.delete("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
def cancel(job_id: str, request: Request):
    """Cancel this job only: a queued one is removed, a running one stops at its next step."""
    return _jobs(request).cancel(_id(job_id))


def _sse(event_id: int, name: str, data: dict) -> str:
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data)}\n\n"


async def _stream(jobs: Jobs, job_id: str, last: int):
    """The job's events after `last`, pushed as the worker emits them (no polling), then its final event."""
    loop, woken = asyncio.get_running_loop(), asyncio.Event()
    jobs.events.watch(job_id, loop, woken)
    try:
        async for text in _events_after(jobs, job_id, last, woken):
            yield text
    finally:
        jobs.events.unwatch(job_id, loop, woken)


async def _events_after(jobs: Jobs, job_id: str, last: int, woken: asyncio.Event):
    while True:
        woken.clear()  # before reading: an event emitted after the read sets it again
        events = jobs.events.after(job_id, last)
        if events is None:  # a log no longer kept: the job is finished; send its final event
            job = jobs.store.get(job_id)
            if job["status"] in FINAL_EVENT and job["last_event"] > last:
                yield _sse(job["last_event"], FINAL_EVENT[job["status"]], jobs.view(job))
            return
        for event_id, name, data in events:
            yield _sse(event_id, name, data)
            last = event_id
            if name in FINAL_EVENT.values():
                return
        if not events:
            try:
                await asyncio.wait_for(woken.wait(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"


@router.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse)
def events(job_id: str, request: Request, last_event_id: str | None = Header(None)):
    """Server-sent events: queued, running, progress, then completed, failed or cancelled (the job's JSON).
    Reconnect with the Last-Event-ID header to get only the events after it."""
    jobs = _jobs(request)
    jobs.get(_id(job_id))
    last = 0
    if last_event_id is not None:
        if not last_event_id.strip().isdigit():
            raise ApiError(f"Last-Event-ID '{last_event_id[:32]}' is not an event id (a whole number)")
        last = int(last_event_id)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_stream(jobs, job_id, last), media_type="text/event-stream", headers=headers)


@router.get("/v1/queue", tags=["jobs"])
def queue(request: Request):
    """The running job (id, step, total, ETA) and the queued ones in order."""
    return _jobs(request).snapshot()


@router.get("/v1/images/{name}", tags=["images"], response_class=FileResponse)
def image(name: str, request: Request):
    """A result image: PNG with the metadata the command line writes, and A1111's `parameters` text."""
    if not name.endswith(".png"):
        raise ApiError(f"no image named '{name[:64]}'; image URLs end in .png", 404)
    image_id = _id(name.removesuffix(".png"), "image")
    path = _jobs(request).store.image_path(image_id)
    if path is None or not path.is_file():
        raise ApiError(f"no image with id '{image_id}'", 404)
    return FileResponse(path, media_type="image/png")


def _pipe(jobs: Jobs):
    if jobs.pipe is None or not jobs.ready.is_set():
        raise ApiError(jobs.load_error or "the model is still loading; retry in a few seconds", 503)
    return jobs.pipe


@router.get("/v1/models", tags=["server"])
def models(request: Request):
    """The loaded model (one per server: start another server for another model)."""
    jobs = _jobs(request)
    return [tasks.model_info(_pipe(jobs), jobs.settings.model)]


@router.get("/v1/tasks", tags=["server"])
def task_schemas():
    """Every task's parameters as JSON schema (``enum`` lists the methods a task offers)."""
    return {task: model.model_json_schema() for task, model in PARAMS.items()}


@router.get("/v1/plugins", tags=["server"])
def plugins():
    """Every plugin a job may name: kind, name, description and parameters with their defaults."""
    return tasks.plugin_schemas()


@router.get("/v1/keys", tags=["keys"])
def keys(request: Request):
    """Watermark keys kept on this server (names, methods and sizes; never their secrets)."""
    return tasks.list_keys(_jobs(request).store.keys)


@router.post("/v1/keys", status_code=201, tags=["keys"])
def new_key(req: KeyRequest, request: Request):
    """Make a watermark key, kept on the server; jobs name it (plugins: {name: METHOD, args: {key: NAME}})."""
    jobs = _jobs(request)
    pipe = _pipe(jobs)
    try:
        return tasks.create_key(pipe, jobs.store.keys, req.name, req.method, req.width, req.height)
    except StablekitError as e:
        raise ApiError(str(e).splitlines()[0], 409 if "exists" in str(e) else 400) from None


@router.get("/health", tags=["server"])
def health(request: Request):
    """``ok`` once the model is loaded (``loading`` before, ``error`` if it cannot be)."""
    jobs = _jobs(request)
    state = "error" if jobs.load_error else "ok" if jobs.ready.is_set() else "loading"
    body = {"status": state, "queue": len(jobs.queue), "error": jobs.load_error}
    return body


@router.get("/metrics", tags=["server"], response_class=PlainTextResponse)
def metrics(request: Request):
    """Prometheus text: queue length, jobs by status, step latency."""
    return PlainTextResponse(_jobs(request).metrics_text(), media_type="text/plain; version=0.0.4")
