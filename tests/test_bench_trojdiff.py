"""benchmarks/trojdiff.py end to end at a tiny size: a backdoor trained, both models judged, verdicts."""

import json

from stablekit.cli.bench import load_benchmark


def test_trojdiff_benchmark_at_a_tiny_size(tmp_path):
    bench = load_benchmark("trojdiff")
    out = tmp_path / "trojdiff.json"
    args = ["--json", str(out), "--images", "4", "--steps", "1", "--batch", "2", "--prompts", "4"]
    res = bench.main([*args, "--sample-steps", "1", "--bootstrap", "5"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").exists()
    assert set(res["models"]) == {"clean", "backdoored"} and res["fd_ratio"]["value"] > 0
    assert all(t["status"] == "inconclusive" for t in res["targets"].values())  # 4 prompts are too few
