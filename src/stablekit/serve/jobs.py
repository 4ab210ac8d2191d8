"""The job queue and the one worker thread that owns the pipeline.

Requests are validated when they are submitted (parameters, limits, uploads, plugin names and arguments,
key names), so that a job that is queued can run. The worker takes jobs one at a time, oldest first:
it builds the job's plugins anew, attaches them for the job only (:mod:`.tasks` uses ``stablekit.use``
around the job's pipeline calls) and drops them after it, whatever the outcome. The queue holds at most
``max_queue`` waiting jobs; one more is refused with 429 and a Retry-After estimated from recent jobs.

Every job has an event log (:class:`Events`): ``queued``, ``running``, ``progress`` (step, total, ETA),
then one of ``completed``, ``failed``, ``cancelled``. Event ids count from 1 per job, so a client that
reconnects with ``Last-Event-ID`` gets the events after it. Logs of finished jobs are kept for the last
:data:`KEEP_LOGS` of them; older ones are answered from the database by their final event alone.
"""

from __future__ import annotations

import base64
import collections
import gc
import io
import logging
import math
import secrets
import threading
import time

from pydantic import ValidationError

from ..errors import StablekitError
from . import tasks
from .schemas import PARAMS, ApiError, JobRequest, decode_image, open_image
from .settings import Settings
from .store import STOPPED, TERMINAL, Store

