"""benchmarks/training.py end to end at a tiny size: every recipe trained, judged at its checkpoints, and each
claim given a verdict with an interval."""

import json

from stablekit.cli.bench import load_benchmark


def test_training_benchmark_at_a_tiny_size(tmp_path):
    bench = load_benchmark("training")
    out = tmp_path / "training.json"
    args = ["--json", str(out), "--size", "tiny", "--steps", "3", "--batch", "2", "--captions", "4"]
    args += ["--variants", "1", "--prompts", "2", "--sample-steps", "1", "--recipes", "plain", "immiscible"]
    res = bench.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").exists()
    assert res["checkpoints"] == [1, 2, 3] and res["seeds_done"] == 1
    for name in ("plain", "immiscible"):
        run = res["runs"][name]["0"]
        assert sorted(run["checkpoints"]) == ["1", "2", "3"] and len(run["loss_curve"]) == 3
    claim = res["claims"]["immiscible"]
    assert claim["n_prompts"] == 2 and set(res["claims"]) == {"immiscible"}
    for key in ("accuracy_delta_points_at_final", "fd_delta_at_final", "final_third_loss_delta"):
        assert claim[key]["verdict"] in ("confirmed", "refuted", "inconclusive")
