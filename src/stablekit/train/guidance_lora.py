"""Classifier-free guidance distilled into a LoRA: the guided prediction in one UNet call instead of two.

Paper: Golnari, "LoRA-Enhanced Distillation on Guided Diffusion Models" (2023), which distils guidance (after Meng
et al., "On Distillation of Guided Diffusion Models", CVPR 2023) into low-rank adapters of the teacher instead of a
full student copy: training holds one UNet and the adapters' optimizer state, not two UNets and a full one.

What is implemented: a LoRA on the UNet's attention and feed-forward projections is trained so that the adapted
UNet's conditional prediction equals the frozen teacher's guided prediction ``u + w (c - u)`` at the same noisy
latent, timestep and prompt (the teacher is the same UNet with the adapters disabled); the LoRA is then fused, and
the student folder samples with guidance 1 at the teacher's steps. The recipe records the optimizer state the
LoRA needed against a full fine-tune's (AdamW keeps two moments per trainable parameter): the paper's memory
saving, counted exactly.

Deviations:
1. Data: world renders and captions (training side) encoded by the model's VAE, and uniform timesteps; the paper
   trains on LAION-style prompts.
2. One guidance scale (7.5, the embedded model's default) is distilled, not a guidance-conditioned student.
3. Budgets fit the embedded model (hundreds to thousands of iterations, rank 16).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from ..errors import require_counts
from .students import add_lora, elapsed_minutes, fit, teacher_halves, world_latents


@dataclass(frozen=True)
class Config:
    images: int = 2048
    iterations: int = 1000
    batch: int = 32
    lr: float = 1e-4
    rank: int = 16
    guidance: float = 7.5
    seed: int = 0

    def __post_init__(self):
        require_counts(self, ("images", "iterations", "batch", "rank"))
        if self.lr <= 0 or self.guidance < 1:
            raise ValueError("need lr > 0 and guidance >= 1")


def guidance_loss(pipe, config: Config):
    """The squared error between the adapted UNet's conditional prediction and the teacher's guided one."""
    acp = pipe.scheduler.alphas_cumprod.float()
    uncond = pipe.encode_prompt([""], "cpu", 1, False)[0].float()

    def loss(unet, _noise, cond, x0, g):
        b = len(x0)
        t = torch.randint(0, len(acp), (b,), generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)
        c, u = teacher_halves(unet, x_t, t, cond, uncond)
        return (unet(x_t, t, cond).sample - (u + config.guidance * (c - u))).pow(2).mean()

    return loss


def optimizer_state_bytes(unet) -> dict:
    """AdamW's two moments for the trainable parameters (the LoRA) and for the whole UNet, in bytes."""
    lora = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    full = sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)
    return {"lora": 2 * 4 * lora, "full_finetune": 2 * 4 * full}


def distill(pipe, config: Config = Config()):
    """A student of `pipe` with the guidance LoRA fused into a copy of its UNet: (student pipeline, recipe)."""
    t0 = time.perf_counter()
    data = world_latents(pipe, config.images, config.seed)
    student = copy.deepcopy(pipe)
    student.unet.float()
    add_lora(student.unet, config.rank)
    memory = optimizer_state_bytes(student.unet)
    loss = guidance_loss(student, config)
    losses = fit(
        student.unet,
        loss,
        data,
        iterations=config.iterations,
        batch=config.batch,
        lr=config.lr,
        seed=config.seed,
        desc="guidance distillation",
    )
    student.unet.fuse_lora()
    student.unet.unload_lora()
    student.unet.requires_grad_(False)
    recipe = {
        "method": "lora-cfg",
        "paper": "LoRA-Enhanced Distillation on Guided Diffusion Models (2023)",
        "config": config.__dict__,
        "steps": 25,
        "guidance": 1.0,
        "distilled_guidance": config.guidance,
        "optimizer_state_bytes": memory,
        "loss_last": sum(losses[-50:]) / len(losses[-50:]),
        "minutes": elapsed_minutes(t0),
    }
    return student, recipe
