"""benchmarks/serve.py end to end at tiny scale: the real server beside the direct pipeline, the same images both
ways, per-round seconds per image, overhead ratios, latencies, the target judged on rounds, JSON and PNG."""

import json
import math

from stablekit.cli.bench import load_benchmark


def test_serve_benchmark_measures_both_ways_on_the_same_images(tmp_path):
    bench = load_benchmark("serve")
    out = tmp_path / "serve.json"
    args = ["--json", str(out), "--jobs", "3", "--rounds", "2", "--clients", "2", "--steps", "1", "--size", "8"]
    res = bench.main([*args, "--device", "cpu"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert res["same_pixels"] is True  # the service ran the pipeline with the direct call's parameters
    assert [r["first"] for r in res["rounds"]] == ["direct", "service"]  # alternating
    for r in res["rounds"]:
        assert r["direct_s_per_image"] > 0 and r["service_s_per_image"] > 0
        assert math.isclose(r["overhead"], r["service_s_per_image"] / r["direct_s_per_image"], rel_tol=1e-2)
    assert res["overhead"]["n"] == 2 and sorted(res["overhead"]["all"]) == sorted(r["overhead"] for r in res["rounds"])
    assert len(res["latencies_s"]) == 6 and res["latency_s"]["n"] == 6
    assert 0 < res["latency_s"]["p50"] <= res["latency_s"]["p95"] <= max(res["latencies_s"])
    assert math.isclose(res["throughput_images_per_s"], 1 / res["service_s_per_image"]["median"], rel_tol=1e-2)
    target = res["targets"]["overhead_per_image_le_5pct"]
    assert target["threshold"] == 1.05 and target["side"] == "<="
    assert target["status"] == "inconclusive" and target["n"] == 2  # two rounds: fewer than a target needs
    assert res["config"] | {"jobs": 3, "rounds": 2, "clients": 2, "steps": 1, "size": 8} == res["config"]
