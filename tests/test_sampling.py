"""Momentum samplers (HB, GHVB: "Diffusion Sampling with Momentum for Mitigating Divergence
Artifacts", 2024) and LCM-LoRA (2023) on the tiny pipeline and on a toy problem
whose exact solution is known."""

import copy
import math

import pytest
import torch
from conftest import _scheduler, run
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

import stablekit
from stablekit import SchedulerPlugin, StablekitError
from stablekit.accel.lcm import LCMLoRA, lcm
from stablekit.sampling import GHVBScheduler, HBDPMSolverScheduler, HBScheduler


def with_scheduler(pipe, cls, steps=5, **config):
    pipe.scheduler = cls.from_config(_scheduler().config, **config)  # the tiny pipeline's own (DDIM) config
    return run(pipe, steps=steps)


def test_beta_one_is_the_wrapped_solver_and_momentum_changes_it(tiny_sd):
    ddim = with_scheduler(tiny_sd, DDIMScheduler)
    hb_ddim = with_scheduler(tiny_sd, HBScheduler, beta=1.0, solver_order=1)
    torch.testing.assert_close(hb_ddim, ddim, rtol=1e-5, atol=1e-4)
    dpm = with_scheduler(tiny_sd, DPMSolverMultistepScheduler)
    torch.testing.assert_close(with_scheduler(tiny_sd, HBDPMSolverScheduler, beta=1.0), dpm, rtol=1e-5, atol=1e-4)
    assert (with_scheduler(tiny_sd, HBDPMSolverScheduler) - dpm).abs().max() > 0.1
    plms = with_scheduler(tiny_sd, HBScheduler, beta=1.0)
    assert (with_scheduler(tiny_sd, HBScheduler) - plms).abs().max() > 0.1  # default beta = 0.8


def test_ghvb_identities(tiny_sd):
    # GHVB of integer order k (beta = 1) is PLMS k, i.e. HB without momentum
    assert torch.equal(
        with_scheduler(tiny_sd, GHVBScheduler, beta=1.0), with_scheduler(tiny_sd, HBScheduler, beta=1.0)
    )
    # GHVB of order beta < 1 is heavy ball on DDIM (first-order PLMS) with that beta
    assert torch.equal(
        with_scheduler(tiny_sd, GHVBScheduler, solver_order=1, beta=0.6),
        with_scheduler(tiny_sd, HBScheduler, solver_order=1, beta=0.6),
    )
    assert not torch.equal(
        with_scheduler(tiny_sd, GHVBScheduler, solver_order=2, beta=0.5),
        with_scheduler(tiny_sd, HBScheduler, solver_order=2, beta=0.5),
    )


def test_img2img_starts_counting_at_the_begin_index(tiny_sd):
    img2img = StableDiffusionImg2ImgPipeline(**tiny_sd.components, requires_safety_checker=False)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    def edit(cls, **config):
        img2img.scheduler = cls.from_config(_scheduler().config, **config)
        return run(img2img, steps=6, image=image, strength=0.5)

    hb = edit(HBScheduler, beta=1.0, solver_order=1)
    assert img2img.scheduler.step_index == 6  # begins at step 3 of 6 and counts 3
    torch.testing.assert_close(hb, edit(DDIMScheduler), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cls", [HBScheduler, GHVBScheduler, HBDPMSolverScheduler])
def test_state_resets_between_calls(tiny_sd, cls):
    fresh = {n: with_scheduler(tiny_sd, cls, steps=n) for n in (3, 5)}
    tiny_sd.scheduler = cls.from_config(_scheduler().config)
    for n in (5, 3, 5):
        assert torch.equal(run(tiny_sd, steps=n), fresh[n])
    assert tiny_sd.scheduler.step_index == len(tiny_sd.scheduler.timesteps) == 5


def test_plugin_registry_config_and_errors(tiny_sd, tmp_path):
    old = tiny_sd.scheduler
    direct = with_scheduler(tiny_sd, GHVBScheduler, steps=3, solver_order=3, beta=0.5)
    tiny_sd.scheduler = old
    with stablekit.use(tiny_sd, SchedulerPlugin(GHVBScheduler, solver_order=3, beta=0.5)):
        assert torch.equal(run(tiny_sd), direct)
    assert tiny_sd.scheduler is old
    for name, cls in [("hb", HBScheduler), ("hb-dpm++", HBDPMSolverScheduler), ("ghvb", GHVBScheduler)]:
        assert stablekit.CATALOGUE["scheduler"][name] is cls
    stablekit.set_scheduler(tiny_sd, "hb-dpm++:beta=0.7")
    assert isinstance(tiny_sd.scheduler, HBDPMSolverScheduler) and tiny_sd.scheduler.config.beta == 0.7
    assert tiny_sd.scheduler.config.beta_schedule == old.config.beta_schedule
    tiny_sd.scheduler.save_config(tmp_path)
    assert HBDPMSolverScheduler.from_pretrained(tmp_path).config.beta == 0.7
    with pytest.raises(StablekitError, match="beta"):
        HBScheduler(beta=0.0)
    with pytest.raises(StablekitError, match="solver_order 1..2"):
        HBDPMSolverScheduler(solver_order=3)


# A toy problem with a known answer: data N(0, 1) ("unconditional") and N(mu, s^2) per dimension
# ("conditional"), whose exact noise predictions are linear in x; guidance w mixes them like CFG.
TOY = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing")
_g = torch.Generator().manual_seed(0)
MU = torch.randn(64, generator=_g, dtype=torch.float64)
S = torch.empty(64, dtype=torch.float64).uniform_(math.log(0.1), 0.0, generator=_g).exp()
X_T = torch.randn(4, 64, generator=_g)


def toy_sample(cls, steps, w=1.0, prediction_type="epsilon", **config):
    sch = cls(**TOY, prediction_type=prediction_type, **config)
    sch.set_timesteps(steps)
    x = X_T.clone()
    for t in sch.timesteps:
        abar = sch.alphas_cumprod[t].double()
        a, s, xd = abar.sqrt(), (1 - abar).sqrt(), x.double()
        eps_u, eps_c = s * xd, s * (xd - a * MU) / (abar * S**2 + s * s)
        eps = eps_u + w * (eps_c - eps_u)
        x0 = (xd - s * eps) / a
        out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]
        x = sch.step(out.float(), t, x).prev_sample
    return x.double()


