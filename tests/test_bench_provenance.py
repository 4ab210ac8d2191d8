"""benchmarks/wouaf.py and benchmarks/forensics.py end to end at tiny scale on the default model: every row,
target and plot is written, and the JSON equals what main returns."""

import json

from stablekit.cli.bench import load_benchmark


def test_wouaf_benchmark_writes_attribution_rows_quality_and_targets(tmp_path):
    out = tmp_path / "wouaf.json"
    args = ["--n", "4", "--calib", "3", "--users", "3", "--steps", "2", "--batch", "4", "--threads", "1"]
    res = load_benchmark("wouaf").main(["--json", str(out), *args])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").is_file()
    assert [r["attack"] for r in res["rows"]] == ["clean", "jpeg", "resized_crop", "noise"]
    assert all(0 <= r["attribution"] <= 1 and r["n"] == 4 for r in res["rows"])
    assert res["quality"]["psnr_db"] > 0 and "attr_acc_delta" in res["quality"]
    assert all(t["status"] in ("met", "not met", "inconclusive") for t in res["targets"].values())


def test_forensics_benchmark_writes_aucs_and_targets(tmp_path):
    out = tmp_path / "forensics.json"
    args = ["--n", "3", "--steps", "2", "--reps", "20", "--threads", "1"]
    res = load_benchmark("forensics").main(["--json", str(out), *args])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").is_file()
    for name in ("clean", "jpeg90"):
        r = res[name]
        assert all(0 <= r[k]["auc"] <= 1 for k in r if k != "label_accuracy") and r["label_accuracy"]["n"] == 15
    assert set(res["targets"]) == {"pristine_vs_laundered", "laundered_vs_generated"}
