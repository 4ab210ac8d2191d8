"""benchmarks/latency.py at tiny size: the breakdown of generate, UNet calls with counted FLOPs against measured
matmul peaks in both precisions, the fresh-process command-line times, the bf16 accuracy check, JSON and PNG."""

import json
import math

from stablekit.cli.bench import load_benchmark


def test_latency_benchmark_breaks_generate_down_and_rates_the_unet(tmp_path):
    bench = load_benchmark("latency")
    out = tmp_path / "latency.json"
    args = ["--json", str(out), "--rounds", "2", "--steps", "2", "--batches", "1,2", "--matmul", "64"]
    args += ["--folder-size", "64", "--folder", str(tmp_path / "sd15")]
    res = bench.main([*args, "--sd15-size", "64", "--tiny-sd15", "--accuracy-prompts", "4", "--cli-rounds", "1"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    parts = res["breakdown"]
    assert set(parts) == {"load", "encode", "denoise", "step", "decode", "save"}
    assert all(p["n"] == 2 and p["median"] > 0 for p in parts.values())
    assert math.isclose(parts["step"]["all"][0], parts["denoise"]["all"][0] / 1, rel_tol=1e-6)  # 2 steps: 1 gap
    assert set(res["matmul_gflop_per_s"]) == {"float32", "bfloat16"}
    rows = res["unet"]["embedded"]
    assert [(r["dtype"], r["batch"]) for r in rows] == [(d, b) for d in ("float32", "bfloat16") for b in (1, 2)]
    by = {(r["dtype"], r["batch"]): r for r in rows}
    assert math.isclose(by["float32", 2]["gflop"], 2 * by["float32", 1]["gflop"], rel_tol=0.01)  # FLOPs scale
    assert by["float32", 1]["gflop"] == by["bfloat16", 1]["gflop"]  # the dtype changes the speed, not the count
    for r in rows:
        assert math.isclose(r["gflop_per_s"], r["gflop"] / r["seconds"]["median"], rel_tol=0.01)
    assert [r["side"] for r in res["unet"]["sd15"]] == [8, 8]  # 64 px: latents of 8
    assert res["cli"]["help"]["n"] == 1 and res["cli"]["generate_first_s"] > 0
    assert "torch" in res["cli"]["biggest_imports_s"]
    fc = res["folder"]  # fixed cost = the 1-step run less one step (half the 3-step run's extra)
    assert fc["steps_1"]["n"] == 2 and (tmp_path / "sd15" / "unet" / "config.json").exists()
    t1, t3 = fc["steps_1"]["all"][0], fc["steps_3"]["all"][0]
    assert math.isclose(fc["fixed_cost"]["all"][0], t1 - (t3 - t1) / 2, abs_tol=2e-3 * t3)  # 4 significant digits
    acc = res["accuracy"]
    assert acc["n"] == 4 and 0 <= acc["float32"]["attr_acc_mean"] <= 1
    assert res["targets"]["sd15_bf16_speedup_ge_1_8"]["status"] == "inconclusive"  # 2 rounds: fewer than 3
    assert res["targets"]["bf16_accuracy_within_1_point"]["status"] == "inconclusive"  # 4 prompts: fewer than 32
