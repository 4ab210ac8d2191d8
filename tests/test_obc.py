"""Optimal boundary conditions: the ODE is a deterministic map of x_T, the search keeps the best candidate, the
searched boundary generalises to held-out images, and `stablekit restore --method obc`."""

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from stablekit.cli import cli
from stablekit.restore import obc, sr_diffusion, sr_net


def test_fit_extends_the_boundary_periodically():
    bc = torch.randn(3, 8, 8)
    out = obc.fit(bc, (2, 3, 20, 12))
    assert out.shape == (2, 3, 20, 12)
    assert torch.equal(out[0, :, :8, :8], bc) and torch.equal(out[1, :, 8:16, 8:12], bc[:, :, :4])
    assert torch.equal(out[0, :, 16:20, :8], bc[:, :4])


def test_the_ode_from_a_boundary_is_the_plain_sampler_from_the_same_noise():
    net = sr_net.make_net().eval()
    y0 = torch.rand(2, 3, 16, 16) * 2 - 1
    chain = sr_diffusion.SRDiffusion(sr_diffusion.SRDiffusionConfig(steps=3))
    plain = chain.sample(net, y0, torch.Generator().manual_seed(5))
    x_T = torch.randn(y0.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(chain.sample(net, y0, x_T=x_T), plain)
    assert not torch.allclose(chain.sample(net, y0, x_T=-x_T), plain, atol=1e-3)  # x_T decides the result


def test_search_keeps_the_best_candidate_and_it_generalises():
    net = sr_net.load_net(sr_net.WEIGHTS / "sr_diffusion_x4.safetensors")
    config = obc.OBCConfig(candidates=6, references=4, steps=4, size=32)
    best, scores = obc.search(net, obc.reference_images(config), config)
    assert scores.shape == (6,) and best.shape == (3, 32, 32)
    again = obc.losses(net, best[None], obc.reference_images(config), 4, 16)
    assert again.item() == scores.min().item()
    heldout = sr_net.world_images(6, seed=424_242)[..., :32, :32]
    g = torch.Generator().manual_seed(config.seed)
    candidates = torch.randn(6, 3, 32, 32, generator=g)
    held = obc.losses(net, candidates, heldout, 4, 16)
    assert held[int(scores.argmin())] < held.median()  # the reference set's best is better than typical on new images


def test_shipped_boundary_beats_random_starts_at_equal_steps():
    hr = sr_net.world_images(4, seed=424_242)
    lr = sr_net.degrade(hr)
    out, calls = obc.super_resolve(lr)
    assert calls == obc.OBCConfig.steps and obc.BOUNDARY.with_suffix(".json").is_file()
    err = (out - hr).pow(2).mean().item()
    config = sr_diffusion.SRDiffusionConfig(steps=calls)
    plain = [(sr_diffusion.super_resolve(lr, config=config, seed=s)[0] - hr).pow(2).mean().item() for s in (1, 2)]
    assert err < min(plain)


def test_restore_obc_writes_a_4x_image_of_any_size(tmp_path):
    src, out = tmp_path / "small.png", tmp_path / "big.png"
    Image.fromarray(np.full((12, 20, 3), 90, np.uint8)).save(src)
    res = CliRunner().invoke(cli, ["restore", str(src), "-o", str(out), "--method", "obc"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert Image.open(out).size == (80, 48)