def rel_err(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


METHODS = {
    "PLMS4": (HBScheduler, dict(beta=1.0)),
    "HB 0.8": (HBScheduler, {}),
    "GHVB 3.8": (GHVBScheduler, {}),
    "DPM++2M": (HBDPMSolverScheduler, dict(beta=1.0)),
    "HB-DPM++ 0.8": (HBDPMSolverScheduler, {}),
}


def test_toy_convergence_without_guidance():
    abar = HBScheduler(**TOY).alphas_cumprod[999].double()
    exact = MU + S * (X_T.double() - abar.sqrt() * MU) / (abar * S**2 + 1 - abar).sqrt()  # the ODE's flow map
    assert rel_err(toy_sample(HBScheduler, 1000, beta=1.0), exact) < 2e-3
    errs = {
        name: [rel_err(toy_sample(cls, n, **kw), exact) for n in (5, 10, 20, 40)]
        for name, (cls, kw) in METHODS.items()
    }
    for name, e in errs.items():
        assert e == sorted(e, reverse=True) and e[-1] < 0.05, (name, e)
    for i in range(4):  # where PLMS4 is stable, momentum costs accuracy: HB is first order, GHVB in between
        assert errs["PLMS4"][i] < errs["GHVB 3.8"][i] < errs["HB 0.8"][i], errs


def test_toy_momentum_mitigates_divergence_under_strong_guidance():
    ref = toy_sample(HBScheduler, 1000, w=10.0, beta=1.0)
    assert rel_err(toy_sample(HBScheduler, 500, w=10.0, beta=1.0), ref) < 1e-3
    for n in (8, 10, 15):
        hb = [rel_err(toy_sample(HBScheduler, n, w=10.0, beta=b), ref) for b in (1.0, 0.8, 0.6)]
        ghvb = [
            rel_err(toy_sample(GHVBScheduler, n, w=10.0, solver_order=k, beta=b), ref)
            for k, b in ((4, 1.0), (4, 0.5), (3, 0.5), (2, 0.5))
        ]  # GHVB 4, 3.5, 2.5, 1.5
        dpm = [rel_err(toy_sample(HBDPMSolverScheduler, n, w=10.0, beta=b), ref) for b in (1.0, 0.8)]
        assert hb[0] > 1 and hb == sorted(hb, reverse=True) and hb[-1] < 0.5, (n, hb)  # PLMS4 diverges
        assert ghvb == sorted(ghvb, reverse=True) and ghvb[-1] < 1, (n, ghvb)
        assert dpm[1] < dpm[0], (n, dpm)


@pytest.mark.parametrize("cls", [HBScheduler, HBDPMSolverScheduler])
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_prediction_types(cls, prediction_type):
    torch.testing.assert_close(toy_sample(cls, 8, 3.0, prediction_type), toy_sample(cls, 8, 3.0), rtol=1e-4, atol=1e-4)


@pytest.fixture
def lora_file(tiny_sd, tmp_path):
    """A random LoRA on the tiny UNet's attention projections, saved in diffusers' format."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(tiny_sd.unet)
    torch.manual_seed(1)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, weight_name="lcm.safetensors")
    return tmp_path / "lcm.safetensors"


def seeded(pipe, seed=0, steps=4):
    torch.manual_seed(seed)  # LCMScheduler draws its re-noising from the global generator under plugins
    return run(pipe, seed=seed, steps=steps)


def test_lcm_lora_plugin(tiny_sd, lora_file):
    old, before = tiny_sd.scheduler, seeded(tiny_sd)
    weights = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    with stablekit.use(tiny_sd, SchedulerPlugin(LCMScheduler)):
        lcm_only = seeded(tiny_sd)
    with lcm(tiny_sd, lora=lora_file):
        assert isinstance(tiny_sd.scheduler, LCMScheduler)
        assert not tiny_sd.get_list_adapters().get("unet")  # fused: no adapter layers while sampling
        with_lora = seeded(tiny_sd)
        assert (with_lora - lcm_only).abs().max() > 0.1
    assert tiny_sd.scheduler is old and torch.equal(seeded(tiny_sd), before)
    assert all(torch.equal(v, weights[k]) for k, v in tiny_sd.unet.state_dict().items())
    with stablekit.use(tiny_sd, LCMLoRA(lora_file, weight=0.0)):
        assert torch.equal(seeded(tiny_sd), lcm_only)
    with pytest.raises(StablekitError, match="conflicts"):
        stablekit.use(tiny_sd, LCMLoRA(lora_file), SchedulerPlugin(DDIMScheduler))
    with pytest.raises(StablekitError, match="does not exist"):
        lcm(tiny_sd, lora=lora_file.with_name("missing.safetensors"))
    assert tiny_sd.scheduler is old and stablekit.attached(tiny_sd) == []
