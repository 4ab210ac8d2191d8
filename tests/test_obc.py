"""Optimal boundary conditions: the ODE is a deterministic map of x_T, the search keeps the best candidate, the
searched boundary generalises to held-out images, and `stablekit restore --method obc`."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from stablekit.cli import cli
from stablekit.errors import StablekitError
from stablekit.restore import obc, sr_diffusion, sr_net
from stablekit.restore.resshift import ResShift


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


def test_resshift_ode_with_an_oracle_walks_the_marginals_with_one_noise():
    """Started on q(x_T | x0), each deterministic step must land on q(x_t | x0) with the same noise, and the chain
    must end at x0."""
    chain = ResShift()
    n = 1000
    x0, y0 = torch.full((n, 1), -0.5), torch.full((n, 1), 0.7)
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    seen = []

    class Oracle(torch.nn.Module):
        def forward(self, x, t):
            seen.append((t[0].item(), x[:, :1].clone()))
            return type("Out", (), {"sample": x0 - y0})()

    eta_T = chain.etas[-1].item()
    start = noise + (1 - eta_T) * (x0 - y0) / (2.0 * eta_T**0.5)  # y0 + kappa sqrt(eta_T) start = q_sample at T
    assert torch.allclose(chain.sample_ode(Oracle(), y0, start), x0, atol=1e-6)
    assert [t for t, _ in seen] == [3, 2, 1, 0]
    for t, scaled in seen:
        scale = (4.0 * chain.etas[t].item() + 1) ** 0.5
        expected = chain.q_sample(x0, y0, torch.full((n,), t), noise)
        assert torch.allclose(scaled * scale, expected, atol=1e-5)


def test_search_keeps_the_best_candidate_and_the_start_matters():
    net = sr_net.load_net(sr_net.WEIGHTS / "resshift_x4.safetensors")
    config = obc.OBCConfig(candidates=6, references=4, size=32)
    refs = obc.reference_images(config)
    best, scores = obc.search(net, refs, config)
    assert scores.shape == (6,) and best.shape == (3, 32, 32) and refs.shape == (4, 3, 32, 32)
    assert obc.losses(net, best[None], refs, config).item() == scores.min().item()
    assert scores.max() > 1.05 * scores.min()  # the boundary condition changes the result: there is something to pick
    with pytest.raises(StablekitError, match="4 steps"):
        obc.OBCConfig(steps=10)


@pytest.mark.parametrize("model, calls", [("resshift", 4), ("sr_diffusion", 10)])
def test_shipped_boundaries_are_deterministic_starts_with_their_recipe(model, calls):
    import json

    recipe = json.loads(obc.boundary_path(model).with_suffix(".json").read_text())
    assert recipe["config"]["model"] == model and obc.load_boundary(model).shape == (3, 64, 64)
    lr = sr_net.degrade(sr_net.world_images(2, seed=424_242))
    first, n = obc.super_resolve(lr, model=model, seed=1)
    again, _ = obc.super_resolve(lr, model=model, seed=2)
    assert n == calls and torch.equal(first, again)  # no randomness left: the seed does not matter


def test_restore_obc_writes_a_4x_image_of_any_size(tmp_path):
    src, out = tmp_path / "small.png", tmp_path / "big.png"
    Image.fromarray(np.full((12, 20, 3), 90, np.uint8)).save(src)
    res = CliRunner().invoke(cli, ["restore", str(src), "-o", str(out), "--method", "obc"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert Image.open(out).size == (80, 48)
