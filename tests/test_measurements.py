"""Compressed sensing and Active Diffusion Subsampling: exact operators and projections, the entropy ranking, the
posterior sampler's consistency and prior, ADS's budget, and `stablekit cs`."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import stablekit
from stablekit.cli import cli
from stablekit.latents import psnr
from stablekit.restore import active_subsampling as ads
from stablekit.restore import sr_net
from stablekit.restore.compressed_sensing import CSConfig, reconstruct
from stablekit.restore.measurements import BlockGaussian, PixelSubsampling

FAST = CSConfig(steps=3, particles=2, fit_steps=3)


@pytest.fixture(scope="module")
def pipe():
    p = stablekit.load(device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("op", [PixelSubsampling.random(0.2, (32, 48)), BlockGaussian(0.2)])
def test_projection_explains_the_measurements_and_keeps_the_truth(op):
    g = torch.Generator().manual_seed(0)
    truth, other = torch.rand(2, 1, 3, 32, 48, generator=g) * 2 - 1
    y = op.measure(truth)
    assert torch.allclose(op.measure(op.project(other, y)), y, atol=1e-5)
    assert torch.allclose(op.project(truth, y), truth, atol=1e-5)
    pinv = op.pinv(y, (32, 48)) if isinstance(op, BlockGaussian) else op.pinv(y)
    assert torch.allclose(op.measure(pinv), y, atol=1e-5) and pinv.norm() <= truth.norm()  # minimum norm
    assert op.ratio == pytest.approx(0.2, abs=0.01)


def test_entropy_ranks_the_cell_where_particles_disagree_first():
    x0 = torch.zeros(3, 3, 8, 8)
    x0[:, :, 4:6, 2:4] = torch.tensor([-1.0, 0.0, 1.0])[:, None, None, None]
    x0[:, :, 0:2, 0:2] = torch.tensor([0.0, 0.1, 0.0])[:, None, None, None]
    score = ads.cell_entropy(x0, 2)
    assert score.shape == (4, 4) and score.flatten().topk(2).indices.tolist() == [2 * 4 + 1, 0]
    assert ads.schedule(10, 4) == [3, 3, 2, 2]


def test_posterior_explains_the_measurements_and_uses_the_prior(pipe):
    x = sr_net.world_images(1, seed=4242)[:, :, :32, :32] * 2 - 1
    op = BlockGaussian(0.1)
    y = op.measure(x)
    out, particles, _, calls = reconstruct(pipe, op, y, (32, 32), FAST)
    assert calls == 3 and particles.shape == (2, 3, 32, 32)
    assert torch.allclose(op.measure(particles), y.expand(2, -1, -1), atol=1e-4)
    assert psnr(out, (x + 1) / 2) > psnr((op.pinv(y, (32, 32)).clamp(-1, 1) + 1) / 2, (x + 1) / 2) + 3


def test_active_subsampling_spends_its_budget_where_the_sensor_is_asked(pipe):
    x = sr_net.world_images(1, seed=4243)[:, :, :32, :32] * 2 - 1
    asked = []

    def sensor(op):
        asked.append(int(op.mask.sum()))
        return op.measure(x)

    out, particles, op, _ = ads.active_subsampling(pipe, sensor, (32, 32), 0.25, FAST, hold=1)
    assert asked == [32, 64] and int(op.mask.sum()) == 64  # 25% of 256 cells, over steps - hold = 2 steps
    m = op.pixels().bool().expand(2, 3, -1, -1)
    assert torch.allclose(particles[m], x.expand(2, -1, -1, -1)[m], atol=1e-6)


def _run(args):
    return CliRunner().invoke(cli, args)


def test_cs_command_writes_the_reconstruction(tmp_path):
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(np.full((32, 64, 3), 100, np.uint8)).save(src)
    res = _run(
        ["cs", str(src), "-o", str(out), "--operator", "pixels", "--active", "--steps", "2", "--particles", "2"]
    )
    assert res.exit_code == 0, res.output
    assert Image.open(out).size == (64, 32)


@pytest.mark.parametrize(
    "size, extra, message",
    [
        ((40, 32), [], "40x32"),
        ((32, 32), ["--ratio", "0"], "ratio"),
        ((32, 32), ["--active"], "--operator pixels"),
        ((32, 32), ["--operator", "pixels", "--active", "--particles", "1"], "2 particles"),
    ],
)
def test_cs_refuses_bad_input_in_one_line(tmp_path, size, extra, message):
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.new("RGB", size).save(src)
    res = _run(["cs", str(src), "-o", str(out), "--steps", "1", *extra])
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()
