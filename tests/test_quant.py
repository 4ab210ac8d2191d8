"""Quantization: the quantizers' arithmetic, SVDQuant's decomposition, the methods' quality order on a tiny
pipeline, exact save/load and removal, the base-model check, the int8 kernels, and the command line."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_sd, run

import stablekit
from stablekit import cli
from stablekit.errors import StablekitError
from stablekit.quant import Quantized, method
from stablekit.quant.calibration import CalibrationConfig, trajectories
from stablekit.quant.core import (
    ActQuantizer,
    TimeContext,
    expand_scale,
    fake_act,
    pack4,
    unpack4,
    weight_codes,
    weight_scale,
)
from stablekit.quant.method import skip_splits
from stablekit.quant.svdquant import low_rank, smoothing


def _weight():
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    w[3, 2, 1, 1] = 25.0  # an outlier
    return w


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_quantization_grid_and_error(bits):
    w = _weight()
    scale = weight_scale(w, bits)
    codes = weight_codes(w, scale, bits)
    deq = codes.float() * expand_scale(scale, w.shape)
    for row, dq, s in zip(w, deq, scale[:, 0], strict=True):
        assert dq.unique().numel() <= 2**bits
        assert (dq - row).abs().max() <= s / 2 + 1e-6  # min-max range: nothing clipped, error below half a step
    assert torch.equal(unpack4(pack4(codes.clamp(-8, 7)), w.shape), codes.clamp(-8, 7))
    assert pack4(codes).numel() == (w.numel() + 1) // 2


def test_split_and_time_aware_activation_ranges():
    x = torch.randn(2, 6, 4, 4) * torch.tensor([1, 1, 1, 10, 10, 10.0])[None, :, None, None]
    lo, hi = torch.tensor([-1.0, -10.0]), torch.tensor([1.0, 10.0])
    both = fake_act(x, lo, hi, 4, 1, split=3)
    assert torch.equal(both[:, :3], fake_act(x[:, :3], lo[:1], hi[:1], 4, 1))
    assert torch.equal(both[:, 3:], fake_act(x[:, 3:], lo[1:], hi[1:], 4, 1))
    ctx = TimeContext(1000)
    table_lo = torch.tensor([[-4.0], [-1.0]] + [[float("nan")]] * 9)
    table_hi = torch.tensor([[4.0], [1.0]] + [[float("nan")]] * 9)
    act = ActQuantizer(8, "static", table_lo, table_hi, ctx)
    ctx.set(torch.tensor([50]))  # bucket 1: its own range
    assert torch.equal(act(x, 1), fake_act(x, table_lo[1], table_hi[1], 8, 1))
    ctx.set(torch.tensor([950]))  # an uncalibrated bucket: the global range
    assert torch.equal(act(x, 1), fake_act(x, table_lo[0], table_hi[0], 8, 1))


def test_svdquant_smoothing_and_low_rank_reconstruct_the_layer():
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(1)).double()
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(2)).double() * 3
    lam = smoothing(x.abs().amax(0), w, 0.5)
    ws = w * lam
    assert torch.allclose((x / lam) @ ws.T, x @ w.T, atol=1e-9)
    down, up = low_rank(ws, 8)
    residual = ws - up.double() @ down.double()
    sigma = torch.linalg.svdvals(ws)
    assert torch.allclose(torch.linalg.matrix_norm(residual, 2), sigma[8], rtol=1e-4)  # the top 8 directions gone
    down, up = low_rank(ws, 32)
    assert torch.allclose(up.double() @ down.double(), ws, atol=1e-4)  # full rank: the branch is the weight


def test_skip_splits_are_the_upsampling_channels():
    unet = make_tiny_sd().unet
    splits, seen = skip_splits(unet), {}
    for b, block in enumerate(unet.up_blocks):

        def record(m, a, kw, b=b):
            seen[b] = kw["hidden_states"].shape[1]

        block.register_forward_pre_hook(record, with_kwargs=True)
    unet(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 16, 32))
    for b in seen:
        assert splits[f"up_blocks.{b}.resnets.0.conv1"] == seen[b]


@pytest.fixture(scope="module")
def tiny():
    pipe = stablekit.load(make_tiny_sd_path(), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    traj = trajectories(pipe, CalibrationConfig(prompts=2, steps=4, guidance=7.5))
    return pipe, traj


def make_tiny_sd_path(path=[]):  # noqa: B006  (made once per module run)
    import tempfile

    if not path:
        path.append(tempfile.mkdtemp())
        make_tiny_sd().save_pretrained(path[0])
    return path[0]


def _rel_error(pipe, q, ref):
    with stablekit.use(pipe, q):
        out = run(pipe, steps=4)
    return float((out - ref).norm() / ref.norm())


def test_quality_order_on_a_tiny_pipeline(tiny):
    pipe, traj = tiny
    ref = run(pipe, steps=4)
    w8a8 = _rel_error(pipe, method("naive:bits=w8a8,samples=8").quantize(pipe, traj), ref)
    naive4 = _rel_error(pipe, method("naive:bits=w4a4,samples=8").quantize(pipe, traj), ref)
    svd4 = _rel_error(pipe, method("svdquant:bits=w4a4,samples=8,rank=8").quantize(pipe, traj), ref)
    assert 0 < w8a8 < 0.15  # quantized, and close (random weights with guidance 7.5 amplify every error)
    assert w8a8 < svd4 < naive4
    assert torch.equal(run(pipe, steps=4), ref)  # removal restored the model exactly


def test_save_load_round_trip_and_wrong_base(tiny, tmp_path):
    pipe, traj = tiny
    q = method("qdiffusion:bits=w4a8,samples=4,iters=2,recon_calls=2").quantize(pipe, traj)
    q.save(tmp_path / "q")
    back = Quantized.load(tmp_path / "q")
    for name, layer in q.layers.items():
        a, b = layer.state_dict(), back.layers[name].state_dict()
        assert a.keys() == b.keys()
        for k in a:  # bit for bit (unseen timestep buckets hold NaN)
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True)
    with stablekit.use(pipe, q):
        expected = run(pipe, steps=3)
    loaded = stablekit.load(tmp_path / "q", device="cpu")
    assert torch.equal(run(loaded, steps=3), expected)
    meta = json.loads((tmp_path / "q" / "quant.json").read_text())
    assert meta["method"] == "qdiffusion" and meta["bits"] == "w4a8"
    other = make_tiny_sd()
    with torch.no_grad():
        other.unet.conv_in.weight.add_(1e-3)
    with pytest.raises(StablekitError, match="different one"):
        stablekit.use(other, back)


def test_int8_kernels_match_the_simulated_layer(tiny):
    from stablekit.quant.int8 import Int8Layer, eligible

    pipe, traj = tiny
    q = method("ptq4dm:samples=4").quantize(pipe, traj)
    name = "down_blocks.1.resnets.0.conv2"
    layer = q.layers[name]
    assert eligible(layer)
    x = torch.randn(2, layer.shape[1], 8, 8)
    step = float(layer.out_range[1] - layer.out_range[0]) / 255
    with torch.no_grad():
        assert (Int8Layer(layer)(x) - layer(x)).abs().max() <= step * 0.5 + 1e-3 * step + 1e-5


def test_quantize_command(tiny, tmp_path):
    runner = CliRunner()
    for args, text in [
        (["--method", "nope"], "unknown quantization method"),
        (["--method", "naive", "--bits", "w2a2"], "unknown bit-width"),
        (["--method", "naive", "--samples", "0"], "at least one sample"),
    ]:
        res = runner.invoke(cli.cli, ["quantize", *args, "-o", str(tmp_path / "bad")])
        assert res.exit_code == 2 and text in res.output and len(res.output.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()
    model = make_tiny_sd_path()
    args = ["--method", "naive", "--model", model, "--prompts", "1", "--steps", "2", "--samples", "2"]
    res = runner.invoke(cli.cli, ["quantize", *args, "-o", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    imgs = []
    for flag in (["--model", str(tmp_path / "q")], ["--model", model, "--quant", str(tmp_path / "q")]):
        out = tmp_path / f"{len(imgs)}.png"
        args = ["a red star", "--size", "32x32", "--steps", "2", "-o", str(out), *flag]
        res = runner.invoke(cli.cli, ["generate", *args])
        assert res.exit_code == 0, res.output
        from PIL import Image

        imgs.append(Image.open(out).tobytes())
    assert imgs[0] == imgs[1]


def test_a_pipeline_without_a_unet_is_refused():
    from types import SimpleNamespace

    with pytest.raises(StablekitError, match="no UNet"):
        method("naive").quantize(SimpleNamespace(unet=None))
    with pytest.raises(StablekitError, match="no UNet"):
        Quantized({}, {}).attach(SimpleNamespace(unet=None))
