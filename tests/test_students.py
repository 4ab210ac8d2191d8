"""Few-step students: the teacher's pairs are its own samples, the one-step loss is the pipeline's one-step error,
training lowers it, and students save as folders that load and refuse to overwrite."""

import pytest
import torch
from click.testing import CliRunner
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

import stablekit
from stablekit import cli
from stablekit.default_model.train import SCHEDULER_CONFIG
from stablekit.errors import StablekitError
from stablekit.train import guidance_lora, instaflow, lcm_distill, students

PROMPTS = ["a red star", "a blue circle on a green background", "a small yellow square", "a pink heart"]


@pytest.fixture
def v_pipe(tiny_sd):
    tiny_sd.scheduler = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)  # the embedded model's: v, trailing
    tiny_sd.set_progress_bar_config(disable=True)
    return tiny_sd


def test_teacher_pairs_are_the_pipelines_own_samples(v_pipe):
    pairs = students.sample_pairs(v_pipe, PROMPTS[:2], steps=3, guidance=3.0, seed=5, guidance_rescale=0.7)
    again = v_pipe(
        PROMPTS[:2],
        latents=pairs.noise,
        num_inference_steps=3,
        guidance_scale=3.0,
        guidance_rescale=0.7,
        output_type="latent",
    ).images
    assert torch.equal(pairs.latents, again)
    assert not torch.equal(pairs.latents[0], pairs.latents[1])  # fresh noise per prompt
    assert pairs.cond.shape[0] == 2


def test_one_step_loss_is_the_error_of_the_pipelines_one_step_sample(v_pipe):
    pairs = students.sample_pairs(v_pipe, PROMPTS, steps=1, guidance=1.0, seed=1)
    loss = instaflow.one_step_loss(v_pipe.scheduler)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        assert loss(v_pipe.unet, pairs.noise, pairs.cond.float(), pairs.latents, g) < 1e-8
        other = students.sample_pairs(v_pipe, PROMPTS, steps=4, guidance=1.0, seed=1)
        assert loss(v_pipe.unet, other.noise, other.cond.float(), other.latents, g) > 1e-4


def test_distillation_brings_the_one_step_sample_to_the_teachers(v_pipe):
    teacher = students.sample_pairs(v_pipe, PROMPTS, steps=4, guidance=2.0, seed=2)

    def one_step_error(pipe):
        out = pipe(
            prompt_embeds=teacher.cond.float(),
            latents=teacher.noise,
            num_inference_steps=1,
            guidance_scale=1.0,
            output_type="latent",
        ).images
        return (out - teacher.latents).pow(2).mean().item()

    config = instaflow.Config(
        pairs=4,
        teacher_steps=4,
        guidance=2.0,
        reflow_iterations=30,
        reflow_steps=2,
        distill_iterations=60,
        batch=4,
        lr=1e-3,
        seed=2,
    )
    before = one_step_error(v_pipe)
    student, recipe = instaflow.distill(v_pipe, config, prompts=PROMPTS)
    assert one_step_error(student) < 0.5 * before
    assert recipe["steps"] == 1 and recipe["guidance"] == 1.0
    assert student.unet is not v_pipe.unet and one_step_error(v_pipe) == before  # the teacher is untouched


def test_an_epsilon_teacher_is_refused(tiny_sd):
    with pytest.raises(StablekitError, match="v-prediction"):
        instaflow.distill(tiny_sd, instaflow.Config(pairs=1, reflow_iterations=1, distill_iterations=1))


def test_a_student_saves_as_a_folder_that_loads_and_is_never_overwritten(v_pipe, tmp_path):
    out = students.save_student(v_pipe, tmp_path / "student", {"method": "instaflow", "steps": 1, "guidance": 1.0})
    loaded = stablekit.load(out)
    assert torch.equal(loaded.unet.conv_in.weight, v_pipe.unet.conv_in.weight)
    assert stablekit.pipeline.recommended(out) == {"steps": 1, "guidance": 1.0}
    assert stablekit.pipeline.recommended(None) == {}
    png = tmp_path / "one.png"
    args = ["generate", "a red star", "--model", str(out), "--size", "32x32", "-o", str(png)]
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 0, result.output
    assert (Image.open(png).text["steps"], Image.open(png).text["guidance"]) == ("1", "1.0")  # the student's own
    with pytest.raises(StablekitError, match="not an empty folder"):
        students.save_student(v_pipe, out, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "student"]  # no temporary folder left


