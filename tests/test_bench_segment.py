"""benchmarks/segment.py end to end at tiny scale: both heads, IoU and boundary F, the JSON, the plot."""

import json

import torch

from stablekit.cli.bench import load_benchmark


def test_segment_benchmark_tiny(tmp_path):
    bench = load_benchmark("segment")
    out = tmp_path / "segment.json"
    res = bench.main(["--json", str(out), "--images", "4"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").exists()
    assert set(res["methods"]) == {"diffdis", "pixel_head"}
    assert res["methods"]["diffdis"]["unet_calls"] == 1 and res["methods"]["pixel_head"]["unet_calls"] == 0
    assert 0 <= res["methods"]["diffdis"]["iou"] <= 1


def test_boundary_f_is_one_for_a_match_and_tolerates_one_pixel():
    bench = load_benchmark("segment")
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:10, 4:10] = 1
    shifted = mask.roll(1, -1)
    assert bench.boundary_f(mask, mask, 1) == 1.0
    assert bench.boundary_f(shifted, mask, 1) > 0.9 and bench.boundary_f(shifted, mask, 0) < 0.8
    assert bench.iou(mask, mask) == 1.0
