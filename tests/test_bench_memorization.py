"""benchmarks/memorization.py end to end at tiny scale on the default model, and its ROC helpers."""

import json

import numpy as np
import pytest

from stablekit.cli.bench import load_benchmark


def test_auc_and_tpr_at_fpr_on_known_samples():
    load_benchmark("memorization")  # puts benchmarks/ on sys.path
    import _common as bench

    assert bench.auc([3, 4], [1, 2]) == 1 and bench.auc([1, 2], [3, 4]) == 0 and bench.auc([1], [1]) == 0.5
    neg = np.arange(100.0)  # threshold at 1% FPR: above 98, so only scores over 98 count
    assert bench.tpr_at([98.5, 50, 120], neg, 0.01) == pytest.approx(2 / 3)


def test_memorization_benchmark_end_to_end(tmp_path):
    bench = load_benchmark("memorization")
    out = tmp_path / "m.json"
    args = ["--json", out, "--heldout", "8", "--steps", "2", "--quality-prompts", "4", "--memo-seeds", "1"]
    res = bench.main([str(a) for a in args + ["--methods", "nemo"]])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").exists()
    det = res["detection"]
    assert det["first_step"]["n"] == {"memorized": 10, "paraphrases": 50, "heldout": 8, "calibration": 4}
    assert 0 <= det["first_step"]["auc"] <= 1 and len(det["scores"]["heldout"][0]) == 2
    assert det["informative_step"]["step"] == 1 and len(det["auc_per_step"]) == 2
    rows = res["mitigation"]["methods"]
    assert list(rows) == ["none", "nemo"] and rows["nemo"]["memorization"]["n"] == 10
    assert "attr_acc_delta" in rows["nemo"] and len(rows["none"]["max_ssim_per_scene"]) == 10
    assert res["targets"]["detection_auc_first_step"]["status"] in ("met", "not met", "inconclusive")
