"""benchmarks/students.py end to end at tiny scale: every row judged on the same prompts, calls and MACs counted."""

import json

from stablekit.cli.bench import load_benchmark


def test_students_benchmark_compares_rows_on_the_same_prompts(tmp_path):
    out = tmp_path / "students.json"
    args = ["--json", str(out), "--prompts", "4", "--teacher-steps", "2", "--student", "stablekit-default:2:7.5"]
    res = load_benchmark("students").main([*args, "--student", "stablekit-default:1"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").exists()
    first, same, one = res["rows"]
    assert first["unet_calls"] == 4 and one["unet_calls"] == 1  # guided steps call the UNet on both halves
    assert same["attr_acc_mean"] == first["attr_acc_mean"]  # the same model, prompts and noise
    assert same["delta_vs_first_points"]["points"] == 0
    assert first["macs_per_image"] == 4 * one["macs_per_image"] > 0
    assert len(res["targets"]) == 2  # the student rows are judged, not the teacher's
