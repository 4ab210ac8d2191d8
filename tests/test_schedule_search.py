"""Solver-schedule search (USF / S^3, 2024): the replaying scheduler against diffusers' DPM-Solver++ and
UniPC, its orders of accuracy on a toy problem with a known solution, the search on the tiny pipeline, exact
replay from a saved file, the model-call budget, and bad schedule files."""

import json
import math
import re

import pytest
import torch
from conftest import _scheduler, run
from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline, UniPCMultistepScheduler

import stablekit
from stablekit import SchedulerPlugin, StablekitError
from stablekit.sampling import Schedule, SearchedScheduler, dpm_solver_schedule, search_schedule


def replay(pipe, schedule, steps=None, **kw):
    pipe.scheduler = SearchedScheduler.from_config(_scheduler().config, schedule=schedule.to_dict())
    return run(pipe, steps=steps or schedule.budget, **kw)


def with_correctors(s: Schedule) -> Schedule:
    return Schedule(s.timesteps, s.orders, tuple(i < s.budget - 1 for i in range(s.budget)))


@pytest.mark.parametrize("n", [3, 6])
def test_known_solvers_are_in_the_search_space(tiny_sd, n):
    baseline = dpm_solver_schedule(_scheduler().config, n)
    assert baseline.orders == (1,) + (2,) * (n - 2) + (1,) and not any(baseline.correctors)
    unipc = with_correctors(baseline)
    for cls, schedule in [(DPMSolverMultistepScheduler, baseline), (UniPCMultistepScheduler, unipc)]:
        tiny_sd.scheduler = cls.from_config(_scheduler().config)  # diffusers' defaults: DPM-Solver++ 2M, UniPC bh2
        theirs = run(tiny_sd, steps=n)
        assert tiny_sd.scheduler.timesteps.tolist() == list(schedule.timesteps)
        torch.testing.assert_close(replay(tiny_sd, schedule), theirs, rtol=1e-5, atol=1e-4)
    assert (replay(tiny_sd, unipc) - replay(tiny_sd, baseline)).abs().max() > 0.1  # the corrector acts


# A toy problem with a known answer: data N(mu, s^2) per dimension, whose exact noise prediction is linear in x
# and whose probability-flow ODE has a closed-form solution.
TOY = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
_g = torch.Generator().manual_seed(0)
MU = torch.randn(64, generator=_g, dtype=torch.float64)
S = torch.empty(64, dtype=torch.float64).uniform_(math.log(0.1), 0.0, generator=_g).exp()
X_T = torch.randn(4, 64, generator=_g, dtype=torch.float64)
ABAR = SearchedScheduler(**TOY, schedule=Schedule((0,), (1,), (False,)).to_dict()).alphas_cumprod.double()
LAMBDA = (ABAR.sqrt() / (1 - ABAR).sqrt()).log()


def toy_eps(x, t):
    a, s = ABAR[t].sqrt(), (1 - ABAR[t]).sqrt()
    return s * (x - a * MU) / (ABAR[t] * S**2 + s * s)


def toy_exact(t0, t1):
    """The clean-sample prediction at t1 of the exact ODE solution started from X_T at t0 (what the last step
    of a schedule returns)."""
    z = (X_T - ABAR[t0].sqrt() * MU) / (ABAR[t0] * S**2 + 1 - ABAR[t0]).sqrt()
    x = ABAR[t1].sqrt() * MU + (ABAR[t1] * S**2 + 1 - ABAR[t1]).sqrt() * z
    return (x - (1 - ABAR[t1]).sqrt() * toy_eps(x, t1)) / ABAR[t1].sqrt()


def toy_error(order, corrector, n):
    targets = [LAMBDA[999] + (LAMBDA[200] - LAMBDA[999]) * k / (n - 1) for k in range(n)]  # uniform in log-SNR
    ts = tuple(int((LAMBDA - v).abs().argmin()) for v in targets)
    schedule = Schedule(
        ts, tuple(min(order, i + 1) for i in range(n - 1)) + (1,), tuple(corrector and i < n - 1 for i in range(n))
    )
    sch = SearchedScheduler(**TOY, schedule=schedule.to_dict())
    sch.set_timesteps()
    x = X_T.clone()
    for t in sch.timesteps:
        x = sch.step(toy_eps(x, t), t, x).prev_sample
    exact = toy_exact(ts[0], ts[-1])
    return float((x - exact).norm() / exact.norm())


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("corrector", [False, True])
def test_toy_order_of_accuracy(order, corrector):
    errors = [toy_error(order, corrector, n) for n in (12, 24, 48)]
    slope = math.log2(errors[0] / errors[-1]) / 2  # per halving of the step
    expected = order + corrector  # the UniPC corrector raises the order by one
    assert expected - 0.5 < slope < expected + 0.7, (errors, slope)
    if corrector:
        assert errors[-1] < toy_error(order, False, 48)


PROMPTS = ["a red star on a gray background", "a blue circle"]
SEARCH = dict(budget=5, reference_steps=30, generations=3, children=4, height=32, width=32)


def final_latents(pipe, steps=5, **kw):
    return pipe(
        PROMPTS,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(0),
        height=32,
        width=32,
        output_type="latent",
        **kw,
    ).images


def count_unet_calls(pipe, fn):
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        return fn(), calls
    finally:
        hook.remove()