log = logging.getLogger("stablekit.serve")
KEEP_LOGS = 256
FINAL_EVENT = {"succeeded": "completed", "failed": "failed", "cancelled": "cancelled"}
UPLOADS = ("image", "mask")
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def validation_message(e: ValidationError, prefix: str = "") -> str:
    """One line naming the first bad field of a pydantic error."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "")
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown field"
    return f"{where}: {first['msg']}" if where else first["msg"]


def png_data_url(image, side: int = 256) -> str:
    """`image` (PIL), shrunk to at most `side` pixels a side, as a ``data:image/png;base64,...`` URL."""
    image = image.copy()
    image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Events:
    """Per-job event logs: ``(id, name, data)``, ids from 1."""

    def __init__(self):
        self.lock = threading.Lock()
        self.logs: dict[str, list[tuple[int, str, dict]]] = {}
        self.finished: collections.deque[str] = collections.deque()
        self.waiters: dict[str, set] = {}  # job id -> {(event loop, asyncio.Event)} of open streams

    def emit(self, job_id: str, name: str, data: dict) -> int:
        with self.lock:
            log_ = self.logs.setdefault(job_id, [])
            if name == "preview":  # only the newest preview keeps its image; older ones keep their step
                log_[:] = [(i, n, {"step": d["step"]} if n == "preview" else d) for i, n, d in log_]
            log_.append((len(log_) + 1, name, data))
            if name in FINAL_EVENT.values():
                self.finished.append(job_id)
                while len(self.finished) > KEEP_LOGS:
                    self.logs.pop(self.finished.popleft(), None)
            for loop, woken in self.waiters.get(job_id, ()):
                loop.call_soon_threadsafe(woken.set)
            return len(log_)

    def watch(self, job_id: str, loop, woken) -> None:
        """Set the asyncio event `woken` (of `loop`) whenever `job_id` gets an event, until :meth:`unwatch`."""
        with self.lock:
            self.waiters.setdefault(job_id, set()).add((loop, woken))

    def unwatch(self, job_id: str, loop, woken) -> None:
        with self.lock:
            streams = self.waiters.get(job_id, set())
            streams.discard((loop, woken))
            if not streams:
                self.waiters.pop(job_id, None)

    def next_id(self, job_id: str) -> int:
        with self.lock:
            return len(self.logs.get(job_id, [])) + 1

    def after(self, job_id: str, last: int) -> list[tuple[int, str, dict]] | None:
        """The events of `job_id` after id `last`, or None if its log is not kept."""
        with self.lock:
            log_ = self.logs.get(job_id)
            return None if log_ is None else log_[last:]


class Live:
    """The running job: its cancel flag and progress."""

    def __init__(self, job_id: str):
        self.id, self.cancel, self.started = job_id, threading.Event(), time.monotonic()
        self.step, self.total, self.last = 0, 0, self.started

    def eta(self) -> float | None:
        if not self.step or not self.total:
            return None
        return round((time.monotonic() - self.started) / self.step * (self.total - self.step), 3)

    def progress(self) -> dict:
        return {"step": self.step, "total": self.total, "eta_s": self.eta()}


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.buckets = [0] * len(STEP_BUCKETS)
        self.steps, self.step_sum, self.job_sum, self.jobs = 0, 0.0, 0.0, 0

    def step(self, seconds: float) -> None:
        with self.lock:
            self.steps += 1
            self.step_sum += seconds
            for i, edge in enumerate(STEP_BUCKETS):
                self.buckets[i] += seconds <= edge

    def job(self, seconds: float) -> None:
        with self.lock:
            self.jobs += 1
            self.job_sum += seconds

    def lines(self) -> list[str]:
        """Prometheus text lines: the step-latency histogram and the job-duration summary."""
        with self.lock:
            buckets = zip(STEP_BUCKETS, self.buckets, strict=True)
            return [
                "# HELP stablekit_step_seconds Seconds per denoising step.",
                "# TYPE stablekit_step_seconds histogram",
                *[f'stablekit_step_seconds_bucket{{le="{edge}"}} {n}' for edge, n in buckets],
                f'stablekit_step_seconds_bucket{{le="+Inf"}} {self.steps}',
                f"stablekit_step_seconds_sum {self.step_sum:.6f}",
                f"stablekit_step_seconds_count {self.steps}",
                "# HELP stablekit_job_seconds Seconds per finished job.",
                "# TYPE stablekit_job_seconds summary",
                f"stablekit_job_seconds_sum {self.job_sum:.6f}",
                f"stablekit_job_seconds_count {self.jobs}",
            ]

    def mean_job(self) -> float:
        with self.lock:
            return self.job_sum / self.jobs if self.jobs else 5.0


class Jobs:
    """The queue, the worker thread, and what the API asks of them."""

    def __init__(self, settings: Settings, store: Store, pipe=None):
        self.settings, self.store, self.pipe = settings, store, pipe
        self.events, self.metrics = Events(), Metrics()
        self.cond = threading.Condition()
        self.queue: collections.deque[str] = collections.deque()
        self.live: Live | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._work, name="stablekit-worker", daemon=True)

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        for job_id in self.store.recover():
            self.queue.append(job_id)
            self.events.emit(job_id, "queued", {"id": job_id, "position": len(self.queue) - 1})
        self.thread.start()

    def stop(self, timeout: float = 30) -> None:
        with self.cond:
            self.stopping = True
            if self.live is not None:
                self.live.cancel.set()
            self.cond.notify_all()
        self.thread.join(timeout)

    def _load(self) -> bool:
        try:
            if self.pipe is None:
                self.pipe = tasks.load_pipeline(self.settings.model, self.settings.device)
            return True
        except StablekitError as e:
            self.load_error = str(e)
            log.error("cannot load the model: %s", e)
            return False
        finally:
            self.ready.set()

    def _work(self) -> None:
        if not self._load():
            return
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                self.live = Live(self.queue.popleft())
            try:
                self._run(self.live)
            finally:
                with self.cond:
                    self.live = None

    # ------------------------------------------------------------ submitting

    def _limits(self, task: str, p) -> None:
        s = self.settings
        if getattr(p, "steps", None) and p.steps > s.max_steps:
            raise ApiError(f"params.steps: {p.steps} is more than this server's limit of {s.max_steps}")
        if getattr(p, "n", 1) > s.max_images:
            raise ApiError(f"params.n: {p.n} is more than this server's limit of {s.max_images} images per job")
        if task == "txt2img" and (p.width or 0) * (p.height or 0) > s.max_pixels:
            raise ApiError(f"params: {p.width}x{p.height} is more than this server's {s.max_pixels} pixels")
        for side in ("width", "height"):
            if task == "txt2img" and getattr(p, side) is not None and getattr(p, side) % 8:
                raise ApiError(f"params.{side}: {getattr(p, side)} is not a multiple of 8")

    def validate(self, req: JobRequest) -> tuple[dict, dict[str, bytes]]:
        """The request's parameters (seed resolved, uploads replaced by their field names) and its uploads."""
        try:
            p = PARAMS[req.task].model_validate(req.params)
        except ValidationError as e:
            raise ApiError(validation_message(e, "params"), 422) from None
        self._limits(req.task, p)
        params, uploads, images = p.model_dump(), {}, {}
        for name in UPLOADS:
            if params.get(name) is not None:
                images[name], uploads[name] = decode_image(params[name], f"params.{name}", self.settings.max_pixels)
                params[name] = f"upload:{name}"
        if "seed" in params and params["seed"] is None:
            params["seed"] = secrets.randbelow(2**32)
        if req.task == "protect" and params["method"] == "diffusionguard" and "mask" not in uploads:
            raise ApiError("params.mask: the diffusionguard method needs a mask (white: the region to protect)")
        try:
            tasks.prepare(req.task, params | images, [s.model_dump() for s in req.plugins], self.store.keys)
        except StablekitError as e:
            raise ApiError(str(e).splitlines()[0]) from None
        return params, uploads

    def submit(self, req: JobRequest, source: str = "api") -> dict:
        params, uploads = self.validate(req)
        with self.cond:
            if len(self.queue) >= self.settings.max_queue:
                wait = math.ceil(self.metrics.mean_job() * (len(self.queue) + 1))
                raise ApiError(
                    f"the queue is full ({len(self.queue)} jobs waiting); retry later",
                    429,
                    {"Retry-After": str(min(3600, max(1, wait)))},
                )
            plugins = [s.model_dump() for s in req.plugins]
            job = self.store.add(req.task, source, params, plugins, uploads)
            self.queue.append(job["id"])
            self.events.emit(job["id"], "queued", {"id": job["id"], "position": len(self.queue) - 1})
            self.cond.notify_all()
        return self.view(job)

    # ------------------------------------------------------------ reading

    def position(self, job_id: str) -> int | None:
        with self.cond:
            return self.queue.index(job_id) if job_id in self.queue else None

    def view(self, job: dict) -> dict:
        """The JSON of a job (:class:`.schemas.JobOut`)."""
        live = self.live
        progress = {"step": 0, "total": 0, "eta_s": None}
        if live is not None and live.id == job["id"]:
            progress = live.progress()
        elif job["status"] == "succeeded":
            progress = {"step": 1, "total": 1, "eta_s": 0.0}
        out = {k: job[k] for k in ("id", "task", "status", "created", "started", "finished", "params", "plugins")}
        out.update(result=job["result"], error=job["error"], progress=progress)
        out["position"] = self.position(job["id"]) if job["status"] == "queued" else None
        return out

    def get(self, job_id: str) -> dict:
        job = self.store.get(job_id)
        if job is None:
            raise ApiError(f"no job with id '{job_id}'", 404)
        return self.view(job)

    def snapshot(self) -> dict:
        with self.cond:
            queued, live = list(self.queue), self.live
        return {
            "running": None if live is None else {"id": live.id, **live.progress()},
            "queued": [{"id": job_id, "position": i} for i, job_id in enumerate(queued)],
            "max_queue": self.settings.max_queue,
        }

    # ------------------------------------------------------------ cancelling

    def cancel(self, job_id: str) -> dict:
        """Cancel one job: a queued one leaves the queue now, a running one stops at its next step."""
        with self.cond:
            job = self.store.get(job_id)
            if job is None:
                raise ApiError(f"no job with id '{job_id}'", 404)
            if job["status"] in TERMINAL:
                raise ApiError(f"job '{job_id}' has already {job['status']}", 409)
            if job_id in self.queue:
                self.queue.remove(job_id)
                self.store.finish(job_id, "cancelled", self.events.next_id(job_id))
                self.events.emit(job_id, "cancelled", self.view(self.store.get(job_id)))
            elif self.live is not None and self.live.id == job_id:
                self.live.cancel.set()
        return self.get(job_id)

    def running_job(self, source: str | None = None) -> str | None:
        live = self.live
        if live is None or (source and self.store.get(live.id)["source"] != source):
            return None
        return live.id

    # ------------------------------------------------------------ running

    def _progress(self, live: Live):
        def report(step: int, total: int, preview=None) -> None:
            now = time.monotonic()
            if step > live.step:
                self.metrics.step((now - live.last) / (step - live.step))
            live.step, live.total, live.last = step, total, now
            self.events.emit(live.id, "progress", live.progress())
            if preview is not None:
                self.events.emit(live.id, "preview", {"step": step, "image": png_data_url(preview)})

        return report

    def _inputs(self, job_id: str) -> dict:
        raws = self.store.uploads(job_id)
        return {name: open_image(raw, name, self.settings.max_pixels) for name, raw in raws.items()}

    def _execute(self, job: dict, live: Live) -> tuple[str, tasks.Result | None, str | None]:
        """(status, result, error) of running `job`; nothing it built outlives it."""
        try:
            params = job["params"] | self._inputs(job["id"]) | {"model": self.settings.model}
            prepared = tasks.prepare(job["task"], params, job["plugins"], self.store.keys)
            result = tasks.TASKS[job["task"]](self.pipe, prepared, self._progress(live), live.cancel.is_set)
            return "succeeded", result, None
        except tasks.Cancelled as c:
            if self.stopping:
                return "failed", None, STOPPED
            return "cancelled", c.result, None
        except StablekitError as e:
            return "failed", None, str(e).splitlines()[0]
        except Exception as e:  # a bug or a resource problem: the job fails, the server goes on
            log.exception("job %s failed", job["id"])
            return "failed", None, f"{type(e).__name__}: {e}".splitlines()[0]

    def _save(self, job_id: str, result: tasks.Result) -> dict:
        from .infotext import infotext

        images = []
        for out in result.images:
            meta = {k: str(v) for k, v in out.meta.items()} | {"parameters": infotext(out.meta)}
            saved = self.store.save_image(job_id, out.image, meta)
            images.append(
                {
                    **saved,
                    "url": f"/v1/images/{saved['id']}.png",
                    "seed": out.seed,
                    "width": out.image.width,
                    "height": out.image.height,
                    "metadata": meta,
                }
            )
        return {"images": images, **result.data}

    def _release(self) -> None:
        """Free what a failed or cancelled job held: its traceback's frames keep tensors in reference cycles.
        Not after every job: a full collection costs about 0.2 s on a CPU with the model loaded, which would be
        most of a small job's time (``stablekit bench serve``), and a finished job leaves no cycles to collect."""
        gc.collect()
        if self.pipe is not None and self.pipe.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _run(self, live: Live) -> None:
        job = self.store.get(live.id)
        if job is None or job["status"] != "queued":
            return
        self.store.start(live.id)
        self.events.emit(live.id, "running", {"id": live.id})
        status, result, error = self._execute(job, live)
        saved = self._save(live.id, result) if result is not None else None
        if status != "succeeded":
            self._release()
        self.metrics.job(time.monotonic() - live.started)
        with self.cond:  # the queue's view and the job's status change together
            self.store.finish(live.id, status, self.events.next_id(live.id), saved, error)
            self.live = None
        self.events.emit(live.id, FINAL_EVENT[status], self.view(self.store.get(live.id)))

    # ------------------------------------------------------------ metrics

    def metrics_text(self) -> str:
        counts = self.store.counts()
        lines = [
            "# HELP stablekit_queue_length Jobs waiting in the queue.",
            "# TYPE stablekit_queue_length gauge",
            f"stablekit_queue_length {len(self.queue)}",
            "# HELP stablekit_jobs Jobs by status.",
            "# TYPE stablekit_jobs gauge",
        ]
        lines += [f'stablekit_jobs{{status="{s}"}} {counts.get(s, 0)}' for s in ("queued", "running", *TERMINAL)]
        lines += self.metrics.lines()
        return "\n".join(lines) + "\n"