def test_distill_command_refuses_a_used_folder_and_writes_nothing(tmp_path, tiny_sd_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("x")
    result = CliRunner().invoke(cli.cli, ["distill", "--model", str(tiny_sd_path), "-o", str(used)])
    assert result.exit_code == 2 and "not an empty folder" in result.output
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    result = CliRunner().invoke(
        cli.cli,
        ["distill", "--model", str(tiny_sd_path), "-o", str(tmp_path / "new"), "--pairs", "1", "--iterations", "1"],
    )
    assert result.exit_code == 2 and "v-prediction" in result.output
    assert not (tmp_path / "new").exists()


def test_consistency_boundary_is_the_lcm_schedulers():
    from diffusers import LCMScheduler

    sched = LCMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "steps_offset"})
    t = torch.tensor([0, 19, 499, 999])
    c_skip, c_out = lcm_distill.boundary(t)
    for i, step in enumerate(t.tolist()):
        skip, out = sched.get_scalings_for_boundary_condition_discrete(step)
        assert torch.isclose(c_skip[i, 0, 0, 0], torch.tensor(float(skip))) and abs(c_out[i].item() - out) < 1e-6


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_predictions_convert_back_to_the_clean_latent_and_noise(kind):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a = torch.tensor([0.3, 0.9]).view(-1, 1, 1, 1)
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    pred = eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    got_x0, got_eps = lcm_distill.x0_and_eps(pred, x, a, kind)
    assert torch.allclose(got_x0, x0, atol=1e-5) and torch.allclose(got_eps, eps, atol=1e-5)


def test_lcm_lora_training_lowers_the_consistency_loss_and_loads_in_the_plugin(v_pipe, tmp_path):
    from stablekit.accel.lcm import LCMLoRA

    config = lcm_distill.Config(images=8, iterations=15, batch=8, lr=1e-2, rank=4, seed=0)
    before = v_pipe(
        PROMPTS[0],
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        height=32,
        width=32,
    ).images
    lora, recipe = lcm_distill.distill(v_pipe, config)
    assert not getattr(v_pipe.unet, "peft_config", None)  # the adapter is gone from the teacher
    after_teacher = v_pipe(
        PROMPTS[0],
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        height=32,
        width=32,
    ).images
    assert torch.equal(before, after_teacher)
    path = tmp_path / "lcm.safetensors"
    lcm_distill.save(v_pipe, lora, path, recipe)
    with stablekit.use(v_pipe, LCMLoRA(str(path))):
        fast = v_pipe(
            PROMPTS[0],
            num_inference_steps=2,
            guidance_scale=1.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            height=32,
            width=32,
        ).images
    assert not torch.equal(fast, before)
    assert recipe["probe_loss_after"] < recipe["probe_loss_before"]


def test_distillation_resumes_from_its_work_folder(v_pipe, tmp_path):
    config = instaflow.Config(
        pairs=4, teacher_steps=2, reflow_iterations=3, reflow_steps=2, distill_iterations=3, batch=4, lr=1e-3, seed=3
    )
    first, _ = instaflow.distill(v_pipe, config, prompts=PROMPTS, workdir=tmp_path / "work")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [
        "config.json",
        "distill.pt",
        "reflow.pt",
        "reflow_pairs.pt",
        "teacher_pairs.pt",
    ]
    again, recipe = instaflow.distill(v_pipe, config, prompts=PROMPTS, workdir=tmp_path / "work")
    assert all(torch.equal(a, b) for a, b in zip(first.unet.parameters(), again.unet.parameters(), strict=True))
    with pytest.raises(StablekitError, match="other settings"):
        instaflow.distill(v_pipe, instaflow.Config(pairs=5), prompts=PROMPTS, workdir=tmp_path / "work")


def test_guidance_lora_predicts_the_guided_output_in_one_call(v_pipe):
    config = guidance_lora.Config(images=8, iterations=30, batch=8, lr=3e-3, rank=4, guidance=4.0, seed=0)
    data = students.world_latents(v_pipe, 8, 0)
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (8,), generator=g)
    a = v_pipe.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * data.latents + (1 - a).sqrt() * torch.randn(data.latents.shape, generator=g)
    cond = data.cond.float()
    uncond = v_pipe.encode_prompt([""] * 8, "cpu", 1, False)[0]
    with torch.no_grad():
        c, u = v_pipe.unet(x_t, t, cond).sample, v_pipe.unet(x_t, t, uncond).sample
        guided = u + 4.0 * (c - u)
    student, recipe = guidance_lora.distill(v_pipe, config)
    with torch.no_grad():
        mine = student.unet(x_t, t, cond).sample
        assert torch.equal(v_pipe.unet(x_t, t, cond).sample, c)  # the teacher is untouched
    assert (mine - guided).pow(2).mean() < 0.9 * (c - guided).pow(2).mean()
    assert not any("lora" in n for n, _ in student.unet.named_parameters())  # fused: a plain UNet
    memory = recipe["optimizer_state_bytes"]
    assert 0 < memory["lora"] < 0.2 * memory["full_finetune"]
    assert recipe["guidance"] == 1.0


def test_the_shipped_one_step_student_loads_and_draws_in_one_call():
    pipe = stablekit.load("stablekit-default-1step")
    assert stablekit.pipeline.recommended("stablekit-default-1step") == {"steps": 1, "guidance": 1.0}
    teacher = stablekit.load()
    assert not torch.equal(pipe.unet.conv_in.weight, teacher.unet.conv_in.weight)
    assert pipe.vae is not teacher.vae and torch.equal(
        pipe.vae.decoder.conv_out.weight, teacher.vae.decoder.conv_out.weight
    )
    calls = []
    pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    pipe("a red star on a gray background", num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    assert len(calls) == 1
