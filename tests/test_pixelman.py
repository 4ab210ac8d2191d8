"""PixelMan: the object lands at its new place pixel for pixel, everything outside the vacated region is kept, the
vacated region no longer shows the object, and `edit --method pixelman` refuses bad masks and moves."""

import copy
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import stablekit
from stablekit.cli import cli
from stablekit.default_model import world
from stablekit.edit.pixelman import PixelManConfig, manipulate, pixelman, vacated_region
from stablekit.latents import psnr


def _scene(seed=3):
    scene = world.sample_scene(random.Random(seed), two_prob=0)
    obj = scene.objects[0]
    obj.cx, obj.cy, obj.r = 22.0, 30.0, 12.0
    return scene


def test_manipulation_moves_the_object_pixel_for_pixel():
    scene = _scene()
    x = torch.from_numpy(np.asarray(world.render(scene), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    m = torch.from_numpy(world.object_mask(scene.objects[0]))[None, None]
    moved, new_mask = manipulate(x, m, (16, -3), 1.0)
    inside = m[0, 0] > 0.999
    ys, xs = torch.nonzero(inside, as_tuple=True)
    assert torch.allclose(moved[0, :, ys - 3, xs + 16], x[0, :, ys, xs], atol=1e-5)
    assert torch.allclose(new_mask[0, 0, ys - 3, xs + 16], torch.ones(len(ys)), atol=1e-5)


@pytest.fixture(scope="module")
def embedded():
    pipe = stablekit.load(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pixelman_keeps_the_background_and_removes_the_object_from_its_old_place(embedded):
    scene = _scene()
    image, m = world.render(scene), world.object_mask(scene.objects[0])
    out, new_mask, calls = pixelman(embedded, image, m, "", PixelManConfig(move=(18, 0)))
    moved = copy.deepcopy(scene)
    moved.objects[0].cx += 18
    truth = np.asarray(world.render(moved), np.float64)
    a, src = np.asarray(out, np.float64), np.asarray(image, np.float64)
    hole = vacated_region(torch.from_numpy(m)[None, None], new_mask[None, None], 1)[0, 0].numpy()
    outside = ~hole & (new_mask.numpy() < 1e-6)  # not the vacated region, not the moved object (with its edge)
    assert np.abs(a[outside] - src[outside]).max() <= 1  # only rounding outside the vacated region
    assert 0 < calls <= 16
    # the vacated region: close to the true background, far from the copy that leaves the object there
    assert psnr(a[hole], truth[hole], 255) > psnr(src[hole], truth[hole], 255) + 6


def _edit(tmp_path, mask_size, extra=()):
    src, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    world.render(_scene()).save(src)
    Image.fromarray((world.object_mask(_scene().objects[0]) * 255).astype(np.uint8)).resize(mask_size).save(mask)
    args = ["edit", str(src), "--method", "pixelman", "--mask", str(mask), "-o", str(out), *extra]
    return CliRunner().invoke(cli, args), out


@pytest.mark.parametrize("decoder", ["vae", "asymmetric"])
def test_edit_pixelman_writes_the_moved_image(tmp_path, decoder):
    res, out = _edit(tmp_path, (64, 64), ["--move", "10,0", "--steps", "4", "--decoder", decoder])
    assert res.exit_code == 0, res.output
    assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize(
    "size, extra, message",
    [
        ((32, 64), ["--move", "4,0"], "the mask is 32x64"),
        ((64, 64), ["--move", "4"], "--move '4'"),
        ((64, 64), ["--target", "a star"], "--target does not apply"),
        ((64, 64), ["--resize", "9"], "--resize 9"),
    ],
)
def test_edit_pixelman_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, size, extra, message):
    res, out = _edit(tmp_path, size, extra)
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not out.exists()
