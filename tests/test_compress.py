"""Compressed UNets: a removed layer is exactly its shortcut, slim models save and load as model folders that
plugins work on, LAPTOP-Diff's knapsack is exact, LD-Pruner's score sees what a layer changes, and retraining by
distillation brings the pruned UNet towards the teacher."""

import itertools
import random
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import stablekit
from stablekit import cli
from stablekit.errors import StablekitError
from stablekit.train import compress, koala, laptop_diff, ld_pruner, slim_unet, students
from stablekit.train.slim_unet import SlimUNet2DConditionModel


def inputs(unet, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=g)
    return x, torch.tensor([500] * n), torch.randn(n, 8, c.cross_attention_dim, generator=g)


def silence(unet, name):
    """Zero the residual branch of layer `name`: the layer becomes its shortcut."""
    layer = unet.get_submodule(name)
    last = layer.conv2 if hasattr(layer, "conv2") else layer.proj_out
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()


@pytest.mark.parametrize("name", ["down_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.0.attentions.0"])
def test_a_removed_layer_is_exactly_its_shortcut(tiny_sd, name):
    unet = tiny_sd.unet.eval()
    silence(unet, name)
    slim = SlimUNet2DConditionModel.from_unet(unet, [name]).eval()
    with torch.no_grad():
        torch.testing.assert_close(slim(*inputs(unet)).sample, unet(*inputs(unet)).sample, rtol=0, atol=1e-6)
    assert slim_unet.parameters(slim) < slim_unet.parameters(unet)
    assert compress.unet_macs(slim) < compress.unet_macs(unet)
    with pytest.raises(StablekitError, match="not a removable layer"):
        slim_unet.remove_layers(slim, ["conv_in"])


