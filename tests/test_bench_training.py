"""benchmarks/training.py end to end at a tiny size: recipes trained, judged at their checkpoints, probed and
certified, each claim given a verdict with an interval, and a rerun resumed from the cached runs."""

import json

from stablekit.cli.bench import load_benchmark


def test_training_benchmark_at_a_tiny_size(tmp_path):
    bench = load_benchmark("training")
    out = tmp_path / "training.json"
    args = ["--json", str(out), "--size", "tiny", "--steps", "3", "--batch", "2", "--captions", "4"]
    args += ["--variants", "1", "--prompts", "2", "--sample-steps", "1", "--recipes", "plain", "spd", "rrcm"]
    args += ["--probe-train", "24", "--probe-test", "6", "--certify", "2", "--n0", "2", "--n", "4", "--seeds", "1"]
    res = bench.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").exists()
    assert res["checkpoints"] == [1, 2, 3] and res["seeds_done"] == 1
    for name in ("plain", "spd", "rrcm"):
        run = res["runs"][name]["0"]
        assert sorted(run["checkpoints"]) == ["1", "2", "3"] and len(run["loss_curve"]) == 3
        assert set(run["linear_probe_accuracy"]) == {"background", "shape", "color", "texture"}
        assert all(0 <= run["cert"][str(r)] <= 1 for r in res["radii"])
    assert "dds" in res["runs"]["plain"]["0"] and "dds" not in res["runs"]["spd"]["0"]
    assert set(res["claims"]) == {"spd", "rrcm"}
    for claim in res["claims"].values():
        assert claim["verdict"] in ("confirmed", "refuted", "inconclusive") and claim["n_prompts"] == 2
        for key in claim["judged_on"]:
            assert claim[key]["verdict"] in ("confirmed", "refuted", "inconclusive")
    cached = sorted(p.name for p in (tmp_path / "training_runs").iterdir())
    assert cached == ["plain-seed0.pt", "rrcm-seed0.pt", "settings.json", "spd-seed0.pt"]
    again = bench.main([*args, "--seeds", "2", "--cached-only"])  # the finished runs, nothing trained
    assert again["runs"] == res["runs"] and again["seeds_per_recipe"] == {"plain": 1, "spd": 1, "rrcm": 1}
    assert sorted(p.name for p in (tmp_path / "training_runs").iterdir()) == cached
