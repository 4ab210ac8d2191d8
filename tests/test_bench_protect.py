"""benchmarks/protect.py end to end at tiny scale on the default model: every method, image kind and measure;
a cost-only run, and the merge of runs made apart."""

import json
import math

import pytest

from stablekit import StablekitError
from stablekit.cli.bench import load_benchmark


def test_protect_benchmark_runs_apart_and_merged(tmp_path):
    bench = load_benchmark("protect")
    out, cost, merged = tmp_path / "protect.json", tmp_path / "cost.json", tmp_path / "merged.json"
    res = bench.main(
        [
            "--json",
            str(out),
            "--photos",
            "1",
            "--faces",
            "1",
            "--world",
            "1",
            "--eps",
            "8/255",
            "--steps",
            "1",
            "--strengths",
            "0.2",
            "--edit-steps",
            "5",
            "--cost-steps",
            "0",
            "--min-psnr",
            "35",
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and "cost" not in res
    assert out.with_suffix(".png").exists() and (tmp_path / "protect_curves.png").exists()
    assert res["images"] == ["astronaut", "face0", "world0"]
    assert res["min_psnr"] == 35
    for m in bench.METHODS:
        r = res["results"]["8/255"][m]
        assert r["images"] == 3 and r["psnr_db"] >= 35 and 0 < r["ssim"] <= 1  # the floor holds in PNG
        assert r["sdedit"]["0.2"]["ratio_mse_vs_random"] > 0 and set(r["resilience"]) >= {"jpeg75", "purify0.2"}
        low, high = r["sdedit"]["0.2"]["ratio_mse_vs_random_ci95"]  # paired bootstrap over the 3 images
        assert 0 < low <= high
        assert r["psnr_db_ci95"][0] <= r["psnr_db"] <= r["psnr_db_ci95"][1] and r["psnr_db_min"] >= 35
        assert res["targets"]["psnr_at_8_255_ge_35db"][m]["status"] == "inconclusive"  # 3 images: too few
        assert "ratio_mse_vs_random" in r["inpaint"] and 0 <= r["world_joint_acc"]["0.2"] <= 1
        by_kind = r["sdedit_by_kind"]  # one image of each kind: the overall mean is the mean of the three
        assert set(by_kind) == {"photo", "face", "world"}
        mean = sum(v["0.2"]["mse"] for v in by_kind.values()) / 3
        assert math.isclose(mean, r["sdedit"]["0.2"]["mse"], rel_tol=1e-9)
    only = bench.main(
        [
            "--json",
            str(cost),
            "--photos",
            "0",
            "--faces",
            "0",
            "--world",
            "0",
            "--cost-steps",
            "1",
            "--methods",
            "semantic",
            "sds",
        ]
    )
    assert only["results"] == {"8/255": {}, "16/255": {}} and set(only["cost"]["methods"]) == {"semantic", "sds"}
    assert all(len(r["seconds_per_step_rounds"]) == 3 for r in only["cost"]["methods"].values())  # --cost-rounds
    assert only["cost"]["sds_vs_semantic"]["time_rounds"]["n"] == 3
    assert 0.3 < only["cost"]["sds_vs_semantic"]["flops"] < 1  # SDS skips the UNet's backward pass, not the VAE's
    both = bench.main(["--json", str(merged), "--merge", str(cost), str(out)])
    assert both["results"] == res["results"] and both["cost"] == only["cost"] and both["images"] == res["images"]
    assert both["methods"] == list(bench.METHODS) and set(both["targets"]) >= {"sds_time_le_0.6x_semantic"}
    (tmp_path / "other.json").write_text("5")
    for bad in ("other.json", "missing.json"):
        with pytest.raises(StablekitError, match=f"cannot merge '.*{bad}'"):
            bench.main(["--json", str(merged), "--merge", str(out), str(tmp_path / bad)])
