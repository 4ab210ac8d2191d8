"""Shared by the serve tests: one embedded pipeline, a client per test, waiting for jobs, images as base64."""

from __future__ import annotations

import base64
import functools
import io
import time

import numpy as np
from PIL import Image

TERMINAL = ("succeeded", "failed", "cancelled")


@functools.cache
def embedded():
    """The embedded default model on the CPU, loaded once for all serve tests (each job leaves it clean)."""
    import stablekit

    return stablekit.load(device="cpu")


def make_client(tmp_path, **settings):
    """A TestClient over a new server (data in `tmp_path`, `settings` as keyword arguments) on :func:`embedded`."""
    from fastapi.testclient import TestClient

    from stablekit.serve import Settings, create_app

    return TestClient(create_app(Settings(data_dir=tmp_path / "data", **settings), embedded()))


LONG = {"prompt": "a red star on a gray background", "steps": 150, "width": 128, "height": 128}


def wait(client, job_id: str, status=TERMINAL, timeout: float = 60.0, step: int = 0) -> dict:
    """The job once its status is one of `status` (and, while running, at least `step` steps done)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in status and (job["status"] != "running" or job["progress"]["step"] >= step):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def run_job(client, task: str, params: dict, plugins=()) -> dict:
    r = client.post("/v1/jobs", json={"task": task, "params": params, "plugins": list(plugins)})
    assert r.status_code == 202, r.text
    return wait(client, r.json()["id"])


def png_b64(size=(64, 64), seed: int = 0) -> str:
    """A smooth random RGB image as base64 PNG."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    low.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def open_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
