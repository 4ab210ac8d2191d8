"""benchmarks/quant.py end to end at tiny scale: quality entries against full precision with paired intervals and
judged targets, the speed part's rounds and memory ratios, JSON and PNGs."""

import json

from stablekit.cli.bench import load_benchmark


def test_quant_benchmark_at_tiny_scale(tmp_path):
    bench = load_benchmark("quant")
    out = tmp_path / "quant.json"
    args = ["--json", str(out), "--threads", "1", "--prompts", "2", "--samples", "2", "--calib-prompts", "1"]
    args += ["--steps", "2", "--only", "naive w8a8,svdquant w4a4", "--unet", "tiny", "--size", "64", "--rounds", "2"]
    res = bench.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    for part in ("quality", "speed"):
        assert out.with_name(f"quant-{part}.png").read_bytes()[:4] == b"\x89PNG"
    q = res["quality"]
    assert [e["label"] for e in q["entries"]] == ["naive w8a8", "svdquant w4a4"]
    for e in q["entries"]:
        d = e["attr_acc_delta"]
        assert d["ci95"][0] <= d["points"] <= d["ci95"][1]
        assert e["weight_bytes"] < q["fp32_unet_bytes"] and e["execution"] == {"simulated": 133}
    target = q["targets"]["w4a4_attr_acc_within_6_points"]
    assert target["entry"] == "svdquant w4a4" and target["status"] == "inconclusive"  # 2 prompts: too few
    s = res["speed"]
    assert set(s["seconds"]) == {"fp32", "bf16", "ours_w8a8_int8"} and s["seconds"]["fp32"]["n"] == 2
    assert set(s["execution"]) == {"int8 kernels"}  # every layer of the naive W8A8 model on the int8 kernels
    m = s["memory"]
    assert 0 < m["w4a8_ratio"] < m["w8a8_ratio"] < 1
    assert s["targets"]["w8a8_speedup_over_fp32_ge_1.5"]["status"] == "inconclusive"  # 2 rounds
