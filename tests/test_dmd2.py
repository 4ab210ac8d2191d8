"""DMD2: the generator's gradient is the fake minus the real score, the fake score is updated the configured number of
times per generator update, a stopped run resumes, and the student is a folder that loads and draws in one call."""

import copy

import pytest
import torch
from click.testing import CliRunner
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

import stablekit
from stablekit import cli
from stablekit.default_model.train import SCHEDULER_CONFIG
from stablekit.train import dmd2, students
from stablekit.train.lcm_distill import x0_and_eps

TINY = dict(images=4, iterations=2, fake_updates=3, batch=2, lr=1e-3, seed=0)


@pytest.fixture
def v_pipe(tiny_sd):
    tiny_sd.scheduler = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)  # the embedded model's: v, trailing
    tiny_sd.set_progress_bar_config(disable=True)
    return tiny_sd


def test_the_generator_gradient_is_the_fake_minus_the_real_score(v_pipe):
    trainer = dmd2.DMD2(v_pipe, copy.deepcopy(v_pipe.unet), dmd2.Config(guidance=1.0, **TINY))
    with torch.no_grad():  # a fake score that differs from the real one
        for p in trainer.critic.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g).requires_grad_(True)
    t = torch.tensor([100, 500, 900])
    x_t, _ = trainer.noised(x0.detach(), t, g)
    cond = v_pipe.encode_prompt(["a red star", "a blue circle", "a pink heart"], "cpu", 1, False)[0]
    a = trainer.acp[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        real_pred = v_pipe.unet(x_t, t, cond).sample
        fake_pred = trainer.critic(x_t, t, cond)[0]
    real_x0, real_eps = x0_and_eps(real_pred, x_t, a, "v_prediction")
    fake_x0, fake_eps = x0_and_eps(fake_pred, x_t, a, "v_prediction")
    assert torch.allclose(trainer.real_x0(x_t, t, cond), real_x0, atol=1e-5)  # guidance 1: the teacher itself
    dmd2.dmd_loss(x0, real_x0, fake_x0).backward()
    score_gap = (real_eps - fake_eps) / (1 - a).sqrt()  # s_fake - s_real, with s = -eps / sqrt(1 - a)
    ratio = x0.grad / score_gap
    assert (ratio > 0).all()  # descending the loss moves x0 along s_real - s_fake
    per_sample = ratio.flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample), rtol=1e-3)  # one factor per sample
    weight = (x0.detach() - real_x0).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(x0.grad, (fake_x0 - real_x0) / weight / x0.numel(), atol=1e-8)


def test_the_fake_score_gets_the_configured_updates_per_generator_update(v_pipe):
    config = dmd2.Config(**TINY)
    data = students.world_latents(v_pipe, config.images, config.seed)
    teacher = copy.deepcopy(v_pipe.unet.state_dict())
    trainer = dmd2.DMD2(v_pipe, copy.deepcopy(v_pipe.unet), config)
    calls = {"critic": 0, "generator": 0}
    trainer.opt_c.register_step_post_hook(lambda *_: calls.__setitem__("critic", calls["critic"] + 1))
    trainer.opt_g.register_step_post_hook(lambda *_: calls.__setitem__("generator", calls["generator"] + 1))
    done, logs = dmd2.train(trainer, data, None, None)
    assert done == 2 and len(logs) == 2
    assert calls == {"critic": 2 * config.fake_updates, "generator": 2}
    assert set(logs[0]) == {"dmd", "generator_gan", "fake_denoise", "critic_gan"}
    assert all(torch.equal(v, teacher[k]) for k, v in v_pipe.unet.state_dict().items())  # the real score is frozen
    assert any(p.grad is not None for p in trainer.critic.head.parameters())  # the GAN head trains


def test_a_stopped_run_resumes_from_its_checkpoint(v_pipe, tmp_path):
    config = dmd2.Config(**TINY | {"fake_updates": 1, "save_every": 1})
    _, recipe = dmd2.distill(v_pipe, config, workdir=tmp_path / "work", minutes=1e-9)  # the budget ends at once
    assert recipe["iterations_done"] == 0
    first, recipe = dmd2.distill(v_pipe, config, workdir=tmp_path / "work")
    assert recipe["iterations_done"] == 2
    again, recipe = dmd2.distill(v_pipe, config, workdir=tmp_path / "work")  # all done: nothing more to train
    assert recipe["iterations_done"] == 2
    assert all(torch.equal(a, b) for a, b in zip(first.unet.parameters(), again.unet.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first.unet.parameters(), v_pipe.unet.parameters(), strict=True))


def test_the_distill_command_writes_a_one_step_folder_that_generates(v_pipe, tmp_path):
    teacher = tmp_path / "teacher"
    v_pipe.save_pretrained(teacher)
    out = tmp_path / "student"
    args = ["distill", "--method", "dmd2", "--model", str(teacher), "-o", str(out), "--pairs", "4"]
    result = CliRunner().invoke(cli.cli, args + ["--iterations", "1", "--batch", "2", "--fake-updates", "2"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "student.work").exists()  # the default work folder is removed at the end
    assert stablekit.pipeline.recommended(out) == {"steps": 1, "guidance": 1.0}
    assert not torch.equal(stablekit.load(out).unet.conv_in.weight, v_pipe.unet.conv_in.weight)
    png = tmp_path / "one.png"
    args = ["generate", "a red star", "--model", str(out), "--size", "32x32", "-o", str(png)]
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 0, result.output
    assert (Image.open(png).text["steps"], Image.open(png).text["guidance"]) == ("1", "1.0")


def test_dmd2_options_are_refused_elsewhere_and_bad_settings_write_nothing(tmp_path, tiny_sd_path):
    args = ["distill", "--model", str(tiny_sd_path), "-o", str(tmp_path / "x")]
    result = CliRunner().invoke(cli.cli, args + ["--method", "instaflow", "--minutes", "3"])
    assert result.exit_code == 2 and "--minutes does not apply" in result.output
    result = CliRunner().invoke(cli.cli, args + ["--method", "dmd2", "--teacher-steps", "3"])
    assert result.exit_code == 2 and "--teacher-steps does not apply" in result.output
    result = CliRunner().invoke(cli.cli, args + ["--method", "dmd2"])
    assert result.exit_code == 2 and "v-prediction" in result.output  # an epsilon teacher
    assert not any(tmp_path.iterdir())
