"""The FastAPI application: routes, middleware, error handling, and the worker's life cycle."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from .. import __version__
from . import a1111, api
from .auth import BodyLimit, Guard
from .jobs import Jobs
from .schemas import ApiError
from .settings import Settings
from .store import Store

STATIC = Path(__file__).parent / "static"
PLACEHOLDER = """<!doctype html><meta charset="utf-8"><title>stablekit</title>
<h1>stablekit serve</h1><p>The API is at <a href="/docs">/docs</a>; the studio's page is not installed.</p>"""
log = logging.getLogger("stablekit.serve")


def _errors(app: FastAPI) -> None:
    """Every error is JSON ``{"error": "..."}`` with a 4xx status: never a traceback."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse({"error": e.message}, e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        return JSONResponse({"error": f"{where}: {message}" if where else message}, 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse({"error": message}, e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(e).__name__}); see the server's log"}, 500)


def _studio(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index():
        page = STATIC / "index.html"
        return FileResponse(page) if page.is_file() else HTMLResponse(PLACEHOLDER)

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")


def create_app(settings: Settings, pipe=None) -> FastAPI:
    """The service for `settings`; `pipe`, if given, is used instead of loading ``settings.model``."""
    store = Store(settings.data_dir)
    jobs = Jobs(settings, store, pipe)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        jobs.start()
        try:
            yield
        finally:
            jobs.stop()
            store.close()

    app = FastAPI(title="stablekit", version=__version__, lifespan=lifespan, docs_url="/docs")
    app.state.jobs = jobs
    app.include_router(api.router)
    app.include_router(a1111.router)
    _studio(app)
    _errors(app)
    app.add_middleware(BodyLimit, limit=settings.max_body)
    app.add_middleware(Guard, token=settings.token, origins=settings.origins)
    return app
