"""benchmarks/anysize.py end to end at tiny scale on the default model, and its seam score on made-up images."""

import json

import torch

from stablekit.cli.bench import load_benchmark


def test_anysize_benchmark_counts_calls_and_judges_the_target(tmp_path):
    bench = load_benchmark("anysize")
    out = tmp_path / "anysize.json"
    args = ["--json", str(out), "--prompts", "2", "--steps", "2", "--size", "96x64", "--threads", "1"]
    res = bench.main(args + ["--sd15-unet", "tiny", "--sd15-size", "128x64", "--sd15-steps", "1"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert out.with_suffix(".png").stat().st_size > 0
    q = res["per_image"]
    assert q["plain"]["unet_calls"] == [2, 2]  # one call per step
    assert q["multidiffusion"]["unet_calls"] == [5 * 2] * 2  # latent 24x16, windows of 16 every 2: 5 per step
    assert q["fixed-tiles"]["unet_calls"] == [2 * 2] * 2
    shifted, md = q["shifted-tiles"]["unet_calls"], q["multidiffusion"]["unet_calls"]
    assert all(s <= m / 2 for s, m in zip(shifted, md, strict=True))
    assert res["targets"]["shifted_half_the_calls_seams_no_worse"]["parts"]["calls"]["status"] == "met"
    assert all(0 <= x <= 1 for m in q.values() for x in m["crop_acc"])
    compute = res["compute"]
    assert compute["plain"]["unet_calls"] == 1 and compute["multidiffusion"]["unet_calls"] == 9  # latent 16x8
    assert compute["shifted-tiles"]["unet_calls"] <= 2


def test_seam_score_sees_a_step_at_a_border_and_nothing_elsewhere():
    seam_score = load_benchmark("anysize").seam_score
    smooth = torch.linspace(0, 1, 64).repeat(3, 32, 1)
    assert abs(seam_score(smooth, set(), {32}) - 1) < 1e-4
    stepped = smooth.clone()
    stepped[..., 32:] += 0.2
    assert seam_score(stepped, set(), {32}) > 5
    crossed = smooth.clone()
    crossed[:, 10:14, 28:36] = 1  # an object crossing the border: a few of its pixels
    assert abs(seam_score(crossed, set(), {32}) - 1) < 0.05
    assert abs(seam_score(stepped, set(), {16}) - 1) < 1e-4  # the step is not at this border
    assert abs(seam_score(stepped.transpose(1, 2), {32}, set()) - seam_score(stepped, set(), {32})) < 1e-4
