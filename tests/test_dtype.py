"""bfloat16 as a precision of its own: the embedded model runs in it with plugins on every seam (hooks, a
scheduler, step callbacks) and lands near the float32 result; a dtype the device cannot run is one line, exit 2,
nothing written."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import stablekit
from stablekit import cli
from stablekit.pipeline import scheduler_plugin
from stablekit.registry import CATALOGUE, build

PROMPT = "a red star on a gray background"
TOLERANCE = 0.25  # relative L2 distance of bfloat16's final latents from float32's (another seed's: about 1.4)


def latents(pipe, seed: int, plugins) -> tuple[torch.Tensor, list[int]]:
    steps = []

    def callback(p, i, t, kw):
        steps.append(i)
        return kw

    g = torch.Generator("cpu").manual_seed(seed)
    with stablekit.use(pipe, *plugins):
        out = pipe(PROMPT, num_inference_steps=4, generator=g, output_type="latent", callback_on_step_end=callback)
    return out.images.float(), steps


@pytest.fixture(scope="module")
def pipes():
    return {dtype: stablekit.load(device="cpu", dtype=dtype) for dtype in ("float32", "bfloat16")}


def test_bfloat16_keeps_every_plugin_working_and_lands_near_float32(pipes):
    def plugins():
        return [build("deepcache:interval=2", CATALOGUE["accel"], "accel"), scheduler_plugin("hb")]

    assert pipes["bfloat16"].unet.dtype == torch.bfloat16
    ref, _ = latents(pipes["float32"], 0, plugins())
    other, _ = latents(pipes["float32"], 1, plugins())
    low, steps = latents(pipes["bfloat16"], 0, plugins())
    assert steps == [0, 1, 2, 3]
    assert stablekit.plugins.attached(pipes["bfloat16"]) == []  # removed again after the call
    distance = float((low - ref).norm() / ref.norm())
    assert distance < TOLERANCE < float((other - ref).norm() / ref.norm())


def test_generate_writes_the_dtype_it_ran_in(tmp_path):
    out = tmp_path / "s.png"
    result = CliRunner().invoke(cli.cli, ["generate", PROMPT, "-o", str(out), "--steps", "2", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).text["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("dtype", "message"),
    [
        ("float8_e4m3fn", "device 'cpu' cannot run float8_e4m3fn"),
        ("int8", "not a floating-point"),
        ("half2", "unknown"),
    ],
)
def test_a_dtype_the_device_cannot_run_is_one_line_and_writes_nothing(tmp_path, dtype, message):
    out = tmp_path / "s.png"
    result = CliRunner().invoke(cli.cli, ["generate", PROMPT, "-o", str(out), "--device", "cpu", "--dtype", dtype])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert list(tmp_path.iterdir()) == []
