"""Inversion and editing on the tiny random-weight SD pipeline (32x32 images, a few steps)."""

import numpy as np
import pytest
import torch
from conftest import make_tiny_sd, make_tiny_sdxl
from diffusers.hooks import ModelHook
from PIL import Image

import stablekit
from stablekit import Plugin, StablekitError
from stablekit.edit import decode, edit, invert, load_image, reconstruct, reconstruct_image
from stablekit.latents import encode_image

PROMPT = "a red star on a gray background"
STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_sd()


@pytest.fixture(scope="module")
def image():
    low = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.interpolate(low, size=32, mode="bilinear")[0]


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def latent_mse(pipe, inv):
    return ((reconstruct(pipe, inv)[-1] - inv.latents[-1]) ** 2).mean().item()


@pytest.fixture(scope="module")
def ddim_mse(pipe, image):
    return latent_mse(pipe, invert(pipe, image, PROMPT, "ddim", STEPS, guidance=7.5))


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_ddim_reconstruction_is_the_pipelines_own_ddim_sampling(pipe, image, guidance):
    inv = invert(pipe, image, PROMPT, "ddim", STEPS, guidance=guidance)
    ref = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        latents=inv.latents[0],
        height=32,
        width=32,
        output_type="latent",
    ).images
    assert torch.allclose(reconstruct(pipe, inv)[-1], ref, atol=1e-4)


@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_sdxl])
def test_edict_reconstructs_exactly_with_guidance(make, image):
    pipe = make()
    inv = invert(pipe, image, PROMPT, "edict", STEPS, guidance=7.5)
    rec = reconstruct(pipe, inv)
    assert inv.latents.dtype == torch.float64 and pipe.unet.dtype == torch.float32  # cast back after
    assert rel_error(rec[-1], inv.latents[-1]) < 1e-6
    assert rel_error(rec, inv.latents) < 1e-6  # the whole x trajectory


def test_ddim_inversion_is_not_exact_with_guidance(pipe, image):
    inv = invert(pipe, image, PROMPT, "ddim", STEPS, guidance=7.5)
    assert rel_error(reconstruct(pipe, inv)[-1], inv.latents[-1]) > 1e-2


def test_null_text_beats_ddim_and_its_own_pivot(pipe, image, ddim_mse):
    inv = invert(pipe, image, PROMPT, "nulltext", STEPS)
    assert inv.guidance == 7.5 and inv.null_embeds.shape[0] == STEPS
    unoptimised = invert(pipe, image, PROMPT, "nulltext", STEPS, inner_steps=0)  # the guidance-1 pivot, "" embeds
    assert latent_mse(pipe, inv) < min(ddim_mse, latent_mse(pipe, unoptimised))


def test_direct_inversion_follows_the_pivot_exactly(pipe, image, ddim_mse):
    inv = invert(pipe, image, PROMPT, "direct", STEPS)
    pivot = invert(pipe, image, PROMPT, "ddim", STEPS, guidance=1.0).latents
    assert torch.equal(inv.latents, pivot)
    assert (reconstruct(pipe, inv) - pivot).abs().max() < 1e-6
    assert latent_mse(pipe, inv) < 1e-10 < ddim_mse


def test_decoder_inversion_lowers_pixel_error(pipe, image):
    x = load_image(pipe, image)
    target = (x[0] + 1) / 2
    errors = [((decode(pipe, encode_image(pipe, x, n), "pt") - target) ** 2).mean().item() for n in (0, 20)]
    assert errors[1] < 0.7 * errors[0]
    inv = invert(pipe, image, PROMPT, "ddim", 2, decoder_steps=20)
    assert torch.allclose(inv.latents[-1], encode_image(pipe, x, 20))


class StepProbe(Plugin):
    """A controller: a unet hook records (steps done, batch size) per call; step callbacks are counted."""

    def attach(self, pipe):
        probe = self

        class Hook(ModelHook):
            def pre_forward(self, module, *args, **kwargs):
                probe.unet_calls.append((probe.call.step, len(args[0])))
                return args, kwargs

        self.unet_calls, self.steps, self.latents = [], [], []
        self.add_hook(pipe.unet, Hook())

    def on_step_end(self, call, step, timestep, latents):
        self.steps.append(step)
        self.latents.append(latents.clone())
        return latents


@pytest.mark.parametrize("method", ["ddim", "edict", "nulltext", "direct"])
def test_edit_runs_source_and_target_branches_with_a_controller(pipe, image, method):
    probe = StepProbe()
    out = edit(pipe, image, PROMPT, "a blue circle on a white background", method, controller=probe, steps=4)
    assert isinstance(out, Image.Image) and out.size == (32, 32)
    start = 1 if method == "edict" else 0  # EDICT's paper regenerates the last 80%: round(0.2 * 4) = 1
    assert probe.steps == list(range(start, 4)) and stablekit.attached(pipe) == []
    per_step = 2 if method == "edict" else 1  # EDICT evaluates the unet on x, then on y
    assert probe.unet_calls == [
        (i, 4) for i in range(start, 4) for _ in range(per_step)
    ]  # [u_src, u_tgt, c_src, c_tgt]


