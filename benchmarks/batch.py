"""Benchmark `stablekit batch`: images per second with 1 and 2 local workers, and Ray's overhead on the same job.

    stablekit bench batch --json bench_out/batch.json                      # 200 images, 3 rounds (about 20 min)
    stablekit bench batch --json out.json --images 8 --rounds 2 --steps 2 --no-ray        # a quick look
    stablekit bench batch --json out.json --ray HOST:6379                  # Ray on an existing cluster

One job of ``--images`` rows (world prompts, one seed per row) on the embedded default model (or ``--model``),
``--steps`` steps at the model's size. Each of ``--rounds`` rounds runs the whole job into a fresh folder three
ways, in a rotating order: the local executor with one worker, with two workers, and Ray Data with two actors
(a local Ray instance started once before the rounds, its start-up timed apart as ``ray_startup_s``; or the
cluster of ``--ray``). A run's time is the wall time of :func:`stablekit.batch.run`, worker start-up and model
loading included, as a user waits for it. Each worker runs ``--threads`` torch threads (default 1).

Targets, judged on the 95% interval of the per-round ratios (``benchmarks/_common.py``; at least 3 rounds, and
inconclusive when the rounds disagree by more than 5%): two workers at least 1.6x one worker's images per second;
Ray's time at most 1.10x the local executor's with the same number of workers (an overhead of at most 10%, meant
on a job of 200 images). The images must be bit-identical in all three ways (checked by their SHA-256).
Writes the JSON and a PNG (images per second, each round a point).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common

WAYS = ("one", "two", "ray")


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stablekit bench batch", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=777, seed_help="world scene seed of the prompts (training used 0)")
    p.add_argument("--images", type=int, default=200, help="rows of the job")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs the job three ways)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    p.add_argument("--size", type=int, default=None, help="image side [default: the model's]")
    p.add_argument("--no-ray", action="store_true", help="time the local executor only")
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="an existing Ray cluster [default: a local one]")
    return p.parse_args(args)


def write_job(path: Path, a) -> Path:
    """The job file: one world caption per row, seeds 0, 1, ... (a row's position)."""
    import json

    from stablekit.default_model import world

    scenes = [scene for _, _, scene in world.dataset(a.images, a.seed)]
    size = {"size": f"{a.size}x{a.size}"} if a.size else {}
    rows = [{"prompt": world.canonical_caption(s), "steps": a.steps} | size for s in scenes]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def start_ray(a) -> float | None:
    """Connect to --ray's cluster, or start a local Ray instance with two CPUs; its seconds (None without Ray)."""
    if a.no_ray:
        return None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    t0 = time.perf_counter()
    if a.ray:
        ray.init(address=a.ray, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=2 * (a.threads or 1), include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - t0


def timed(way: str, jobs: Path, work: Path, a) -> tuple[float, dict[str, str]]:
    """(seconds, ``{id: sha256}``) of one run of the job `way`, into a fresh folder."""
    from stablekit import batch

    out = work / way
    shutil.rmtree(out, ignore_errors=True)
    kw = dict(model=a.model, device=a.device, threads=a.threads or 1, progress=False)
    t0 = time.perf_counter()
    batch.run(jobs, out, workers=1 if way == "one" else 2, ray="auto" if way == "ray" else None, **kw)
    seconds = time.perf_counter() - t0
    return seconds, {r["id"]: r["sha256"] for r in batch.read_manifest(out)}


def measure(jobs: Path, work: Path, a) -> tuple[dict, bool]:
    """Seconds per way per round, and whether every way gave the same images."""
    ways = [w for w in WAYS if w != "ray" or not a.no_ray]
    seconds = {w: [] for w in ways}
    hashes = {}
    for r in range(a.rounds):
        for way in ways[r % len(ways) :] + ways[: r % len(ways)]:  # the order rotates: drifts hit every way
            took, hashes[way] = timed(way, jobs, work, a)
            seconds[way].append(took)
            print(f"round {r + 1}/{a.rounds} {way}: {took:.1f} s", file=sys.stderr)
    return seconds, len({tuple(sorted(h.items())) for h in hashes.values()}) == 1


def results(seconds: dict, identical: bool, startup: float | None, a) -> dict:
    rate = {w: _common.rounds([a.images / s for s in xs]) for w, xs in seconds.items()}
    speedup = _common.rounds([one / two for one, two in zip(seconds["one"], seconds["two"], strict=True)])
    targets = {
        "two_workers_speedup": _common.speedup_target(speedup, 1.6, ">=", images=a.images),
        "identical_images": _common.exact(identical),
    }
    out = {"config": {k: v for k, v in vars(a).items() if k != "json"} | {"json": str(a.json)}}
    out |= {"images_per_second": rate, "speedup_two_over_one": speedup, "seconds": seconds}
    if "ray" in seconds:
        overhead = _common.rounds([r / two for r, two in zip(seconds["ray"], seconds["two"], strict=True)])
        out |= {"ray_over_local": overhead, "ray_startup_s": _common.rnd(startup)}
        targets["ray_overhead"] = _common.speedup_target(overhead, 1.10, "<=", images=a.images)
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return out | {"targets": targets, "load_average": load}


def plot(res: dict, path: Path) -> None:
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = {"one": "local, 1 worker", "two": "local, 2 workers", "ray": "Ray, 2 actors"}
    for i, rate in enumerate(res["images_per_second"].values()):
        ax.bar(i, rate["median"], color="#9ab")
        ax.plot([i] * len(rate["all"]), rate["all"], "k.")
    ax.set_xticks(range(len(res["images_per_second"])), [labels[w] for w in res["images_per_second"]])
    ax.set_ylabel("images / second (median; dots: rounds)")
    ax.set_title(f"stablekit batch, {res['config']['images']} images")
    _common.save_figure(fig, path)


def main(args: list[str]) -> dict:
    a = parse(args)
    with tempfile.TemporaryDirectory(prefix="stablekit-bench-batch-") as tmp:
        work = Path(tmp)
        jobs = write_job(work / "jobs.jsonl", a)
        startup = start_ray(a)
        try:
            seconds, identical = measure(jobs, work, a)
        finally:
            if startup is not None:
                import ray

                ray.shutdown()
    res = results(seconds, identical, startup, a)
    _common.write_json(a.json, res)
    plot(res, Path(a.json).with_suffix(".png"))
    print(f"wrote {a.json} and {Path(a.json).with_suffix('.png')}")
    return res
