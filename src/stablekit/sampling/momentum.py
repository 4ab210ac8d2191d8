"""Heavy-ball (HB) and generalised heavy-ball (GHVB) momentum samplers.

Wizadwongsa et al., "Diffusion Sampling with Momentum for Mitigating Divergence Artifacts" (ICLR 2024).
With few steps and a high guidance scale, high-order multistep solvers leave their small stability
regions and diverge (over-saturated blobs). The paper damps the solver's update direction with Polyak's
heavy ball, which enlarges the stability region at the price of first-order convergence (HB), or mixes
the momentum into the multistep weights so that accuracy and damping trade off continuously (GHVB).

Each step turns the model output into the solver's target ``f`` (the noise for PLMS, the clean sample for
DPM-Solver++), forms a direction ``d`` from the recent targets and moves with the solver's first-order
transfer (``a``, ``s`` are the signal and noise scales sqrt(alpha_bar), sqrt(1 - alpha_bar), primes at
the next step)::

    PLMS:           x' = (a'/a) x + (s' - a' s / a) d        d = sum_j c_j f_{n-j}     (Adams-Bashforth)
    DPM-Solver++:   x' = (s'/s) x + (a' - s' a / s) d        d = D0 + (D0 - D1) / (2 r) (2M)
    HB:             the step uses v_n = (1 - beta) v_{n-1} + beta d_n instead of d_n (v_0 = d_0)
    GHVB:           v_n = (1 - beta) v_{n-1} + beta f_n, and d_n = sum_j c_j(beta) v_{n-j}

``c_j(beta)`` are the paper's GHVB weights, which are the Adams-Bashforth weights at beta = 1. The paper
names GHVB by its order ``solver_order - 1 + beta``: GHVB 2.5 is ``solver_order=3, beta=0.5``.

Implemented: :class:`HBScheduler` (PLMS, i.e. PNDM's pseudo linear multistep on the noise, with HB),
:class:`HBDPMSolverScheduler` (DPM-Solver++ 2M on the clean-sample prediction, with HB) and
:class:`GHVBScheduler` (PLMS with GHVB), for epsilon, v and sample prediction. They are diffusers
schedulers: ``pipe.scheduler = HBScheduler.from_config(pipe.scheduler.config, beta=0.8)`` or
``stablekit.use(pipe, SchedulerPlugin(HBScheduler, beta=0.8))``. ``beta=1`` turns the momentum off: HB
and GHVB then equal their solver, and GHVB with ``solver_order=1`` equals HB with ``solver_order=1``
(DDIM with heavy ball). Timesteps are the wrapped solver's own (DDIM's for PLMS,
``DPMSolverMultistepScheduler``'s for DPM-Solver++, each with its own default spacing unless
``timestep_spacing`` is given), so at ``beta=1`` the outputs match diffusers' DDIM
(order 1) and DPM-Solver++ (order 2) to float rounding.

Defaults are the authors' code's main settings: beta = 0.8 on PLMS4 ("HB 3.8") and on DPM-Solver++(2M);
GHVB 3.8 (``solver_order=4, beta=0.8``; the code has no single GHVB default, its experiments sweep 0.5-4).

PLMS warms up with lower-order Adams-Bashforth steps, as the paper and the authors' code do, not with the
extra Heun-like first step of diffusers' ``PNDMScheduler``, so PLMS4 here is not ``PNDMScheduler``.

Deviations from the authors' code: steps are counted, not looked up from the timestep, and all state is
reset by ``set_timesteps``; HB on DPM-Solver++ starts its momentum at the first step (``v_0 = d_0``, as the
code's lazy initialisation also gives) and, as in the code, leaves the final first-order step to sigma = 0
without momentum. GHVB is defined on PLMS only, as in the paper. Nesterov momentum (in the code, not
proposed by the paper) is not implemented.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

from ..errors import StablekitError
from ..registry import register

# GHVB weights of v_n, v_{n-1}, ... (newest first) for 1..4 past values; beta = 1 gives Adams-Bashforth.
_WEIGHTS = {
    1: lambda b: (b,),
    2: lambda b: ((2 + b) / 2, -(2 - b) / 2),
    3: lambda b: ((18 + 5 * b) / 12, -(24 - 8 * b) / 12, (6 - b) / 12),
    4: lambda b: ((46 + 9 * b) / 24, -(78 - 19 * b) / 24, (42 - 5 * b) / 24, -(10 - b) / 24),
}


def multistep(history: list[torch.Tensor], b: float = 1.0) -> torch.Tensor:
    """GHVB-weighted combination of `history` (oldest first, at most 4); b = 1 is Adams-Bashforth (PLMS)."""
    weights = _WEIGHTS[len(history)](b)
    return sum((w / b) * h for w, h in zip(weights, reversed(history), strict=False))


class VPScheduler(SchedulerMixin, ConfigMixin):
    """What our discrete-time (DDPM-family) schedulers share: the configs of diffusers' schedulers they load from
    (``_compatibles``), one model call per step (``order``), unscaled model inputs, and forward noising
    ``sqrt(abar) x + sqrt(1 - abar) noise`` from ``self.alphas_cumprod`` (for img2img)."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod.to(original.device)[timesteps.to(original.device)].to(original.dtype)
        abar = abar.reshape(-1, *[1] * (original.ndim - 1))
        return abar.sqrt() * original + (1 - abar).sqrt() * noise