def test_search_beats_or_equals_dpm_solver_and_replays_exactly(tiny_sd, tiny_sd_path, tmp_path):
    result = search_schedule(tiny_sd, PROMPTS, **SEARCH)
    assert result.baseline == dpm_solver_schedule(tiny_sd.scheduler.config, 5)
    assert result.schedule.budget == 5 and result.evaluated > 12
    assert result.loss <= result.baseline_loss  # the baseline is evaluated first and the best is kept
    with stablekit.use(tiny_sd, SchedulerPlugin(DPMSolverMultistepScheduler)):
        reference, dpm = final_latents(tiny_sd, 30), final_latents(tiny_sd, 5)
    assert math.isclose(float(((dpm - reference) ** 2).mean()), result.baseline_loss, rel_tol=1e-4)

    path = tmp_path / "schedule.json"
    result.schedule.save(path, loss=result.loss)
    assert Schedule.load(path) == result.schedule and json.loads(path.read_text())["search"]["loss"] == result.loss
    loaded = stablekit.load(tiny_sd_path, device="cpu", scheduler=f"searched:schedule={path}")
    assert isinstance(loaded.scheduler, SearchedScheduler) and loaded.scheduler.plan == result.schedule
    out, calls = count_unet_calls(loaded, lambda: final_latents(loaded, steps=50))  # the schedule sets the steps
    assert calls == [2 * len(PROMPTS)] * 5  # 5 model calls, guidance's halves batched in each
    assert float(((out - reference) ** 2).mean()) == result.loss
    with stablekit.use(tiny_sd, SchedulerPlugin(SearchedScheduler, schedule=result.schedule.to_dict())):
        assert torch.equal(final_latents(tiny_sd), out)
    loaded.scheduler.save_config(tmp_path / "config")
    assert SearchedScheduler.from_pretrained(tmp_path / "config").plan == result.schedule


def test_search_minimises_a_given_metric(tiny_sd):
    seen = []

    def metric(out, reference):  # prefers the largest final latents: not what the squared distance prefers
        seen.append((out.shape, reference.shape))
        return -float(out.abs().mean())

    result = search_schedule(tiny_sd, PROMPTS, **SEARCH, metric=metric)
    assert len(seen) == result.evaluated and all(a == b and a[0] == len(PROMPTS) for a, b in seen)
    with stablekit.use(tiny_sd, SchedulerPlugin(SearchedScheduler, schedule=result.schedule.to_dict())):
        assert result.loss == -float(final_latents(tiny_sd, 5).abs().mean())
    assert (
        result.loss <= result.baseline_loss and result.schedule != search_schedule(tiny_sd, PROMPTS, **SEARCH).schedule
    )


def test_img2img_runs_the_last_steps(tiny_sd):
    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd.components, requires_safety_checker=False)
    schedule = with_correctors(dpm_solver_schedule(_scheduler().config, 6))
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out, calls = count_unet_calls(pipe, lambda: replay(pipe, schedule, image=image, strength=0.5))
    assert len(calls) == 3 and pipe.scheduler.step_index == 6 and torch.isfinite(out).all()


def bad(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


GOOD = Schedule((999, 500, 100), (1, 2, 1), (True, False, False)).to_dict()
BAD_FILES = {
    "not json": ("{timesteps: [1]", "Expecting property name"),
    "another format": (_scheduler().config, "not a stablekit solver schedule"),
    "missing list": ({**GOOD, "orders": None}, "missing list(s): orders"),
    "lengths": ({**GOOD, "orders": [1, 1]}, "3 timesteps, 2 orders, 3 correctors"),
    "increasing": ({**GOOD, "timesteps": [100, 500, 999]}, "strictly decreasing"),
    "float timestep": ({**GOOD, "timesteps": [999.5, 500, 100]}, "integers"),
    "order too high early": ({**GOOD, "orders": [2, 2, 1]}, "at most i + 1"),
    "last order": ({**GOOD, "orders": [1, 2, 2]}, "1 at the last step"),
    "last corrector": ({**GOOD, "correctors": [False, False, True]}, "false at the last step"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_schedule_files_give_one_clear_line(tiny_sd, tmp_path, case):
    content, message = BAD_FILES[case]
    path = bad(tmp_path, content)
    with pytest.raises(StablekitError, match=re.escape(message)) as e:
        stablekit.set_scheduler(tiny_sd, f"searched:schedule={path}")
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_file_missing_schedule_and_too_many_timesteps(tiny_sd, tmp_path):
    with pytest.raises(StablekitError, match="does not exist"):
        stablekit.set_scheduler(tiny_sd, f"searched:schedule={tmp_path / 'nothing.json'}")
    with pytest.raises(StablekitError, match="needs schedule=PATH"):
        stablekit.set_scheduler(tiny_sd, "searched")
    path = bad(tmp_path, {**GOOD, "timesteps": [1000, 500, 100]})
    with pytest.raises(StablekitError, match="1000 training timesteps"):
        stablekit.set_scheduler(tiny_sd, f"searched:schedule={path}")
    with pytest.raises(StablekitError, match="budget"):
        search_schedule(tiny_sd, PROMPTS, budget=0)
    assert stablekit.CATALOGUE["scheduler"]["searched"] is SearchedScheduler