def test_a_slim_model_folder_loads_and_plugins_work_on_it(tiny_sd, tmp_path):
    names = ["mid_block.attentions.0", "up_blocks.1.resnets.0"]
    slim = SlimUNet2DConditionModel.from_unet(tiny_sd.unet, names).eval()
    compress.save(tiny_sd, slim, tmp_path / "slim", {"method": "test"})
    pipe = stablekit.load(tmp_path / "slim", device="cpu")
    assert isinstance(pipe.unet, SlimUNet2DConditionModel) and slim_unet.removed(pipe.unet) == sorted(names)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(*inputs(slim)).sample, slim(*inputs(slim)).sample)
    fresh = f"import stablekit; print(type(stablekit.load({str(tmp_path / 'slim')!r}, device='cpu').unet).__name__)"
    shown = subprocess.run([sys.executable, "-c", fresh], capture_output=True, text=True, check=True).stdout
    assert shown.strip() == "SlimUNet2DConditionModel"  # a new process imports the class the folder names
    pipe.set_progress_bar_config(disable=True)
    with stablekit.use(pipe, stablekit.accel.DeepCache(interval=2)):
        image = pipe("a red star", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    plain = pipe("a red star", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == plain.size and image.tobytes() != plain.tobytes()  # DeepCache ran: cached steps differ


def test_laptop_knapsack_is_the_exact_least_loss_set_meeting_the_budget():
    rng = random.Random(3)
    for _ in range(20):
        names = [f"l{i}" for i in range(7)]
        scores = {n: rng.random() for n in names}
        savings = {n: rng.randint(1, 100) * 1000 for n in names}
        budget = rng.randint(1, sum(savings.values()))
        chosen = laptop_diff.select(scores, savings, budget)
        assert sum(savings[n] for n in chosen) >= budget
        feasible = [
            s for k in range(8) for s in itertools.combinations(names, k) if sum(savings[n] for n in s) >= budget
        ]
        best = min(sum(scores[n] for n in s) for s in feasible)
        assert sum(scores[n] for n in chosen) == pytest.approx(best)


def test_the_output_loss_criterion_is_zero_for_a_silent_layer_only(tiny_sd):
    unet = tiny_sd.unet.eval()
    silence(unet, "mid_block.resnets.1")
    x, t, c = inputs(unet, 4)
    batch = (x, t, c, None)
    assert laptop_diff.output_loss(unet, ["mid_block.resnets.1"], batch) == 0
    assert laptop_diff.output_loss(unet, ["mid_block.resnets.0"], batch) > 1e-6


def test_ld_pruner_score_sees_changed_statistics_not_sample_order(tiny_sd):
    a = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert ld_pruner.latent_distance(a, a[torch.randperm(16)]) < 1e-5
    assert ld_pruner.latent_distance(a, a * 1.5) > 1
    assert ld_pruner.latent_distance(a, a + 0.5) > 1
    tiny_sd.set_progress_bar_config(disable=True)
    silence(tiny_sd.unet, "down_blocks.0.resnets.0")
    config = ld_pruner.Config(prompts=4, steps=2, guidance=2.0)
    scores = ld_pruner.scores(tiny_sd, ["down_blocks.0.resnets.0", "mid_block.attentions.0"], config)
    assert scores["down_blocks.0.resnets.0"] < 1e-5 < scores["mid_block.attentions.0"]


def test_koala_design_removes_the_mid_block_and_distils_kept_self_attention(tiny_sd):
    names = koala.design(tiny_sd.unet)
    assert {"mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"} <= set(names)
    assert "up_blocks.0.resnets.1" in names and "up_blocks.0.resnets.0" not in names
    slim = SlimUNet2DConditionModel.from_unet(tiny_sd.unet, names)
    kept = koala.self_attentions(slim)
    assert kept and all(tiny_sd.unet.get_submodule(n) is not None for n in kept)
    assert len(kept) < len(koala.self_attentions(tiny_sd.unet))


def test_distillation_brings_the_pruned_unet_towards_the_teacher(tiny_sd, tmp_path):
    retrain = compress.Retrain(images=4, iterations=8, batch=4, lr=1e-3, task_weight=0.0)  # the teacher is random
    config = laptop_diff.Config(ratio=0.3, calibration=4, retrain=retrain)
    x, t, c, _ = compress.noised_batch(tiny_sd, students.world_latents(tiny_sd, 4, 0), 8, seed=5)
    student, recipe = laptop_diff.distill(tiny_sd, config, workdir=tmp_path / "work")
    assert recipe["macs"] <= (1 - config.ratio) * recipe["teacher_macs"]
    start = SlimUNet2DConditionModel.from_unet(tiny_sd.unet, recipe["removed_layers"]).eval()
    with torch.no_grad():
        ref = tiny_sd.unet(x, t, c).sample
        before = (start(x, t, c).sample - ref).pow(2).mean()
        after = (student.eval()(x, t, c).sample - ref).pow(2).mean()
    assert after < before
    again, _ = laptop_diff.distill(tiny_sd, config, workdir=tmp_path / "work")  # resumes from the kept stages
    kept = again.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in student.state_dict().items())


def test_compress_command_writes_a_loadable_folder_and_refuses_bad_input(tmp_path, tiny_sd_path):
    out = tmp_path / "koala"
    args = ["compress", "--model", str(tiny_sd_path), "--images", "4", "--iterations", "2", "--batch", "4"]
    result = CliRunner().invoke(cli.cli, [*args, "--method", "koala", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "recipe.json").is_file() and not (tmp_path / "koala.work").exists()
    loaded = stablekit.load(out, device="cpu").unet
    assert set(slim_unet.removed(loaded)) == set(koala.design(stablekit.load(tiny_sd_path, device="cpu").unet))
    result = CliRunner().invoke(cli.cli, [*args, "--method", "koala", "-o", str(out)])
    assert result.exit_code == 2 and "not an empty folder" in result.output
    result = CliRunner().invoke(cli.cli, [*args, "--method", "koala", "--ratio", "0.3", "-o", str(tmp_path / "k2")])
    assert result.exit_code == 2 and "--ratio does not apply" in result.output and not (tmp_path / "k2").exists()


def test_the_normalised_feature_loss_weighs_each_feature_by_the_teachers_scale(tiny_sd):
    retrain = compress.Retrain(task_weight=0.0, output_weight=0.0, uncond_prob=0.0)
    data = students.world_latents(tiny_sd, 2, 0)
    student = SlimUNet2DConditionModel.from_unet(tiny_sd.unet, ["mid_block.attentions.0"])
    values = {}
    for normalize in (False, True):
        loss = compress.distillation_loss(tiny_sd, ["down_blocks.0", "up_blocks.1"], retrain, normalize)
        with torch.no_grad():
            values[normalize] = loss(student, None, data.cond.float(), data.latents, torch.Generator().manual_seed(0))
        loss.release()
    assert values[False] > 0 and values[True] > 0 and values[False] != values[True]
    with torch.no_grad():
        loss = compress.distillation_loss(tiny_sd, ["down_blocks.0"], retrain, True)
        same = loss(tiny_sd.unet, None, data.cond.float(), data.latents, torch.Generator().manual_seed(0))
    loss.release()
    assert same == 0  # the teacher against itself
    assert not tiny_sd.unet.down_blocks[0]._forward_hooks  # released
