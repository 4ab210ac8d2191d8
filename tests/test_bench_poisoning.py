"""benchmarks/poisoning.py end to end at a tiny size: both variants fine-tuned, judged, and given verdicts."""

import json

from stablekit.cli.bench import load_benchmark


def test_poisoning_benchmark_at_a_tiny_size(tmp_path):
    bench = load_benchmark("poisoning")
    out = tmp_path / "poisoning.json"
    args = ["--json", str(out), "--prompts", "4", "--steps", "2", "--batch", "2", "--sanitizing", "2"]
    res = bench.main([*args, "--sample-steps", "1", "--poisoned", "2"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").exists()
    assert set(res["variants"]) == {"basic", "utility"}
    assert res["variants"]["utility"]["set"] == {"poisoned": 2, "sanitizing": 2}
    assert res["variants"]["basic"]["filter_flags"]["poisoned"] == 1.0
    for t in res["targets"].values():
        assert t["status"] == "inconclusive"  # 4 prompts are fewer than a target's minimum