@pytest.mark.parametrize("method", ["edict", "direct"])
def test_an_edit_at_strength_half_resumes_the_source_trajectory_half_way(pipe, image, method):
    inv, probe = invert(pipe, image, PROMPT, method, 4), StepProbe()
    edit(pipe, inv, PROMPT, "a blue circle", method, controller=probe, strength=0.5)
    assert probe.steps == [2, 3] and [step for step, _ in probe.unet_calls][0] == 2
    source = torch.stack([z[:1] for z in probe.latents])  # the source branch after steps 2 and 3
    # EDICT's coupling is float64, but its float32 UNet calls run at another batch size than at inversion, which
    # some CPUs round differently (4e-8 on an AMD EPYC); direct's offsets are float32 throughout
    tol = 1e-6 if method == "edict" else 1e-4
    assert (source.double() - inv.latents[3:].double()).abs().max() < tol
    for bad in (0, 1.5, 0.1):  # 0.1 of 4 steps rounds to none
        with pytest.raises(StablekitError, match="strength must be in"):
            edit(pipe, inv, PROMPT, "a blue circle", method, strength=bad)


def test_edict_edit_with_the_source_prompt_reproduces_the_image(pipe, image):
    def pixels(im):
        return np.asarray(im).astype(int)

    ref = pixels(decode(pipe, encode_image(pipe, load_image(pipe, image))))
    assert np.abs(pixels(edit(pipe, image, PROMPT, PROMPT, "edict", steps=4)) - ref).max() <= 1
    assert np.abs(pixels(edit(pipe, image, PROMPT, "a blue circle", "edict", steps=4)) - ref).max() > 10


@pytest.mark.parametrize("method", ["ddim", "edict", "nulltext", "direct"])
def test_a_batch_of_images_inverts_and_edits_as_each_image_alone(pipe, image, method):
    from stablekit.edit import PromptToPrompt

    images, prompts = [image, image.flip(-1)], [PROMPT, "a blue circle on a white background"]
    targets = ["a green star on a gray background", "a blue circle on a dark white background"]
    kw = {"inner_steps": 3} if method == "nulltext" else {}  # few enough that no image stops early
    inv = invert(pipe, images, prompts, method, STEPS, **kw)
    assert inv.latents.shape[1] == 2 and inv.prompts == prompts
    controller = PromptToPrompt("refine")  # the pairs get different token maps
    edits = edit(pipe, inv, prompts, targets, controller=controller)
    for j in range(2):
        alone = invert(pipe, images[j], prompts[j], method, STEPS, **kw)
        # the VAE encodes a batch ~1e-6 apart from one image; the random unet at guidance amplifies that
        assert rel_error(inv.latents[:, j : j + 1], alone.latents) < 2e-3
        assert rel_error(reconstruct(pipe, inv)[:, j : j + 1], reconstruct(pipe, alone)) < 2e-3
        one = edit(pipe, alone, prompts[j], targets[j], controller=controller)
        assert np.abs(np.asarray(one, dtype=int) - np.asarray(edits[j], dtype=int)).max() <= 1


def test_reconstruct_image_reports_psnr(pipe, image, tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    out, db = reconstruct_image(pipe, path, PROMPT, "edict", steps=3)
    _, vae_db = reconstruct_image(pipe, path, PROMPT, "edict", steps=1)
    assert out.size == (32, 32) and db == pytest.approx(vae_db, abs=0.05)  # exact: only the VAE loses


def test_bad_input_is_one_line_stablekit_error(pipe, image, tmp_path):
    (tmp_path / "x.txt").write_text("not an image")
    cases = [
        (42, "expected an image"),
        (str(tmp_path / "x.txt"), "cannot read image"),
        (image[:, :31, :30], "30x31; width and height must be multiples of 2"),
        (image[None].repeat(2, 1, 1, 1), "shape"),
        (image * 2, r"\[0, 1\]"),
    ]
    for bad, match in cases:
        with pytest.raises(StablekitError, match=match) as e:
            invert(pipe, bad, PROMPT, "ddim", 2)
        assert "\n" not in str(e.value)
    with pytest.raises(StablekitError, match="unknown inversion method 'pti'"):
        invert(pipe, image, PROMPT, "pti")
    with pytest.raises(StablekitError, match="steps >= 1"):
        invert(pipe, image, PROMPT, "edict", steps=0)
    with pytest.raises(StablekitError, match="expected an Inversion"):
        reconstruct(pipe, image)
