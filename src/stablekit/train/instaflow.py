"""InstaFlow: a one-step student by reflow, then distillation.

Paper: Liu, Zhang, Ma, Peng, Liu, "InstaFlow: One Step is Enough for High-Quality Diffusion-Based Text-to-Image
Generation", ICLR 2024 (reference code: github.com/gnobitab/InstaFlow, building on "Flow Straight and Fast",
Liu, Gong, Liu, ICLR 2023, github.com/gnobitab/RectifiedFlow).

What is implemented:
1. **Reflow.** The teacher draws ``x0`` from noise ``z`` with its deterministic sampler, guidance included;
   a copy of the teacher is trained on these couplings ``(z, x0)``: the path between them is straight, so the
   reflowed model's sampling trajectories straighten and few steps suffice.
2. **Distillation.** The reflowed model draws new pairs in a few steps; a one-step student (initialised from
   it) regresses ``x0`` from ``z`` in a single call at the last timestep, without guidance.

Paper defaults and our deviations:
1. The paper reflows Stable Diffusion into a velocity field on the straight interpolation
   ``x_s = (1 - s) x0 + s z``. We keep the teacher's variance-preserving v-prediction parametrisation, in which
   ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) z`` is the same straight segment rescaled by
   ``sqrt(a_t) + sqrt(1 - a_t)``; training on the coupled ``z`` (not fresh noise) is what makes it a reflow. The
   student therefore loads and samples with the teacher's scheduler, and every plugin works on it unchanged.
2. The paper's pairs come from SD 1.5 with DPM-Solver at guidance 6 (2-RF) and the 2-RF's own 25-step Euler
   samples (distillation); here the teacher's DPM-Solver++ at `teacher_steps` (12) and guidance 7.5, and the
   reflowed model's `reflow_steps` (8) samples.
3. The paper's distillation loss is LPIPS on decoded images; LPIPS needs a pretrained VGG that is not available
   offline here, so we regress the latent ``x0`` with a mean squared error.
4. Guidance is distilled into the student in both stages (conditional embeddings only, no caption dropout):
   the student is called with guidance 1, one UNet call per image.
5. Budgets are the embedded model's: thousands of pairs and iterations, not the paper's millions.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import StablekitError, require_counts
from ..pipeline import guidance_rescale
from .students import Pairs, Stages, elapsed_minutes, fit, sample_pairs, world_prompts


@dataclass(frozen=True)
class Config:
    pairs: int = 4096
    teacher_steps: int = 12
    guidance: float = 7.5
    reflow_iterations: int = 2000
    reflow_steps: int = 8
    distill_iterations: int = 2000
    batch: int = 32
    lr: float = 2e-5
    seed: int = 0

    def __post_init__(self):
        if self.distill_iterations < 0:
            raise ValueError(f"distill_iterations must be >= 0 (0: stop after reflow), got {self.distill_iterations}")
        require_counts(self, ("pairs", "teacher_steps", "reflow_iterations", "reflow_steps", "batch"))
        if self.lr <= 0 or self.guidance < 0:
            raise ValueError("lr must be > 0 and guidance >= 0")


def _alphas(unet, scheduler) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(unet.device, torch.float32)


def reflow_loss(scheduler):
    """The v-prediction loss on the coupled pair at a uniform timestep: ``x_t`` lies on the segment z -- x0."""
    acp = None

    def loss(unet, z, cond, x0, g):
        nonlocal acp
        acp = _alphas(unet, scheduler) if acp is None else acp
        t = torch.randint(0, len(acp), (len(z),), generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * z
        v = a.sqrt() * z - (1 - a).sqrt() * x0
        return (unet(x_t, t, cond).sample - v).pow(2).mean()

    return loss


def one_step_loss(scheduler):
    """The error of the single-step sample: from ``z`` at the last timestep, the x0 the v-prediction implies."""
    last = scheduler.config.num_train_timesteps - 1

    def loss(unet, z, cond, x0, g):
        a = _alphas(unet, scheduler)[last]
        t = torch.full((len(z),), last)
        v = unet(z, t, cond).sample
        return (a.sqrt() * z - (1 - a).sqrt() * v - x0).pow(2).mean()

    return loss


def check_teacher(pipe) -> None:
    """The student samples in one step from the last timestep: the teacher must predict v on trailing timesteps."""
    config = pipe.scheduler.config
    if config.get("prediction_type") != "v_prediction" or config.get("timestep_spacing") != "trailing":
        raise StablekitError(
            "InstaFlow's one-step student needs a v-prediction model sampled on trailing timesteps (like the "
            f"embedded default); this scheduler predicts {config.get('prediction_type')} on "
            f"{config.get('timestep_spacing')} timesteps"
        )


def distill(pipe, config: Config = Config(), prompts: list[str] | None = None, workdir: Path | None = None):
    """Train a one-step student of `pipe` (whose UNet is left as it was): returns (student pipeline, recipe).
    With `workdir`, each finished stage (pairs, reflow, pairs of the reflowed model, student) is kept there and a
    re-run resumes after the last one."""
    check_teacher(pipe)
    t0 = time.perf_counter()
    prompts = prompts or world_prompts(config.pairs, config.seed)
    stage = Stages(workdir, config)
    rescale = guidance_rescale(pipe)
    pairs = stage.pairs(
        "teacher_pairs",
        lambda: sample_pairs(
            pipe,
            prompts,
            steps=config.teacher_steps,
            guidance=config.guidance,
            seed=config.seed,
            guidance_rescale=rescale,
        ),
    )
    student = copy.deepcopy(pipe)
    student.unet.float()
    common = dict(batch=config.batch, lr=config.lr, seed=config.seed)
    stage.train(
        "reflow",
        student.unet,
        lambda: fit(
            student.unet,
            reflow_loss(pipe.scheduler),
            pairs,
            iterations=config.reflow_iterations,
            desc="reflow",
            **common,
        ),
    )
    if config.distill_iterations:  # 0: the reflowed model itself is the student
        pairs2 = stage.pairs(
            "reflow_pairs",
            lambda: sample_pairs(student, prompts, steps=config.reflow_steps, guidance=1.0, seed=config.seed + 1),
        )
        stage.train(
            "distill",
            student.unet,
            lambda: fit(
                student.unet,
                one_step_loss(pipe.scheduler),
                pairs2,
                iterations=config.distill_iterations,
                desc="distill",
                **common,
            ),
        )
    return student, _recipe(config, rescale, stage.losses, t0)


def _recipe(config: Config, rescale: float, losses: dict, t0: float) -> dict:
    return {
        "method": "instaflow",
        "paper": "InstaFlow: One Step is Enough for High-Quality Diffusion-Based Text-to-Image Generation (ICLR 2024)",
        "config": config.__dict__,
        "steps": 1,
        "guidance": 1.0,
        "teacher_guidance_rescale": rescale,
        "losses": losses,
        "minutes_this_run": elapsed_minutes(t0),
    }


__all__ = ["Config", "Pairs", "distill", "reflow_loss", "one_step_loss"]