class MomentumScheduler(VPScheduler):
    """Shared machinery: the noise schedule, the wrapped solver's timesteps, step counting, the transfer."""

    solver = "plms"  # "plms": targets are noise; "dpm++": targets are clean samples
    max_order = 4

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        beta: float = 0.8,
        solver_order: int | None = None,
    ):
        if not 0 < beta <= 1:
            raise StablekitError(f"momentum beta must be in (0, 1] (1 turns momentum off), got {beta}")
        self.k = self.max_order if solver_order is None else int(solver_order)
        if not 1 <= self.k <= self.max_order:
            raise StablekitError(
                f"{type(self).__name__} supports solver_order 1..{self.max_order}, got {solver_order}"
            )
        noise = dict(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            prediction_type=prediction_type,
            steps_offset=steps_offset,
            **({"timestep_spacing": timestep_spacing} if timestep_spacing else {}),
        )
        self._grid = (
            DPMSolverMultistepScheduler(**noise)
            if self.solver == "dpm++"
            else DDIMScheduler(**noise, set_alpha_to_one=set_alpha_to_one)
        )
        self.alphas_cumprod = self._grid.alphas_cumprod
        self.init_noise_sigma = 1.0
        self.timesteps = self._grid.timesteps
        self.num_inference_steps = None
        self._begin = 0
        self._reset()

    def _reset(self):
        self.step_index, self._vel, self._history = self._begin, None, []

    def set_begin_index(self, begin_index: int = 0):
        """img2img pipelines start at a later step; counting starts there."""
        self._begin = begin_index
        self._reset()

    def set_timesteps(self, num_inference_steps: int, device=None):
        """The wrapped solver's timesteps and noise levels; resets the momentum and the history."""
        grid = self._grid
        grid.set_timesteps(num_inference_steps, device=device)
        if self.solver == "dpm++":
            alpha = 1 / (grid.sigmas.double() ** 2 + 1).sqrt()  # diffusers' VE sigma -> (alpha, sigma)
            self._scales = (alpha, grid.sigmas.double() * alpha)
        else:
            abar = grid.alphas_cumprod[grid.timesteps.cpu()].double()
            abar = torch.cat([abar, torch.tensor([float(grid.final_alpha_cumprod)], dtype=abar.dtype)])
            self._scales = (abar.sqrt(), (1 - abar).sqrt())
        self.timesteps, self.num_inference_steps = grid.timesteps, len(grid.timesteps)
        self._begin = 0
        self._reset()

    def _target(self, model_output, sample, a, s):
        """The solver's target: the noise (PLMS) or the clean sample (DPM-Solver++)."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            eps, x0 = model_output, (sample - s * model_output) / a
        elif kind == "v_prediction":
            eps, x0 = a * model_output + s * sample, a * sample - s * model_output
        elif kind == "sample":
            eps, x0 = (sample - a * model_output) / s, model_output
        else:
            raise StablekitError(f"{type(self).__name__} does not support prediction_type '{kind}'")
        return x0 if self.solver == "dpm++" else eps

    def _direction(self, f: torch.Tensor, i: int) -> torch.Tensor:
        raise NotImplementedError

    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **kwargs
    ) -> SchedulerOutput | tuple:
        if self.num_inference_steps is None:
            raise StablekitError(f"call {type(self).__name__}.set_timesteps before step")
        i, (alpha, sigma), x = self.step_index, self._scales, sample.float()  # float32, as diffusers' DPM-Solver
        a, s, a1, s1 = float(alpha[i]), float(sigma[i]), float(alpha[i + 1]), float(sigma[i + 1])
        d = self._direction(self._target(model_output.float(), x, a, s), i)
        if self.solver == "dpm++":
            prev = (s1 / s) * x + (a1 - s1 * a / s) * d
        else:
            prev = (a1 / a) * x + (s1 - a1 * s / a) * d
        self.step_index += 1
        prev = prev.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _momentum(self, d: torch.Tensor) -> torch.Tensor:
        beta = self.config.beta
        self._vel = d if self._vel is None else (1 - beta) * self._vel + beta * d
        return self._vel


@register("scheduler")
class HBScheduler(MomentumScheduler):
    """PLMS (Adams-Bashforth on the predicted noise, order `solver_order`, default 4) with heavy-ball momentum."""

    name = "hb"

    def _direction(self, f, i):
        self._history = (self._history + [f])[-self.k :]
        return self._momentum(multistep(self._history))


@register("scheduler")
class GHVBScheduler(MomentumScheduler):
    """PLMS with generalised heavy ball: GHVB of order ``solver_order - 1 + beta`` (default 3.8)."""

    name = "ghvb"

    def _direction(self, f, i):
        self._history = (self._history + [self._momentum(f)])[-self.k :]
        return multistep(self._history, self.config.beta)


@register("scheduler")
class HBDPMSolverScheduler(MomentumScheduler):
    """DPM-Solver++ (multistep, data prediction, order `solver_order` <= 2, default 2M) with heavy-ball momentum."""

    name = "hb-dpm++"

    solver = "dpm++"
    max_order = 2

    def _direction(self, x0, i):
        self._history = (self._history + [x0])[-self.k :]
        if i == self.num_inference_steps - 1:  # the final step to sigma = 0 is first order, without momentum
            return x0
        if len(self._history) == 2:
            alpha, sigma = self._scales
            lam = (alpha / sigma).log()
            r = float((lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i]))
            x0 = x0 + (x0 - self._history[0]) / (2 * r)
        return self._momentum(x0)
