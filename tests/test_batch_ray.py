"""`stablekit batch --ray` on a real two-node Ray cluster started on this machine (one CPU per node, usage statistics
and dashboard off) and shut down by this module: the same images as the local executor, one actor per node, a
job that completes, every row exactly once, when an actor is killed in the middle of it, and a benchmark whose
images are made on the cluster with the results of a local run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray")

from stablekit import batch  # noqa: E402
from stablekit.batch.manifest import MANIFEST, read_manifest  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        nodes.shutdown()


def write_jobs(path, n, steps=2, size="32x32"):
    rows = [{"id": f"row-{i}", "prompt": f"a red star number {i}", "steps": steps, "size": size} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ray_gives_the_local_executors_images(tmp_path, tiny_sd_path, cluster):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 4)
    local = batch.run(jobs, tmp_path / "local", model=str(tiny_sd_path), device="cpu")
    on_ray = batch.run(jobs, tmp_path / "ray", model=str(tiny_sd_path), device="cpu", ray=cluster.address)
    assert local["written"] == on_ray["written"] == 4
    expected = {r["id"]: r["sha256"] for r in read_manifest(tmp_path / "local")}
    records = read_manifest(tmp_path / "ray")
    assert {r["id"]: r["sha256"] for r in records} == expected
    local_workers = {r["worker"] for r in read_manifest(tmp_path / "local")}
    # made in Ray actors (one per node by default; which of them takes which row is Ray's choice on a loaded machine)
    assert {r["worker"] for r in records} and not {r["worker"] for r in records} & local_workers
    again = batch.run(jobs, tmp_path / "ray", model=str(tiny_sd_path), device="cpu", ray=cluster.address)
    assert (again["written"], again["skipped"]) == (0, 4)


def wait_for_rows(path, n, process, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        rows = read_manifest(path) if path.is_dir() else []
        if len(rows) >= n:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} rows in {path} (job exit code {process.poll()})")


def test_a_job_completes_every_row_once_when_an_actor_is_killed(tmp_path, tiny_sd_path, cluster):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 12, steps=8, size="64x64")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "stablekit.cli", "batch", str(jobs), "--out", str(out), "--ray", cluster.address]
    job = subprocess.Popen([*argv, "--model", str(tiny_sd_path), "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    try:
        first = wait_for_rows(out, 1, job)
        victim = int(first[0]["worker"].rpartition("/")[2])
        os.kill(victim, signal.SIGKILL)  # mid-job: its next rows are queued or running
        _, stderr = job.communicate(timeout=240)
    finally:
        job.kill()
    assert job.returncode == 0, stderr
    records = read_manifest(out)
    assert sorted(r["id"] for r in records) == sorted(f"row-{i}" for i in range(12))  # every row, exactly once
    assert len((out / MANIFEST).read_text().splitlines()) == 12
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"row-{i}.png" for i in range(12))
    assert len(first) < 12  # the kill came before the end of the job
    workers = {r["worker"] for r in records}
    assert len(workers) == 3  # the two actors, and the killed one restarted, which did its retried rows


def test_the_batch_benchmark_times_ray_on_the_cluster(tmp_path, tiny_sd_path, cluster):
    from stablekit.cli.bench import load_benchmark

    out = tmp_path / "batch.json"
    argv = ["--json", str(out), "--model", str(tiny_sd_path), "--device", "cpu", "--images", "2", "--rounds", "1"]
    res = load_benchmark("batch").main([*argv, "--steps", "1", "--size", "32", "--ray", cluster.address])
    assert res["targets"]["identical_images"]["status"] == "met"  # local and Ray: the same images
    assert res["ray_over_local"]["n"] == 1 and res["ray_over_local"]["median"] > 0
    assert res["targets"]["ray_overhead"]["status"] == "not measured"  # one round gives no interval


def test_a_benchmark_on_ray_gives_the_local_runs_results(tmp_path, cluster):
    from stablekit.cli.bench import load_benchmark

    bench = load_benchmark("default_model")
    argv = ["--prompts", "2", "--steps", "2", "--batch", "2", "--threads", "1"]
    local = bench.main([*argv, "--json", str(tmp_path / "local.json")])
    on_ray = bench.main([*argv, "--json", str(tmp_path / "ray.json"), "--ray", cluster.address, "--workers", "2"])
    timing = ("seconds_per_image",)
    assert {k: v for k, v in on_ray.items() if k not in timing} == {k: v for k, v in local.items() if k not in timing}
    assert local["two_object_prompts"] == 1 and on_ray["seconds_per_image"] > 0
