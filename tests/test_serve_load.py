"""Load and soak against the real service (``stablekit serve`` on 127.0.0.1, embedded model, tiny jobs).

Load: 200 requests from 8 concurrent clients against a queue of 4; each client waits for its job (on the job's
event stream) before its next request. Every request ends 202-then-succeeded or 429 with Retry-After; the ids
are unique and the server's history holds exactly the accepted jobs. p50/p95 latencies are recorded (the
test's properties, and printed with ``-s``).

Soak: resident memory of the server process after 200 jobs (plugins attached and removed by turns) is within
10% of what it was after 20."""

import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_process import FINAL, Server

TINY = {"steps": 1, "width": 8, "height": 8, "guidance": 7.5}
CLIENTS = 8
REQUESTS = 200
MAX_QUEUE = 4


def _finish(client: httpx.Client, job_id: str) -> dict:
    """The job's final event (read from its event stream)."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as r:
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and name in ("completed", "failed", "cancelled"):
                return json.loads(line.removeprefix("data: "))
    raise AssertionError(f"the events of job {job_id} ended without a final event")


def _client_loop(url: str, count: int, start: int, out: list) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(start, start + count):
            sent = time.perf_counter()
            r = client.post(
                "/v1/jobs", json={"task": "txt2img", "params": {"prompt": f"shape {i}", "seed": i, **TINY}}
            )
            answered = time.perf_counter() - sent
            if r.status_code != 202:
                out.append({"code": r.status_code, "answer_s": answered, "retry_after": r.headers.get("retry-after")})
                time.sleep(0.02)
                continue
            job = _finish(client, r.json()["id"])
            out.append(
                {"code": 202, "id": r.json()["id"], "status": job["status"], "answer_s": answered}
                | {"done_s": time.perf_counter() - sent, "images": len(job["result"]["images"])}
            )


def _quantiles(xs: list[float]) -> dict:
    cuts = statistics.quantiles(xs, n=20, method="inclusive")
    return {"p50_s": round(statistics.median(xs), 4), "p95_s": round(cuts[18], 4), "n": len(xs)}


def test_load_every_request_succeeds_or_gets_429_and_none_is_lost(tmp_path, record_property):
    server = Server(tmp_path / "data", tmp_path / "server.log", "--max-queue", str(MAX_QUEUE))
    try:
        outs = [[] for _ in range(CLIENTS)]
        share = REQUESTS // CLIENTS
        threads = [
            threading.Thread(target=_client_loop, args=(server.url, share, k * share, outs[k])) for k in range(CLIENTS)
        ]
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - began
        results = [r for out in outs for r in out]
        history = server.client.get("/v1/jobs", params={"limit": 1000}).json()
        metrics = server.client.get("/metrics").text
    finally:
        server.stop()
    assert len(results) == REQUESTS
    assert {r["code"] for r in results} <= {202, 429}
    accepted = [r for r in results if r["code"] == 202]
    refused = [r for r in results if r["code"] == 429]
    assert accepted and refused, "the queue bound should have refused some requests and accepted others"
    assert all(r["retry_after"] and int(r["retry_after"]) >= 1 for r in refused)
    ids = [r["id"] for r in accepted]
    assert len(set(ids)) == len(ids)
    assert all(r["status"] == "succeeded" and r["images"] == 1 for r in accepted)
    assert sorted(j["id"] for j in history) == sorted(ids)  # none lost, none made twice
    assert all(j["status"] == "succeeded" for j in history)
    assert f'stablekit_jobs{{status="succeeded"}} {len(ids)}' in metrics
    latency = {
        "accepted": len(accepted),
        "refused_429": len(refused),
        "wall_s": round(wall, 2),
        "jobs_per_s": round(len(accepted) / wall, 3),
        "job_latency": _quantiles([r["done_s"] for r in accepted]),
        "answer_latency": _quantiles([r["answer_s"] for r in results]),
    }
    record_property("serve_load", latency)
    print("serve load:", json.dumps(latency))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


PLUGIN_TURNS = ([], [{"name": "euler"}], [{"name": "deepcache"}], [{"name": "sld", "args": {"concepts": ["star"]}}])


def _run_jobs(server: Server, first: int, count: int) -> None:
    """`count` tiny jobs, queued in batches the queue holds, plugins by turns; every one succeeds."""
    for start in range(first, first + count, 16):
        ids = [
            server.submit({"prompt": f"soak {i}", "seed": i, **TINY, "steps": 2}, plugins=PLUGIN_TURNS[i % 4])
            for i in range(start, min(start + 16, first + count))
        ]
        assert all(server.wait(job_id)["status"] == "succeeded" for job_id in ids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc")
def test_soak_memory_after_200_jobs_within_10_percent_of_after_20(tmp_path, record_property):
    server = Server(tmp_path / "data", tmp_path / "server.log")
    try:
        _run_jobs(server, 0, 20)
        after_20 = _rss_kib(server.proc.pid)
        _run_jobs(server, 20, 180)
        after_200 = _rss_kib(server.proc.pid)
        counts = server.client.get("/v1/jobs", params={"limit": 1000}).json()
    finally:
        server.stop()
    assert len(counts) == 200 and all(j["status"] in FINAL for j in counts)
    growth = after_200 / after_20 - 1
    record_property("serve_soak", {"rss_after_20_kib": after_20, "rss_after_200_kib": after_200, "growth": growth})
    print(f"serve soak: RSS {after_20} KiB after 20 jobs, {after_200} KiB after 200 ({100 * growth:+.1f}%)")
    assert abs(growth) <= 0.10
