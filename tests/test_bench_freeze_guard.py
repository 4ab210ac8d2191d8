"""benchmarks/freeze_guard.py end to end at a tiny size: a mask learned, four user fine-tunes judged, verdicts."""

import json

from stablekit.cli.bench import load_benchmark


def test_freeze_guard_benchmark_at_a_tiny_size(tmp_path):
    bench = load_benchmark("freeze_guard")
    out = tmp_path / "freeze_guard.json"
    args = ["--json", str(out), "--images", "4", "--mask-steps", "1", "--steps", "1", "--batch", "2"]
    res = bench.main([*args, "--prompts", "3", "--sample-steps", "1", "--ratio", "0.25"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").exists()
    assert res["frozen"] == round(0.25 * res["tensors"])
    for d in ("forbidden", "legal"):
        assert set(res["rates"][d]) == {"base", "unprotected", "protected"} and res["rates"][d]["base"]["n"] == 3
    assert all(t["status"] == "inconclusive" for t in res["targets"].values())  # 3 prompts are too few
