"""Latent consistency distillation into a LoRA: the LCM-LoRA that the ``lcm-lora`` plugin loads.

Papers: Luo, Tan, Huang, Li, Zhao, "Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step
Inference" (2023), and Luo et al., "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module" (2023); reference
code github.com/luosiallen/latent-consistency-model and diffusers' ``train_lcm_distill_lora_sd_wds.py``.

What is implemented (latent consistency distillation, LoRA variant): a LoRA on the UNet's attention and
feed-forward projections is trained so that the consistency function
``f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t)`` gives the same answer at ``t_{n+k}`` and at ``t_n``,
where ``x_{t_n}`` comes from ``x_{t_{n+k}}`` by one DDIM step of the frozen teacher (the same UNet with the LoRA
disabled) under classifier-free guidance ``w`` drawn uniformly from [w_min, w_max]; the target is the student
itself without gradient (no EMA, as in the LoRA script); the loss is the pseudo-Huber distance.

Paper defaults kept: a skipping-step solver on a 50-step DDIM grid (k = 20 training timesteps), guidance range
[3, 15] (w_embedding is not used by the LoRA variant), ``sigma_data`` 0.5 and timestep scaling 10 in the boundary
conditions (what diffusers' ``LCMScheduler`` samples with), pseudo-Huber c = 0.001, LoRA rank 64 on the attention
and feed-forward projections.

Deviations:
1. Data: world renders with their captions (training side, seed 0) encoded by the model's VAE, in place of
   LAION; a few thousand images, not millions.
2. Iterations and learning rate fit the embedded model's size (thousands of steps at 1e-4, not 4,000 steps at
   1e-6 with batch 12 x 8 GPUs); rank 16 by default, since the UNet's widest projections have 128 channels.
3. The teacher's predictions are converted from v-prediction (the embedded model's) as well as epsilon.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..errors import StablekitError, require_counts
from .students import add_lora, elapsed_minutes, fit, teacher_halves, world_latents


@dataclass(frozen=True)
class Config:
    images: int = 4096
    iterations: int = 2000
    batch: int = 32
    lr: float = 1e-4
    rank: int = 16
    w_min: float = 3.0
    w_max: float = 15.0
    ddim_steps: int = 50
    huber_c: float = 0.001
    seed: int = 0

    def __post_init__(self):
        require_counts(self, ("images", "iterations", "batch", "rank", "ddim_steps"))
        if not 0 <= self.w_min <= self.w_max or self.lr <= 0:
            raise ValueError("need 0 <= w_min <= w_max and lr > 0")


def boundary(t: torch.Tensor, sigma_data: float = 0.5, scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency function at timesteps `t`, as ``LCMScheduler`` computes them."""
    s = t.float() * scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def x0_and_eps(pred: torch.Tensor, x: torch.Tensor, a: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latent and the noise a prediction of type `kind` implies at ``x = sqrt(a) x0 + sqrt(1-a) eps``."""
    if kind == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * pred, a.sqrt() * pred + (1 - a).sqrt() * x
    if kind == "epsilon":
        return (x - (1 - a).sqrt() * pred) / a.sqrt(), pred
    raise StablekitError(f"latent consistency distillation supports epsilon and v-prediction models, not {kind}")


def lcd_loss(pipe, config: Config):
    """The latent consistency distillation loss of one batch (LoRA on: student; LoRA off: teacher)."""
    sched = pipe.scheduler
    kind = sched.config.prediction_type
    acp = sched.alphas_cumprod.float()
    k = sched.config.num_train_timesteps // config.ddim_steps
    uncond = pipe.encode_prompt([""], "cpu", 1, False)[0].float()

    def f(unet, x, t, cond):
        c_skip, c_out = boundary(t)
        x0, _ = x0_and_eps(unet(x, t, cond).sample, x, acp[t].view(-1, 1, 1, 1), kind)
        return c_skip * x + c_out * x0

    def loss(unet, _noise, cond, x0, g):
        b = len(x0)
        t = (torch.randint(1, config.ddim_steps + 1, (b,), generator=g) * k - 1).clamp(max=len(acp) - 1)
        s = (t - k).clamp(min=0)
        a_t, a_s = acp[t].view(-1, 1, 1, 1), acp[s].view(-1, 1, 1, 1)
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * torch.randn(x0.shape, generator=g)
        w = (config.w_min + (config.w_max - config.w_min) * torch.rand(b, generator=g)).view(-1, 1, 1, 1)
        pred = f(unet, x_t, t, cond)
        with torch.no_grad():
            c, u = teacher_halves(unet, x_t, t, cond, uncond)
            x0_hat, eps_hat = x0_and_eps(u + w * (c - u), x_t, a_t, kind)
            x_s = a_s.sqrt() * x0_hat + (1 - a_s).sqrt() * eps_hat  # one DDIM step of the guided teacher
            target = f(unet, x_s, s, cond)
        return (torch.sqrt((pred.float() - target.float()).pow(2) + config.huber_c**2) - config.huber_c).mean()

    return loss


def distill(pipe, config: Config = Config()) -> tuple[dict, dict]:
    """Train an LCM-LoRA for `pipe` (its UNet is left without adapters): (the LoRA state dict, recipe)."""
    from peft.utils import get_peft_model_state_dict

    t0 = time.perf_counter()
    data = world_latents(pipe, config.images, config.seed)
    add_lora(pipe.unet, config.rank)
    loss = lcd_loss(pipe, config)
    probe = data.batch(torch.arange(min(len(data), 64)))

    def probe_loss() -> float:  # the loss of one fixed batch, noise and timesteps
        with torch.no_grad():
            return loss(pipe.unet, *probe, torch.Generator().manual_seed(config.seed + 1)).item()

    try:
        before = probe_loss()
        fit(
            pipe.unet,
            loss,
            data,
            iterations=config.iterations,
            batch=config.batch,
            lr=config.lr,
            seed=config.seed,
            desc="consistency distillation",
        )
        after = probe_loss()
        lora = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pipe.unet).items()}
    finally:
        pipe.unet.delete_adapters(pipe.unet.active_adapters())
    recipe = {
        "method": "lcm-lora",
        "paper": "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module (2023)",
        "config": config.__dict__,
        "probe_loss_before": before,
        "probe_loss_after": after,
        "minutes": elapsed_minutes(t0),
    }
    return lora, recipe


def save(pipe, lora: dict, path, recipe: dict) -> None:
    """The LoRA as a diffusers LoRA ``.safetensors`` that ``pipe.load_lora_weights`` (and ``lcm-lora``) read."""
    import json

    from safetensors.torch import save_file

    from ..output import write_atomically

    tensors = {f"unet.{k}": v.contiguous() for k, v in lora.items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"recipe": json.dumps(recipe)}))
