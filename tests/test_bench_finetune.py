"""benchmarks/finetune.py end to end at a tiny size: both modes fine-tuned and judged, with verdicts."""

import json

from stablekit.cli.bench import load_benchmark


def test_finetune_benchmark_at_a_tiny_size(tmp_path):
    bench = load_benchmark("finetune")
    out = tmp_path / "finetune.json"
    args = ["--json", str(out), "--images", "4", "--steps", "2", "--batch", "2", "--prompts", "3"]
    res = bench.main([*args, "--sample-steps", "1"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").exists()
    assert set(res["modes"]) == {"lora", "full"}
    assert res["modes"]["lora"]["written_mb"] < res["modes"]["full"]["written_mb"]
    assert all(t["status"] == "inconclusive" for t in res["targets"].values())  # 3 prompts are too few
