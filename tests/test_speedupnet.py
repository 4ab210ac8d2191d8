"""SpeedUpNet: the untrained adapter is an exact identity, sampling costs one UNet call per step, the negative prompt
steers the output through the adapter, the file loads onto a fine-tuned copy (and is refused by another model), and
Multi-Step Consistency training lowers its loss, resumes, and ships through `distill` and `generate`."""

import copy

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_sdxl, run
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image

import stablekit
from stablekit import cli
from stablekit.default_model.train import SCHEDULER_CONFIG
from stablekit.errors import StablekitError
from stablekit.registry import load_adapter
from stablekit.train import speedupnet

NEG = "a blue circle on a green background"


@pytest.fixture
def pipe(tiny_sd):
    tiny_sd.set_progress_bar_config(disable=True)
    return tiny_sd


def trained_like(pipe, value=0.5):
    """An adapter whose gains and shifts are set, as training would leave them non-zero."""
    plugin = speedupnet.SpeedUpNet.fresh(pipe.unet)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in plugin.parameters():
            if p.dim() == 1:
                p.copy_(value + 0.1 * torch.randn(p.shape, generator=g))
    return plugin


def test_the_untrained_adapter_is_an_exact_identity_and_detaches_exactly(pipe):
    old = pipe.scheduler
    before = run(pipe, steps=4, guidance_scale=1.0)
    pipe.scheduler = DDIMScheduler.from_config(
        old.config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True
    )  # what the plugin samples with
    plain = run(pipe, steps=4, guidance_scale=1.0)
    pipe.scheduler = old
    with stablekit.use(pipe, speedupnet.SpeedUpNet.fresh(pipe.unet)):
        adapted = run(pipe, steps=4, guidance_scale=1.0, negative_prompt=NEG)
    assert torch.equal(adapted, plain)
    assert pipe.scheduler is old and torch.equal(run(pipe, steps=4, guidance_scale=1.0), before)


def test_one_unet_call_per_step_without_batch_doubling(pipe):
    batches = []
    pipe.unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    with stablekit.use(pipe, trained_like(pipe)):
        run(pipe, steps=4, guidance_scale=1.0, negative_prompt=NEG)
    assert batches == [1, 1, 1, 1]
    batches.clear()
    run(pipe, steps=4, guidance_scale=7.5)  # the guided teacher, for contrast
    assert batches == [2, 2, 2, 2]


def test_the_negative_prompt_steers_the_output_through_the_adapter(pipe):
    assert torch.equal(run(pipe, guidance_scale=1.0, negative_prompt=NEG), run(pipe, guidance_scale=1.0))
    with stablekit.use(pipe, trained_like(pipe)):
        empty = run(pipe, steps=4, guidance_scale=1.0)
        same = run(pipe, steps=4, guidance_scale=1.0, negative_prompt="")
        other = run(pipe, steps=4, guidance_scale=1.0, negative_prompt=NEG)
    assert torch.equal(empty, same)  # no negative prompt is the empty one
    assert (other - empty).abs().mean() > 1e-3


def test_the_adapter_file_loads_onto_a_fine_tuned_copy_and_not_onto_another_model(pipe, tmp_path):
    plugin = trained_like(pipe)
    path = tmp_path / "sun.safetensors"
    plugin.save(path)
    loaded = load_adapter(path)  # what `generate --adapter` does
    assert isinstance(loaded, speedupnet.SpeedUpNet)
    mine, theirs = plugin.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    tuned = copy.deepcopy(pipe)
    with torch.no_grad():  # a fine-tuned copy: same architecture, other weights
        for p in tuned.unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    plain = run(tuned, steps=4, guidance_scale=1.0, negative_prompt=NEG)
    with stablekit.use(tuned, loaded):
        adapted = run(tuned, steps=4, guidance_scale=1.0, negative_prompt=NEG)
    with stablekit.use(pipe, speedupnet.SpeedUpNet.load(path)):
        on_teacher = run(pipe, steps=4, guidance_scale=1.0, negative_prompt=NEG)
    assert not torch.equal(adapted, plain) and not torch.equal(adapted, on_teacher)
    other = make_tiny_sdxl()
    with pytest.raises(StablekitError, match="another model"):
        stablekit.use(other, speedupnet.SpeedUpNet.load(path))
    assert not other.__dict__.get("_stablekit") or not stablekit.plugins.attached(other)


def test_msc_training_lowers_its_loss_and_resumes(pipe, tmp_path):
    pipe.scheduler = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)  # the embedded model's: v, trailing
    config = speedupnet.Config(images=8, iterations=12, batch=8, lr=3e-2, grid=8, seed=0)
    unet_before = [p.clone() for p in pipe.unet.parameters()]
    first, recipe = speedupnet.distill(pipe, config, workdir=tmp_path / "work")
    assert recipe["probe_loss_after"] < recipe["probe_loss_before"] and recipe["iterations_done"] == 12
    assert all(torch.equal(a, b) for a, b in zip(unet_before, pipe.unet.parameters(), strict=True))
    assert not stablekit.plugins.attached(pipe)
    again, recipe = speedupnet.distill(pipe, config, workdir=tmp_path / "work")  # all kept: nothing to redo
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True))
    with pytest.raises(StablekitError, match="other settings"):
        speedupnet.distill(pipe, speedupnet.Config(images=9), workdir=tmp_path / "work")


def test_distill_writes_the_adapter_and_generate_uses_it(tiny_sd_path, tmp_path):
    out = tmp_path / "sun"
    args = ["distill", "--method", "speedupnet", "--model", str(tiny_sd_path), "-o", str(out), "--pairs", "4"]
    result = CliRunner().invoke(cli.cli, [*args, "--iterations", "2", "--batch", "4", "--minutes", "5"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["recipe.json", "speedupnet.safetensors"]
    assert not (tmp_path / "sun.work").exists()
    png = tmp_path / "one.png"
    gen = ["generate", "a red star", "--model", str(tiny_sd_path), "--size", "32x32", "-o", str(png)]
    result = CliRunner().invoke(cli.cli, [*gen, "--adapter", str(out / "speedupnet.safetensors"), "--negative", "x"])
    assert result.exit_code == 0, result.output
    assert (Image.open(png).text["steps"], Image.open(png).text["guidance"]) == ("4", "1.0")  # the adapter's own
    bad = CliRunner().invoke(
        cli.cli, ["distill", "--model", str(tiny_sd_path), "-o", str(tmp_path / "x")] + ["--minutes", "1"]
    )
    assert bad.exit_code == 2 and "--minutes" in bad.output and not (tmp_path / "x").exists()
