"""Samplers as diffusers schedulers: swap ``pipe.scheduler`` or attach a ``SchedulerPlugin``.

    pipe.scheduler = HBScheduler.from_config(pipe.scheduler.config, beta=0.8)
    with stablekit.use(pipe, SchedulerPlugin(GHVBScheduler, solver_order=3, beta=0.5)):   # GHVB 2.5
        image = pipe(prompt, num_inference_steps=8, guidance_scale=15).images[0]

* :class:`HBScheduler`, :class:`HBDPMSolverScheduler`, :class:`GHVBScheduler` (PAPERS.md #10): heavy-ball and
  generalised heavy-ball momentum on PLMS and DPM-Solver++, against divergence at few steps and high guidance.

``REGISTRY`` maps their names to the classes (also in ``stablekit.pipeline.SCHEDULERS``: ``--scheduler hb:beta=0.9``).
"""
from .momentum import GHVBScheduler, HBDPMSolverScheduler, HBScheduler, MomentumScheduler

REGISTRY = {"hb": HBScheduler, "hb-dpm++": HBDPMSolverScheduler, "ghvb": GHVBScheduler}

__all__ = ["HBScheduler", "HBDPMSolverScheduler", "GHVBScheduler", "MomentumScheduler", "REGISTRY"]
