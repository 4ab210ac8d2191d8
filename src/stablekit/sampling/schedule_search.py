"""Solver-schedule search ("A Unified Sampling Framework for Solver Searching of Diffusion
Probabilistic Models", 2024: USF, the unified sampling framework, and S^3, its search).

Liu et al., "A Unified Sampling Framework for Solver Searching of Diffusion Probabilistic Models" (ICLR 2024).
Few-step solvers make one choice for every step; USF writes a multistep exponential-integrator solver as
independent per-step decisions and shows that mixing them (a *solver schedule*) beats any fixed solver at
under 10 model calls (NFE). S^3 searches the schedule for a given NFE budget.

Implemented here, for a budget of N model calls (one per step; guidance batches its halves in one call):

* :class:`Schedule`: per step, the timestep the model is called at (the N timesteps, strictly decreasing;
  after the last the solver steps to the clean sample, sigma = 0), the order of the DPM-Solver++ multistep
  predictor (data prediction; 1, 2 = 2M, 3 = 3M, as in diffusers' ``DPMSolverMultistepScheduler``) and
  whether a UniPC corrector (UniC-p in UniPC's ``bh2`` form, p the step's predictor order) refines the step's
  result with the next model output. The corrector reuses the model call the next step makes anyway, so it
  costs no NFE; the last step has none (it would cost one), and on the step before it has no effect (the last
  step returns the model's clean-sample prediction, made before correcting; as in diffusers' UniPC). Order p
  needs p model outputs, so step i has order at most i + 1, and the last step, to sigma = 0, has order 1
  (higher orders divide by an infinite log-SNR step there; diffusers' DPM-Solver++ also ends first order).
  With 2M orders and no corrector this is diffusers' DPM-Solver++; with correctors, its UniPC (order 2).
  JSON files via :meth:`Schedule.save` / :meth:`Schedule.load`.
* :class:`SearchedScheduler`: a diffusers scheduler that replays a schedule exactly:
  ``SearchedScheduler.from_config(pipe.scheduler.config, schedule="s.json")``, or
  ``stablekit.load(..., scheduler="searched:schedule=s.json")``. It calls the model N times whatever
  ``num_inference_steps`` asks for (a different request is logged and ignored).
* :func:`search_schedule`: finds a schedule for a pipeline and a budget. The loss of a schedule compares its
  final latents with those of a many-step DPM-Solver++ run (`reference_steps`) from the same initial noise,
  over calibration prompts: by default their mean squared distance; pass ``metric`` for another, e.g. the
  paper's, a Fréchet distance between image features of the two sets (``stablekit bench accel`` uses the
  default model's attribute-classifier features on 64 prompts: the squared distance favours schedules that
  stop early at a blurry posterior mean, which lose on Fréchet distance). The search is evolutionary: it
  starts from known solvers (the pipeline's default DPM-Solver++ at the budget, as ``--scheduler dpm++``
  makes it: its timesteps, 2M orders with a first-order first and last step, no corrector; DDIM (first
  order throughout); second order with correctors, i.e. UniPC; third order; each also on timesteps uniform
  in t and in log-SNR, from the last training timestep down to DPM-Solver++'s last), then for `generations`
  rounds mutates one decision (an order, a corrector, or a timestep moved between its neighbours) of one of
  the `parents` best schedules found so far, `children` times per round. Every schedule evaluated is
  remembered, and the best is returned: the default
  DPM-Solver++ is the first one evaluated, so the result is never worse than it on the calibration loss.

Deviations from the paper: its decision space also has the prediction type (noise or data), the starting
point of each step, the derivative estimation method and an analytical first step; its search metric is
the FID of generated samples; S^3 trains a light predictor of a schedule's metric from its encoding,
evaluates only the candidates the predictor ranks best, and grows the number of evaluation samples over
several stages. Here every candidate is evaluated directly, since the latent distance to a reference on a
few prompts costs N model calls per prompt batch; that metric needs no image model and is what the solver
approximates, but it rewards matching the reference trajectory rather than image quality itself. Defaults
(budget 6, a 100-step reference, 12 rounds of 8 children of the 4 best) are ours; the paper searches budgets
of 4 to 10 NFE.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils import logging

from ..errors import StablekitError
from ..plugins import SchedulerPlugin, use
from ..registry import register
from .momentum import VPScheduler

FORMAT = "stablekit-solver-schedule"
MAX_ORDER = 3
logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class Schedule:
    """One solver decision per model call: timestep, predictor order, corrector after the step or not."""

    timesteps: tuple[int, ...]
    orders: tuple[int, ...]
    correctors: tuple[bool, ...]

    def __post_init__(self):
        n, ts = len(self.timesteps), self.timesteps
        if not n or len(self.orders) != n or len(self.correctors) != n:
            raise StablekitError(
                f"a schedule needs as many orders and correctors as timesteps (at least one); "
                f"got {n} timesteps, {len(self.orders)} orders, {len(self.correctors)} correctors"
            )
        if (
            not all(isinstance(t, int) and not isinstance(t, bool) for t in ts)
            or min(ts) < 0
            or any(a <= b for a, b in zip(ts, ts[1:], strict=False))
        ):
            raise StablekitError(f"timesteps must be integers >= 0, strictly decreasing; got {list(ts)}")
        if (
            any(p not in range(1, min(MAX_ORDER, i + 1) + 1) for i, p in enumerate(self.orders))
            or self.orders[-1] != 1
        ):
            raise StablekitError(
                f"orders must be 1..{MAX_ORDER}, at most i + 1 at step i and 1 at the last step; "
                f"got {list(self.orders)}"
            )
        if not all(isinstance(c, bool) for c in self.correctors) or self.correctors[-1]:
            raise StablekitError(f"correctors must be true/false, false at the last step; got {list(self.correctors)}")

    @property
    def budget(self) -> int:
        """Model calls (NFE) per generation."""
        return len(self.timesteps)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "timesteps": list(self.timesteps),
            "orders": list(self.orders),
            "correctors": list(self.correctors),
        }

    @classmethod
    def from_dict(cls, data) -> Schedule:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StablekitError(f'not a stablekit solver schedule (no "format": "{FORMAT}")')
        missing = [k for k in ("timesteps", "orders", "correctors") if not isinstance(data.get(k), list)]
        if missing:
            raise StablekitError(f"missing list(s): {', '.join(missing)}")
        return cls(tuple(data["timesteps"]), tuple(data["orders"]), tuple(data["correctors"]))

    def save(self, path: str | os.PathLike, **info) -> None:
        """Write the schedule as JSON; `info` (say, the search's losses) is stored under "search"."""
        Path(path).write_text(json.dumps({**self.to_dict(), **({"search": info} if info else {})}, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schedule:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise StablekitError(f"solver schedule '{path}' does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, StablekitError) as e:
            raise StablekitError(f"solver schedule '{path}': {e}") from None


@register("scheduler")
class SearchedScheduler(VPScheduler):
    """Replays a :class:`Schedule` (a JSON path or its ``to_dict()``) on the pipeline's noise schedule."""

    name = "searched"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        schedule: str | dict | None = None,
    ):
        if schedule is None:
            raise StablekitError(
                "the searched scheduler needs schedule=PATH, a JSON file written by "
                "stablekit.sampling.search_schedule(...).schedule.save(PATH)"
            )
        self.plan = Schedule.from_dict(schedule) if isinstance(schedule, dict) else Schedule.load(schedule)
        if self.plan.timesteps[0] >= num_train_timesteps:
            raise StablekitError(
                f"solver schedule starts at timestep {self.plan.timesteps[0]}, but this model "
                f"has {num_train_timesteps} training timesteps"
            )
        self.alphas_cumprod = DDPMScheduler(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        ).alphas_cumprod
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.tensor(self.plan.timesteps)
        self._begin = 0
        self._reset()

    def _reset(self):
        self.step_index, self._history, self._last = self._begin, [], None

    def set_begin_index(self, begin_index: int = 0):
        """img2img pipelines start at a later step; counting (and the multistep history) starts there."""
        self._begin = begin_index
        self._reset()

    def set_timesteps(self, num_inference_steps: int | None = None, device=None):
        """The schedule's timesteps; `num_inference_steps` cannot change them."""
        n = self.plan.budget
        if num_inference_steps not in (None, n):
            logger.warning(
                f"the searched solver schedule makes {n} model calls; ignoring "
                f"num_inference_steps={num_inference_steps}"
            )
        self.timesteps, self.num_inference_steps = torch.tensor(self.plan.timesteps, device=device), n
        abar = self.alphas_cumprod[list(self.plan.timesteps)].double()
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        self._alpha, self._sigma, self._lambda = alpha.tolist(), sigma.tolist(), (alpha / sigma).log().tolist()
        self._begin = 0
        self._reset()

    def _data_prediction(self, model_output: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        a, s, kind = self._alpha[i], self._sigma[i], self.config.prediction_type
        if kind == "epsilon":
            return (x - s * model_output) / a
        if kind == "v_prediction":
            return a * x - s * model_output
        if kind == "sample":
            return model_output
        raise StablekitError(f"SearchedScheduler does not support prediction_type '{kind}'")

    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **kwargs
    ) -> SchedulerOutput | tuple:
        if self.num_inference_steps is None:
            raise StablekitError("call SearchedScheduler.set_timesteps before step")
        i, x = self.step_index, sample.float()  # float32, as diffusers' DPM-Solver
        m = self._data_prediction(model_output.float(), x, i)
        if self._last is not None and self.plan.correctors[i - 1]:
            x = self._correct(m, i)
        self._history = [(i, m)] + self._history[: MAX_ORDER - 1]
        order = min(self.plan.orders[i], len(self._history))
        prev = m if i == self.num_inference_steps - 1 else self._predict(x, i, order)  # last step: to sigma = 0
        self._last = (x, order)
        self.step_index += 1
        prev = prev.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _predict(self, x: torch.Tensor, i: int, order: int) -> torch.Tensor:
        """DPM-Solver++ multistep from step i to step i + 1, of `order` (diffusers' 2M "midpoint" and 3M)."""
        lam, a, s = self._lambda, self._alpha[i + 1], self._sigma[i + 1]
        (j0, m0), *older = self._history
        h = lam[i + 1] - lam[j0]
        e = math.expm1(-h)
        x_next = (s / self._sigma[j0]) * x - (a * e) * m0
        if order == 1:
            return x_next
        j1, m1 = older[0]
        r0 = (lam[j0] - lam[j1]) / h
        d10 = (m0 - m1) / r0
        if order == 2:
            return x_next - (0.5 * a * e) * d10
        j2, m2 = older[1]
        r1 = (lam[j1] - lam[j2]) / h
        d11 = (m1 - m2) / r1
        d1, d2 = d10 + (r0 / (r0 + r1)) * (d10 - d11), (d10 - d11) / (r0 + r1)
        return x_next + (a * (e / h + 1)) * d1 - (a * ((e + h) / h**2 - 0.5)) * d2

    def _correct(self, m_t: torch.Tensor, i: int) -> torch.Tensor:
        """UniC-p (UniPC's corrector, its bh2 variant) of the step that ended at step i, with the new output m_t."""
        x, p = self._last
        lam, (j0, m0), older = self._lambda, self._history[0], self._history[1:p]
        h = lam[i] - lam[j0]
        e = math.expm1(-h)  # e^-h - 1: the first-order weight, and B(h)
        rks = [(lam[j] - lam[j0]) / h for j, _ in older] + [1.0]
        phi, fact, b = e / -h - 1, 1, []  # phi_2, then the higher phi_k, of the exponential integrator
        for k in range(1, p + 1):
            b.append(phi * fact / e)
            fact *= k + 1
            phi = phi / -h - 1 / fact
        rhos = (
            [0.5]
            if p == 1
            else torch.linalg.solve(
                torch.tensor([[r**k for r in rks] for k in range(p)], dtype=torch.float64),
                torch.tensor(b, dtype=torch.float64),
            ).tolist()
        )
        d = rhos[-1] * (m_t - m0) + sum(rho * (m - m0) / r for rho, r, (_, m) in zip(rhos, rks, older, strict=False))
        return (self._sigma[i] / self._sigma[j0]) * x - (self._alpha[i] * e) * (m0 + d)


def dpm_solver_schedule(config, budget: int) -> Schedule:
    """The schedule of diffusers' default DPM-Solver++ (2M, first-order first and last steps) for `config`.

    Replayed, it equals ``DPMSolverMultistepScheduler.from_config(config)`` unless `config` asks that scheduler
    for Karras (or other non-integer) sigma spacing: the replay uses the rounded timesteps' own noise levels."""
    dpm = DPMSolverMultistepScheduler.from_config(config)
    dpm.set_timesteps(budget)
    orders = [1 if i in (0, budget - 1) else 2 for i in range(budget)]
    return Schedule(tuple(dpm.timesteps.tolist()), tuple(orders), (False,) * budget)


@dataclass(frozen=True)
class SearchResult:
    """The best schedule found and its calibration loss, with the default DPM-Solver++'s for comparison."""

    schedule: Schedule
    loss: float
    baseline: Schedule
    baseline_loss: float
    evaluated: int  # schedules whose loss was measured


def search_schedule(
    pipe,
    prompts,
    budget: int = 6,
    reference_steps: int = 100,
    generations: int = 12,
    children: int = 8,
    parents: int = 4,
    seed: int = 0,
    metric=None,
    **call_kwargs,
) -> SearchResult:
    """Search a solver schedule of `budget` model calls for `pipe` on calibration `prompts`.

    `call_kwargs` (guidance_scale, height, width, ...) go to every pipeline call; each call starts from the
    noise of ``torch.Generator("cpu").manual_seed(seed)``. `metric(latents, reference_latents) -> float`,
    lower is better, scores a schedule's final latents (default: mean squared distance). Costs one
    `reference_steps` run, then `budget` model calls per evaluated schedule (about
    ``18 + generations * children`` of them), each over all prompts.
    """
    if budget < 1:
        raise StablekitError(f"budget is the number of model calls, at least 1; got {budget}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)

    def final_latents(cls, steps, **config):
        with use(pipe, SchedulerPlugin(cls, **config)):
            return pipe(
                prompts,
                num_inference_steps=steps,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="latent",
                **call_kwargs,
            ).images.float()

    reference, losses = final_latents(DPMSolverMultistepScheduler, reference_steps), {}
    metric = metric or (lambda out, ref: float(((out - ref) ** 2).mean()))

    def loss(candidate: Schedule) -> float:
        if candidate not in losses:
            losses[candidate] = float(
                metric(final_latents(SearchedScheduler, budget, schedule=candidate.to_dict()), reference)
            )
        return losses[candidate]

    baseline, rng = dpm_solver_schedule(pipe.scheduler.config, budget), random.Random(seed)
    alphas_cumprod = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    for candidate in _known_solvers(baseline, alphas_cumprod):
        loss(candidate)
    for _ in range(generations):
        top = sorted(losses, key=losses.get)[:parents]
        for _ in range(children):
            loss(_mutate(rng.choice(top), rng, len(alphas_cumprod)))
    best = min(losses, key=losses.get)
    return SearchResult(best, losses[best], baseline, losses[baseline], len(losses))


def _known_solvers(baseline: Schedule, alphas_cumprod: torch.Tensor) -> list[Schedule]:
    """The start of the search: the baseline first, then known solvers on three timestep placements."""
    n, t_hi, t_lo = baseline.budget, len(alphas_cumprod) - 1, baseline.timesteps[-1]
    lam = (alphas_cumprod.double().sqrt() / (1 - alphas_cumprod.double()).sqrt()).log()
    uniform_t = [round(t_hi + (t_lo - t_hi) * k / max(n - 1, 1)) for k in range(n)]
    targets = [lam[t_hi] + (lam[t_lo] - lam[t_hi]) * k / max(n - 1, 1) for k in range(n)]
    uniform_lam = [int((lam - v).abs().argmin()) for v in targets]
    placements = [baseline.timesteps] + [
        tuple(ts) for ts in (uniform_t, uniform_lam) if all(a > b for a, b in zip(ts, ts[1:], strict=False))
    ]
    found = [baseline]
    for ts in placements:
        for top in (1, 2, 3):
            for corrector in (False, True):
                orders = tuple(1 if i == n - 1 else min(top, i + 1) for i in range(n))
                found.append(Schedule(ts, orders, tuple(corrector and i < n - 1 for i in range(n))))
    return list(dict.fromkeys(found))


def _mutate(s: Schedule, rng: random.Random, n_train: int) -> Schedule:
    """`s` with one decision changed: an order, a corrector, or a timestep moved between its neighbours."""
    n, ts, orders, correctors = s.budget, list(s.timesteps), list(s.orders), list(s.correctors)
    i = rng.randrange(n)
    kind = rng.choice(["time"] + ["order"] * (i < n - 1) + ["corrector"] * (i < n - 2))  # see the module doc
    if kind == "order":
        orders[i] = rng.randint(1, min(MAX_ORDER, i + 1))
    elif kind == "corrector":
        correctors[i] = not correctors[i]
    else:
        ts[i] = rng.randrange(ts[i + 1] + 1 if i < n - 1 else 0, ts[i - 1] if i else n_train)
    return Schedule(tuple(ts), tuple(orders), tuple(correctors))
