"""Any-size generation: MultiDiffusion and shifted tiles as UNet hooks, tiled VAE decoding, the size check."""

import math

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_sd
from PIL import Image

import stablekit
from stablekit import cli
from stablekit.accel import DeepCache, MultiDiffusion, ShiftedTiles, check_size
from stablekit.accel.multidiffusion import starts
from stablekit.errors import StablekitError
from stablekit.registry import CATALOGUE, build

PROMPT = "a red star on a gray background"


@pytest.fixture(scope="module")
def pipe():
    p = make_tiny_sd()
    p.set_progress_bar_config(disable=True)
    return p


class UNetCalls:
    """Counts the real UNet forwards (its conv_in runs once in each, whatever hooks wrap the UNet)."""

    def __init__(self, unet):
        self.batches = []
        self.handle = unet.conv_in.register_forward_hook(lambda m, i, o: self.batches.append(i[0].shape[0]))


def run(pipe, *plugins, size=(64, 48), steps=3):
    g = torch.Generator().manual_seed(0)
    with stablekit.use(pipe, *plugins):
        out = pipe(PROMPT, width=size[0], height=size[1], num_inference_steps=steps, generator=g, output_type="pt")
    return out.images


@pytest.mark.parametrize("plugin", [MultiDiffusion, ShiftedTiles])
def test_one_tile_covering_the_latent_is_plain_generation_exactly(pipe, plugin):
    plain = run(pipe, size=(64, 48))
    assert torch.equal(run(pipe, plugin(tile=32, tiled_vae=False), size=(64, 48)), plain)
    native = run(pipe, size=(32, 32))
    assert torch.equal(run(pipe, plugin(), size=(32, 32)), native)


def test_multidiffusion_unet_calls_are_windows_times_steps(pipe):
    calls = UNetCalls(pipe.unet)
    md = MultiDiffusion(stride=4)
    run(pipe, md, size=(64, 48), steps=3)  # latent 24x32, window 16: 3 rows x 5 columns
    calls.handle.remove()
    assert starts(24, 16, 4) == [0, 4, 8] and starts(32, 16, 4) == [0, 4, 8, 12, 16]
    assert len(calls.batches) == md.calls == 15 * 3
    assert set(calls.batches) == {2}  # one window per call, its [uncond, cond] rows together
    batched = MultiDiffusion(stride=4, batch=4)
    calls = UNetCalls(pipe.unet)
    run(pipe, batched, size=(64, 48), steps=3)
    calls.handle.remove()
    assert len(calls.batches) == math.ceil(15 / 4) * 3 and sum(calls.batches) == 2 * 15 * 3


def test_shifted_grid_partitions_the_latent_and_moves_every_step(pipe):
    st = ShiftedTiles(seed=1)
    calls = UNetCalls(pipe.unet)
    run(pipe, st, size=(96, 64), steps=6)  # latent 32x48
    calls.handle.remove()
    assert len(calls.batches) == st.calls == sum(len(w) for w in st.history)
    for windows in st.history:
        cover = torch.zeros(32, 48, dtype=torch.int32)
        for t, b, left, r in windows:
            cover[t:b, left:r] += 1
            assert 8 <= b - t <= 24 and 8 <= r - left <= 24
        assert (cover == 1).all()
    assert len({tuple(w) for w in st.history}) > 3  # the seams do not stay in place
    again = ShiftedTiles(seed=1)
    run(pipe, again, size=(96, 64), steps=6)
    assert again.history == st.history  # offsets restart from the seed at every call


def test_tiled_call_averages_overlapping_predictions(pipe):
    md = MultiDiffusion(stride=3)
    with stablekit.use(pipe, md):
        x = torch.randn(2, 4, 24, 40)
        windows = md.windows(24, 40, 0)
        doubled = md.tiled_call(lambda s, *a, **k: (2 * s,), x, (), {}, windows)[0]
        assert torch.allclose(doubled, 2 * x)  # identical predictions of a pixel average to themselves
        means = md.tiled_call(lambda s, *a, **k: (s.mean((1, 2, 3), keepdim=True).expand_as(s),), x, (), {}, windows)
    covering = [x[..., t:b, le:r].mean((1, 2, 3)) for t, b, le, r in windows if t <= 10 < b and le <= 20 < r]
    assert torch.allclose(means[0][:, 0, 10, 20], torch.stack(covering).mean(0))


