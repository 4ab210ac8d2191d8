"""Benchmark the HTTP service: throughput, latency, and what it adds per image over calling the pipeline directly.

    stablekit bench serve --json bench_out/serve.json          # or: python benchmarks/serve.py --json ...

Starts ``stablekit serve`` as a separate process on 127.0.0.1 (its own data folder, the same model, device and
torch threads as this process), then alternates, over ``--rounds`` rounds:

* **direct**: ``--jobs`` text-to-image calls of the pipeline loaded here, one after another, with the parameters
  the service's txt2img uses (prompt, steps, guidance, the model's guidance rescale, size, a CPU generator seeded
  per image);
* **service**: the same ``--jobs`` images as jobs, sent by ``--clients`` concurrent HTTP clients, each waiting for
  its job's final event (server-sent events) before sending the next. With two clients or more the worker is
  never idle, so wall time per image is what the service costs per image: HTTP, validation, queue, SQLite, the
  PNG with its metadata written atomically, sha256.

The overhead is (service seconds per image) / (direct seconds per image) per round; the target (at most 1.05)
is judged on the 95% interval of its rounds (``_common.speedup_target``: inconclusive under 3 rounds or when the
rounds disagree by more than 5%). Latency is each job's time from its POST to its final event (p50, p95).
The first image of the first round is fetched back and compared pixel for pixel with the direct call's: the same
parameters give the same image. Writes the JSON and a PNG (seconds per image by round; latency distribution).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common
import numpy as np

from stablekit.eval.harness import rnd

TARGET = 1.05  # the service's seconds per image over the direct call's


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stablekit bench serve", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=0, seed_help="seed of the first image (image i of a round uses seed+i)")
    p.add_argument("--jobs", type=int, default=40, help="images per round, each way")
    p.add_argument("--rounds", type=int, default=5, help="rounds of direct and service, alternating")
    p.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size", type=int, default=None, help="width and height (default: the model's native size)")
    p.add_argument("--prompt", default="a red star on a gray background")
    a = p.parse_args(args)
    if a.jobs < 1 or a.rounds < 1 or a.clients < 1:
        p.error("--jobs, --rounds and --clients must be at least 1")
    return a


# ---------------------------------------------------------------- the server process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(a, data_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``stablekit serve`` on a free loopback port, ready (its model loaded): (process, base URL)."""
    import httpx

    port = _free_port()
    args = [sys.executable, "-m", "stablekit.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    args += ["--max-queue", str(max(a.clients, 1) * 2)]
    if a.model:
        args += ["--model", a.model]
    if a.device:
        args += ["--device", a.device]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads)) if a.threads else dict(os.environ)
    proc = subprocess.Popen(args, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 600
    while time.monotonic() < end and proc.poll() is None:
        try:
            if httpx.get(url + "/health").json()["status"] == "ok":
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start: " + log.read_text()[-2000:])


# ---------------------------------------------------------------- the two ways


def direct(pipe, a, seeds: list[int]) -> tuple[float, object]:
    """(seconds for `seeds`' images, the first image) of the pipeline called as the service's txt2img calls it."""
    import torch

    from stablekit.pipeline import guidance_rescale

    size = a.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    first = None
    start = _common.clock(pipe.device)
    for seed in seeds:
        image = pipe(
            a.prompt,
            negative_prompt=None,
            num_inference_steps=a.steps,
            guidance_scale=a.guidance,
            guidance_rescale=guidance_rescale(pipe),
            generator=torch.Generator("cpu").manual_seed(seed),
            width=size,
            height=size,
        ).images[0]
        if first is None:
            first = image
    return _common.clock(pipe.device) - start, first


def _job(client, params: dict) -> tuple[float, dict]:
    """(seconds from POST to the final event, the job's JSON) of one txt2img job."""
    sent = time.perf_counter()
    r = client.post("/v1/jobs", json={"task": "txt2img", "params": params})
    if r.status_code != 202:
        raise RuntimeError(f"job refused: {r.status_code} {r.text}")
    with client.stream("GET", f"/v1/jobs/{r.json()['id']}/events", timeout=None) as events:
        name = None
        for line in events.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and name in ("completed", "failed", "cancelled"):
                return time.perf_counter() - sent, json.loads(line.removeprefix("data: "))
    raise RuntimeError("the event stream ended without a final event")


def service(url: str, a, seeds: list[int]) -> tuple[float, list[float], list[dict]]:
    """(wall seconds, latencies, jobs) of `seeds`' images sent by ``a.clients`` clients."""
    import httpx

    size = {"width": a.size, "height": a.size} if a.size else {}
    params = {"prompt": a.prompt, "steps": a.steps, "guidance": a.guidance, **size}
    todo = list(reversed(seeds))
    done: dict[int, tuple[float, dict]] = {}
    lock = threading.Lock()

    def client_loop():
        with httpx.Client(base_url=url, timeout=600) as client:
            while True:
                with lock:
                    if not todo:
                        return
                    seed = todo.pop()
                done[seed] = _job(client, params | {"seed": seed})

    threads = [threading.Thread(target=client_loop) for _ in range(a.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if len(done) != len(seeds) or any(job["status"] != "succeeded" for _, job in done.values()):
        raise RuntimeError("a service job did not succeed: " + json.dumps([j for _, j in done.values()])[:2000])
    return wall, [done[s][0] for s in seeds], [done[s][1] for s in seeds]


def same_pixels(url: str, job: dict, image) -> bool:
    """Whether the service's image of `job` has the pixels of the direct call's `image`."""
    import io

    import httpx
    from PIL import Image

    png = httpx.get(url + job["result"]["images"][0]["url"]).content
    return bool(np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), np.asarray(image)))


# ---------------------------------------------------------------- measuring and writing


def measure(pipe, url: str, a) -> dict:
    """Per-round seconds per image both ways, their ratios, every latency, and the pixel check."""
    rows, latencies, same = [], [], None
    for r in range(a.rounds):
        seeds = [a.seed + r * a.jobs + i for i in range(a.jobs)]
        ways = ("direct", "service") if r % 2 == 0 else ("service", "direct")  # alternate which goes first
        row = {"round": r, "first": ways[0]}
        for way in ways:
            if way == "direct":
                seconds, first_image = direct(pipe, a, seeds)
                row["direct_s_per_image"] = seconds / a.jobs
            else:
                wall, lat, jobs = service(url, a, seeds)
                row["service_s_per_image"] = wall / a.jobs
                latencies += lat
        if r == 0:
            same = same_pixels(url, jobs[0], first_image)
        row["overhead"] = row["service_s_per_image"] / row["direct_s_per_image"]
        rows.append({k: rnd(v) if isinstance(v, float) else v for k, v in row.items()})
        print(f"round {r}: direct {row['direct_s_per_image']:.4f} s/image, service {row['service_s_per_image']:.4f}")
    return {"rows": rows, "latencies": latencies, "same_pixels": same}


def summary(m: dict) -> dict:
    rows = m["rows"]
    lat = np.asarray(m["latencies"])
    ratios = _common.rounds([r["overhead"] for r in rows])
    service_s = _common.rounds([r["service_s_per_image"] for r in rows])
    return {
        "direct_s_per_image": _common.rounds([r["direct_s_per_image"] for r in rows]),
        "service_s_per_image": service_s,
        "throughput_images_per_s": rnd(1 / service_s["median"]),
        "latency_s": {
            "p50": rnd(float(np.percentile(lat, 50))),
            "p95": rnd(float(np.percentile(lat, 95))),
            "n": len(lat),
        },
        "overhead": ratios,
        "same_pixels": m["same_pixels"],
        "targets": {
            "overhead_per_image_le_5pct": _common.speedup_target(
                ratios, TARGET, "<=", measured="service / direct seconds per image, by round"
            )
        },
    }


def plot(res: dict, path: Path) -> None:
    plt = _common.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rounds_ = [r["round"] for r in res["rounds"]]
    for key, label in (("direct_s_per_image", "direct pipeline call"), ("service_s_per_image", "service")):
        left.plot(rounds_, [r[key] for r in res["rounds"]], "o-", label=label)
    left.set(xlabel="round", ylabel="seconds per image", title=f"overhead {res['overhead']['median']:.3f}x")
    left.legend()
    right.hist(res["latencies_s"], bins=30)
    p50, p95 = res["latency_s"]["p50"], res["latency_s"]["p95"]
    right.set(
        xlabel="seconds from POST to final event", ylabel="jobs", title=f"latency p50 {p50:.3f} s, p95 {p95:.3f} s"
    )
    _common.save_figure(fig, path, dpi=110)


def main(args: list[str]) -> dict:
    import stablekit

    a = parse(args)
    _common.set_threads(a)
    pipe = stablekit.load(a.model, device=a.device)
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory(prefix="stablekit-bench-serve-") as tmp:
        proc, url = start_server(a, Path(tmp) / "data", Path(tmp) / "server.log")
        try:
            m = measure(pipe, url, a)
        finally:
            proc.terminate()
            proc.wait(60)
    config = {k: getattr(a, k) for k in ("jobs", "rounds", "clients", "steps", "guidance", "size", "prompt", "seed")}
    res = {"bench": "serve", "config": config | {"model": a.model, "device": str(pipe.device), "threads": a.threads}}
    res |= summary(m) | {"rounds": m["rows"], "latencies_s": [rnd(x) for x in m["latencies"]]}
    _common.write_json(a.json, res)
    plot(res, a.json.with_suffix(".png"))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
