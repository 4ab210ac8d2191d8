"""``stablekit serve``: an HTTP service over one pipeline, with a native API, an AUTOMATIC1111-compatible
layer and a static web studio.

Architecture (one concern per module)::

    app.py       create_app(settings) -> FastAPI: routes, middleware, {"error": ...} for every error, the
                 worker's life cycle; "/" serves static/index.html (the studio) when it is there
    api.py       the native routes: /v1/jobs (POST, GET, DELETE, /events as server-sent events), /v1/queue,
                 /v1/images/{id}.png, /v1/models, /v1/tasks, /v1/plugins, /v1/keys,
                 /health, /metrics
    a1111.py     /sdapi/v1/...: A1111 requests become native jobs; field-by-field compatibility rules
    infotext.py  A1111 sampler names and its "parameters" PNG text
    jobs.py      the bounded queue, the ONE worker thread that owns the pipeline, cancellation by job,
                 progress, event logs, metrics
    store.py     SQLite (jobs, parameters, uploads, results) and the image folder; recovery after a crash
    tasks.py     the only module that calls the library: txt2img, img2img, edit, invert, protect, detect,
                 the plugin catalogue, watermark keys
    schemas.py   pydantic request/response models, ApiError, decoding of uploaded images
    auth.py      bearer token / HTTP Basic, Origin check, request body limit (ASGI middleware)
    settings.py  Settings (data folder, token, limits), the loopback check

A job's life: POST /v1/jobs validates everything it can (parameters, limits, uploads, plugin names and
arguments, key names) and answers 202 {id, status, position}, or 4xx {error}; the worker runs it with its
plugins attached for that job only; images are written atomically and listed with their sha256; events
go to /v1/jobs/{id}/events. Nothing is kept in memory that the database does not also hold, except the
live progress and recent event logs.
"""

from .app import create_app
from .settings import Settings, default_data_dir, is_loopback, read_token

__all__ = ["create_app", "run", "Settings", "default_data_dir", "is_loopback", "read_token"]


def run(settings: Settings, host: str, port: int) -> None:
    """Serve `settings` with uvicorn on `host`:`port` until interrupted."""
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