@pytest.mark.parametrize("plugin", [lambda: MultiDiffusion(stride=8), ShiftedTiles], ids=["multidiffusion", "shifted"])
def test_stacks_with_deepcache_in_either_order(pipe, plugin):
    mids = []  # runs of the deepest resnet, which DeepCache skips at non-key steps
    handle = pipe.unet.mid_block.resnets[0].register_forward_hook(lambda *a: mids.append(1))
    plain = run(pipe, plugin(), size=(64, 48), steps=6)
    full_mids = len(mids)
    mids.clear()
    first = run(pipe, plugin(), DeepCache(interval=3), size=(64, 48), steps=6)
    cached_mids = len(mids)
    second = run(pipe, DeepCache(interval=3), plugin(), size=(64, 48), steps=6)
    handle.remove()
    assert torch.equal(first, second)  # the tiler wraps the cache whatever the order of attaching
    assert cached_mids == full_mids * 2 // 6  # the deep branch ran at key steps 0 and 3 only
    assert (first - plain).abs().mean() < 0.1 and not torch.equal(first, plain)


def test_shifted_grid_moves_only_at_the_cache_key_steps(pipe):
    st = ShiftedTiles(seed=3)
    run(pipe, st, DeepCache(interval=3), size=(96, 64), steps=6)
    assert st.history[1] == st.history[2] == st.history[0] and st.history[4] == st.history[5] == st.history[3]


def test_tiled_vae_decode_equals_full_decode_in_the_interior():
    default = stablekit.load()  # the trained VAE (random weights say nothing about seams)
    coarse = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    image = torch.nn.functional.interpolate(coarse, size=(192, 192), mode="bilinear") * 2 - 1
    with torch.no_grad():
        latents = default.vae.encode(image).latent_dist.mean  # 48x48: three tiles of 16 a side, overlapping
        full = default.vae.decode(latents).sample
        with stablekit.use(default, ShiftedTiles()):
            assert default.vae.use_tiling
            tiled = default.vae.decode(latents).sample
        assert not default.vae.use_tiling  # restored on removal
    inner = (..., slice(16, -16), slice(16, -16))
    assert not torch.equal(tiled, full)
    # tiling changes the interior far less than the VAE's own reconstruction error
    assert (tiled - full)[inner].abs().mean() < 0.25 * (full - image)[inner].abs().mean()


def test_attaching_and_removing_restores_the_pipeline(pipe):
    before = run(pipe, size=(64, 48))
    handle = stablekit.use(pipe, MultiDiffusion(), DeepCache())
    handle.remove()
    assert torch.equal(run(pipe, size=(64, 48)), before)


def test_catalogue_specs_and_bad_parameters():
    assert isinstance(build("shifted-tiles:seed=4,batch=2", CATALOGUE["accel"], "accel"), ShiftedTiles)
    assert build("multidiffusion:stride=4", CATALOGUE["accel"], "accel").config.stride == 4
    for spec in ("multidiffusion:stride=0", "shifted-tiles:batch=0", "shifted-tiles:tile=-1"):
        with pytest.raises(StablekitError):
            build(spec, CATALOGUE["accel"], "accel")


def test_size_check_refuses_indivisible_and_too_large_sizes(pipe):
    check_size(pipe, 64, 48)
    with pytest.raises(StablekitError, match="multiples of 2"):
        check_size(pipe, 63, 48)
    with pytest.raises(StablekitError, match="GiB"):
        check_size(pipe, 4096, 4096, free=2**20)
    with stablekit.use(pipe, ShiftedTiles()):  # tiles bound the UNet's and the decoder's share
        check_size(pipe, 4096, 4096, free=2**30)


def test_cli_generates_beyond_native_size_and_refuses_without_writing(tiny_sd_path, tmp_path):
    def invoke(size, accel):
        args = ["generate", PROMPT, "-o", str(tmp_path / f"{accel}.png"), "--model", str(tiny_sd_path)]
        return CliRunner().invoke(cli.cli, args + ["--size", size, "--steps", "2", "--accel", accel])

    ok = invoke("64x48", "shifted-tiles")
    assert ok.exit_code == 0, ok.output
    assert Image.open(tmp_path / "shifted-tiles.png").size == (64, 48)
    for size in ("64x50", "60000x60000"):
        bad = invoke(size, "multidiffusion")
        assert bad.exit_code == 2 and bad.output.startswith("error: ") and len(bad.output.splitlines()) == 1
    assert not (tmp_path / "multidiffusion.png").exists()
