"""Laundering forensics: patches tile any image, the two-stage trainer learns a split it can learn, the command
line labels images by the two stages' probabilities and refuses bad ones with one line."""

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import stablekit
from stablekit import cli
from stablekit.provenance import laundering as L


def test_patches_tile_large_images_and_refuse_small_ones():
    x = torch.rand(3, 200, 130)
    p = L.patches(x, max_patches=4)
    assert p.shape == (4, 3, 64, 64) and torch.equal(p[0], x[:, :64, :64]) and torch.equal(p[-1], x[:, -64:, -64:])
    with pytest.raises(stablekit.StablekitError, match="at least 64x64"):
        L.patches(torch.rand(3, 32, 64))


def test_fit_learns_an_easy_split():
    dark = [Image.new("RGB", (64, 64), (i, i, i)) for i in range(0, 40, 5)]
    light = [Image.new("RGB", (64, 64), (200 + i, 200, 200)) for i in range(0, 40, 5)]
    noisy = [Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()) for _ in range(8)]
    net = L.fit({"pristine": dark, "laundered": light, "generated": noisy}, iters=60, batch=16, width=8)
    s = L.logits(dark + light + noisy, net)
    assert s[:8, 0].max() < s[8:, 0].min() and s[8:16, 1].max() < s[16:, 1].min()


def test_cli_labels_images_and_refuses_small_ones(tmp_path):
    L.world_images(1, 4242)[0].save(tmp_path / "real.png")
    L.photo_crops(L.TEST_PHOTOS, 1, 4242, size=150)[0].save(tmp_path / "photo.png")
    res = CliRunner().invoke(cli.cli, ["forensics", str(tmp_path / "real.png"), str(tmp_path / "photo.png"), "--json"])
    assert res.exit_code == 0, res.output
    found = json.loads(res.output)
    assert [f["image"] for f in found] == [str(tmp_path / "real.png"), str(tmp_path / "photo.png")]
    for f in found:
        assert f["label"] in L.LABELS and 0 <= f["p_synthetic"] <= 1 and 0 <= f["p_generated"] <= 1
        label = "pristine" if f["p_synthetic"] < 0.5 else "generated" if f["p_generated"] >= 0.5 else "laundered"
        assert f["label"] == label
    Image.new("RGB", (32, 32)).save(tmp_path / "small.png")
    bad = CliRunner().invoke(cli.cli, ["forensics", str(tmp_path / "small.png")])
    assert bad.exit_code == 2 and bad.output.startswith("error:") and len(bad.output.splitlines()) == 1
