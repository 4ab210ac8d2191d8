"""benchmarks/watermark.py end to end at tiny scale for Safe-SD: its triggered, untriggered and base sets, the
trigger layer's counts, the clean and attacked rows, quality and the plot are written, and the JSON equals what
main returns."""

import json

from stablekit.cli.bench import load_benchmark


def test_watermark_benchmark_measures_safe_sd_with_and_without_its_trigger(tmp_path):
    out = tmp_path / "watermark.json"
    args = ["--methods", "safe-sd", "--attacks", "jpeg", "--n", "4", "--calib", "4", "--attack-n", "2"]
    args += ["--spoof-n", "2", "--steps", "2", "--batch", "4", "--threads", "1"]
    res = load_benchmark("watermark").main(["--json", str(out), *args])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").is_file()
    assert [r["attack"] for r in res["rows"]] == ["clean", "jpeg", "jpeg", "jpeg"]
    assert all(0 <= r["safe-sd"]["tpr@0.01"] <= 1 for r in res["rows"])
    s = res["safe_sd"]
    assert s["n"] == 4 and s["untriggered_identical_to_unmarked"] == 1.0  # untriggered: the unmarked model exactly
    assert s["trigger_fires_untriggered"] == 0.0 and s["trigger_fires_triggered"] == 1.0
    assert {"unmarked", "safe-sd", "safe-sd:untriggered", "safe-sd:base"} <= set(res["quality"])
    assert [f["attack"] for f in res["forgeries"]] == ["avg_spoof", "avg_removal"]
