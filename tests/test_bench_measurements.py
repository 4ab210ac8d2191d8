"""benchmarks/measurements.py end to end at tiny scale: every method at each ratio, the JSON, the plots, targets."""

import json

from stablekit.cli.bench import load_benchmark


def test_measurements_benchmark_tiny(tmp_path):
    out = tmp_path / "cs.json"
    args = ["--json", str(out), "--images", "2", "--ratios", "0.1", "0.3", "--steps", "2", "--particles", "2"]
    res = load_benchmark("measurements").main([*args, "--fit-steps", "1"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert out.with_suffix(".png").exists() and (tmp_path / "cs_examples.png").exists()
    for ratio in ("0.1", "0.3"):
        methods = res["ratios"][ratio]["methods"]
        assert set(methods) == {"interp", "random", "ads", "pinv", "diffusion"}
        assert all(m["n"] == 2 for m in methods.values())
    more = res["ratios"]["0.3"]["methods"]["pinv"]["psnr_db"] > res["ratios"]["0.1"]["methods"]["pinv"]["psnr_db"]
    assert more  # more measurements, a closer minimum-norm image
    assert res["targets"]["ads_beats_random_0.1"]["status"] == "inconclusive"  # 2 images < 20
