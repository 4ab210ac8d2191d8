"""Laundering forensics: the shipped two-stage detector tells held-out pristine images from their VAE-laundered
copies and laundered from generated images; patches tile any image; the command line labels images and
refuses bad ones with one line."""

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import stablekit
from stablekit import cli
from stablekit.provenance import laundering as L

N = 6


@pytest.fixture(scope="module")
def sets():
    pipe = stablekit.load(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    pristine = L.world_images(N, 4242) + L.photo_crops(L.TEST_PHOTOS, N, 4242)
    gen = L.generated(pipe, ["a red star on a gray background", "a blue circle in the top left"] * 2, 4242, steps=10)
    return {"pristine": pristine, "laundered": L.launder(pipe, pristine), "generated": gen}


def test_stage_one_separates_pristine_from_laundered_copies(sets):
    before, after = L.logits(sets["pristine"])[:, 0], L.logits(sets["laundered"])[:, 0]
    assert (after > before).mean() >= 0.9  # each copy looks more synthetic than its original
    labels = [r["label"] for r in L.classify(sets["pristine"])]
    assert labels.count("pristine") >= 0.8 * len(labels)


def test_stage_two_separates_laundered_from_generated(sets):
    lau, gen = L.logits(sets["laundered"])[:, 1], L.logits(sets["generated"])[:, 1]
    pairs = (gen[:, None] > lau[None]).mean()  # the AUC of stage 2 on these images
    assert pairs >= 0.85
    assert all(r["label"] != "pristine" for r in L.classify(sets["generated"]))


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


def test_cli_labels_images_and_refuses_small_ones(sets, tmp_path):
    sets["pristine"][0].save(tmp_path / "real.png")
    sets["generated"][0].save(tmp_path / "gen.png")
    res = CliRunner().invoke(cli.cli, ["forensics", str(tmp_path / "real.png"), str(tmp_path / "gen.png"), "--json"])
    assert res.exit_code == 0, res.output
    assert '"label": "pristine"' in res.output and '"label": "generated"' in res.output
    Image.new("RGB", (32, 32)).save(tmp_path / "small.png")
    bad = CliRunner().invoke(cli.cli, ["forensics", str(tmp_path / "small.png")])
    assert bad.exit_code == 2 and bad.output.startswith("error:") and len(bad.output.splitlines()) == 1
