"""Restoration: ResShift's chain (schedule, marginals, posterior), the shipped super-resolution networks against
untrained ones and bicubic, and `stablekit restore`'s refusals."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from stablekit.cli import cli
from stablekit.latents import psnr
from stablekit.restore import resshift, sr_diffusion, sr_net
from stablekit.restore.resshift import ResShift, ResShiftConfig


def test_schedule_is_the_papers():
    cfg = ResShiftConfig()
    sqrt_etas = cfg.etas().sqrt()
    assert len(sqrt_etas) == 4 and torch.all(sqrt_etas[1:] > sqrt_etas[:-1])
    assert sqrt_etas[0].item() == pytest.approx(min(0.2 / 2.0, 0.2))
    assert sqrt_etas[-1].item() == pytest.approx(0.99)
    # log sqrt(eta_t) is linear in ((t-1)/(T-1))^p
    beta = torch.linspace(0, 1, 4, dtype=torch.float64) ** 0.3
    logs = sqrt_etas.log()
    assert torch.allclose((logs - logs[0]) / (logs[-1] - logs[0]), beta)


def test_forward_chain_ends_at_the_lr_image_plus_kappa_noise():
    chain = ResShift()
    x0, y0 = torch.zeros(200_000), torch.ones(200_000)
    t = torch.full((len(x0),), 3)
    x_t = chain.q_sample(
        x0[:, None], y0[:, None], t, torch.randn(len(x0), 1, generator=torch.Generator().manual_seed(0))
    )
    eta_T = chain.etas[-1].item()
    assert x_t.mean().item() == pytest.approx(eta_T, abs=0.01)  # x0 + eta_T (y0 - x0), eta_T = 0.98
    assert x_t.std().item() == pytest.approx(2.0 * eta_T**0.5, rel=0.01)


@pytest.mark.parametrize("t", [1, 2, 3])
def test_posterior_is_consistent_with_the_marginals(t):
    """x_t ~ q(x_t | x0), then x_{t-1} ~ q(x_{t-1} | x_t, x0): x_{t-1} must follow q(x_{t-1} | x0)."""
    chain = ResShift()
    g = torch.Generator().manual_seed(t)
    n = 400_000
    x0, y0 = torch.full((n, 1), -0.5), torch.full((n, 1), 0.7)
    steps = torch.full((n,), t)
    x_t = chain.q_sample(x0, y0, steps, torch.randn(n, 1, generator=g))
    mean, var = chain.posterior(x_t, x0, steps)
    x_prev = mean + var.sqrt() * torch.randn(n, 1, generator=g)
    eta_prev = chain.etas[t - 1].item()
    assert x_prev.mean().item() == pytest.approx(-0.5 + eta_prev * 1.2, abs=0.01)
    assert x_prev.var().item() == pytest.approx(4.0 * eta_prev, rel=0.02)


def test_sampler_with_an_oracle_network_returns_x0_in_four_calls():
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    y0 = torch.rand(2, 3, 16, 16) * 2 - 1
    calls = []

    class Oracle(torch.nn.Module):
        def forward(self, x, t):
            calls.append(t)
            return type("Out", (), {"sample": x0 - y0})()  # the network predicts the residual x0 - y0

    out = ResShift().sample(Oracle(), y0, torch.Generator().manual_seed(0))
    assert len(calls) == 4 and [c[0].item() for c in calls] == [3, 2, 1, 0]
    assert torch.allclose(out, x0, atol=1e-6)


def _heldout(n=6):
    hr = sr_net.world_images(n, seed=424_242)
    return hr, sr_net.degrade(hr)


def test_shipped_resshift_restores_heldout_scenes():
    """The shipped network is far better than an untrained one and within 1 dB of bicubic (it does not beat it at
    the training budget it was given: see RESULTS.md)."""
    hr, lr = _heldout()
    out, calls = resshift.super_resolve(lr)
    untrained, _ = resshift.super_resolve(lr, sr_net.make_net().eval())
    assert calls == 4 and out.shape == hr.shape
    assert psnr(out, hr) > psnr(untrained, hr) + 5
    assert psnr(out, hr) > psnr(sr_net.upsample(lr), hr) - 1


def test_baseline_makes_one_call_per_step_and_is_trained():
    hr, lr = _heldout(3)
    config = sr_diffusion.SRDiffusionConfig(steps=10)
    out, calls = sr_diffusion.super_resolve(lr, config=config)
    untrained, _ = sr_diffusion.super_resolve(lr, sr_net.make_net().eval(), config=config)
    assert calls == 10
    assert psnr(out, hr) > psnr(untrained, hr) + 2


def _run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_restore_command_writes_a_4x_image(tmp_path):
    src, out = tmp_path / "small.png", tmp_path / "big.png"
    Image.fromarray(np.full((12, 20, 3), 128, np.uint8)).save(src)
    res = _run(["restore", str(src), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert Image.open(out).size == (80, 48)


@pytest.mark.parametrize(
    "image, extra, message",
    [
        (Image.new("RGB", (16, 16)), ["--scale", "2"], "--scale 2"),
        (Image.new("RGBA", (16, 16)), [], "mode RGBA"),
        (Image.new("I;16", (16, 16)), [], "mode I;16"),
        (Image.new("RGB", (300, 16)), [], "300x16"),
        (Image.new("RGB", (2, 16)), [], "2x16"),
    ],
)
def test_restore_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, image, extra, message):
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    image.save(src)
    res = CliRunner().invoke(cli, ["restore", str(src), "-o", str(out), *extra])
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()
