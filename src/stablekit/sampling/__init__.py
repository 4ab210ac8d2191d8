"""Samplers as diffusers schedulers: swap ``pipe.scheduler`` or attach a ``SchedulerPlugin``.

    pipe.scheduler = HBScheduler.from_config(pipe.scheduler.config, beta=0.8)
    with stablekit.use(pipe, SchedulerPlugin(GHVBScheduler, solver_order=3, beta=0.5)):   # GHVB 2.5
        image = pipe(prompt, num_inference_steps=8, guidance_scale=15).images[0]

* :class:`HBScheduler`, :class:`HBDPMSolverScheduler`, :class:`GHVBScheduler` ("Diffusion Sampling with
  Momentum for Mitigating Divergence Artifacts", 2024): heavy-ball and generalised heavy-ball momentum on PLMS and
  DPM-Solver++, against divergence at few steps and high guidance.
* :func:`search_schedule` (USF / S^3, "A Unified Sampling Framework for Solver Searching of
  Diffusion Probabilistic Models", 2024): search per-step solver decisions (timesteps, DPM-Solver++ order,
  UniPC corrector) for a budget of model calls; :class:`SearchedScheduler` replays the saved :class:`Schedule`:

      search_schedule(pipe, prompts, budget=6).schedule.save("s.json")
      pipe = stablekit.load(scheduler="searched:schedule=s.json")

They are filed with diffusers' own schedulers in ``CATALOGUE["scheduler"]`` (:mod:`stablekit.registry`):
``--scheduler hb:beta=0.9``, ``stablekit.load(scheduler="ghvb")``.
"""

from .momentum import GHVBScheduler, HBDPMSolverScheduler, HBScheduler, MomentumScheduler
from .schedule_search import Schedule, SearchedScheduler, SearchResult, dpm_solver_schedule, search_schedule

__all__ = [
    "HBScheduler",
    "HBDPMSolverScheduler",
    "GHVBScheduler",
    "MomentumScheduler",
    "Schedule",
    "SearchedScheduler",
    "SearchResult",
    "dpm_solver_schedule",
    "search_schedule",
]
