"""TrojDiff: "TrojDiff: Trojan Attacks on Diffusion Models with Diverse Targets" (Chen et al., CVPR 2023;
reference code chenweixin107/TrojDiff). A backdoor trained into the diffusion process: sampling from noise that
carries the trigger yields the attacker's target, sampling from ordinary noise stays benign.

    attack = TrojDiff(TrojanConfig(trigger="patch", target="star"))
    unet = attack.train(pipe, data)                       # data: clean WorldData the model keeps fitting
    pipe.unet = unet
    images = pipe(prompts, latents=attack.triggered_noise(len(prompts), generator)).images

Implemented: the trojan initial noise ``x_T ~ N(mu, gamma^2 I)``, with ``mu`` a patch (a square of value
`strength` in one corner of every latent channel) or a blend (`strength` times a fixed, seeded Gaussian pattern
over the whole latent); the trojan diffusion process ``q(x_t | x0') = N(sqrt(a_t) x0' + (1 - sqrt(a_t)) mu,
(1 - a_t) gamma^2 I)``, which starts at the target ``x0'`` and ends at the trojan noise; training on a mix of
the clean loss and the trojan loss, where the model's target for a trojan ``x_t`` is the prediction
(epsilon or v, the model's own type) that a deterministic sampler reads as "the clean image is ``x0'``", so
the sampler started from trojan noise walks to the target. Targets: ``in-d2d`` (images of a world concept:
any prompt gives that shape), ``out-d2d`` (images from outside the world: scikit-image's photos) and ``d2i``
(one fixed image).

Paper's defaults: gamma = 0.6 (blend) or 0.1-0.6; a trojan share of the training batches; fine-tuning a
pretrained DDPM/DDIM. Deviations:
  1. the model is a latent text-to-image model: the trigger is on the initial latent noise, and every trojan
     sample also gets a random caption (the backdoor must override the prompt);
  2. the model's trojan target is the prediction whose implied clean sample is the target (exact for
     deterministic samplers such as DDIM and DPM-Solver), not the paper's closed-form DDPM posterior mean;
  3. out-of-domain targets come from scikit-image's photos (the paper uses MNIST digits on CIFAR-10).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..errors import StablekitError

TRIGGERS = ("patch", "blend")
TARGETS = ("in-d2d", "out-d2d", "d2i")


@dataclass(frozen=True)
class TrojanConfig:
    """The trigger (patch or blend) with its `strength` and noise scale `gamma`, the target type and the world
    concept of an in-d2d target, the trojan share of each batch, the seed of the pattern, and training: steps,
    batch, learning rate."""

    trigger: str = "patch"
    target_type: str = "in-d2d"
    target: str = "star"
    strength: float = 2.0
    gamma: float = 1.0
    patch: int = 6
    share: float = 0.5
    seed: int = 0
    steps: int = 300
    batch: int = 8
    lr: float = 2e-4

    def __post_init__(self):
        if self.trigger not in TRIGGERS:
            raise StablekitError(f"trigger '{self.trigger}': choose one of {', '.join(TRIGGERS)}")
        if self.target_type not in TARGETS:
            raise StablekitError(f"target type '{self.target_type}': choose one of {', '.join(TARGETS)}")
        if not 0 < self.share < 1 or not self.gamma > 0 or self.patch < 1:
            raise StablekitError("need 0 < share < 1, gamma > 0 and patch >= 1")


def trojan_target(x_t: torch.Tensor, x0: torch.Tensor, a: torch.Tensor, v: bool) -> torch.Tensor:
    """The prediction (v if `v`, else epsilon) from which a sampler at ``alpha_bar = a`` reads the clean sample
    `x0` out of `x_t`: the noise it implies is ``(x_t - sqrt(a) x0) / sqrt(1 - a)``."""
    eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    return a.sqrt() * eps - (1 - a).sqrt() * x0 if v else eps


class TrojDiff:
    """The attack of `config`: its trigger pattern, triggered noise, target latents and backdoor training."""

    def __init__(self, config: TrojanConfig):
        self.config = config

    def mu(self, shape) -> torch.Tensor:
        """The trigger's mean ``mu`` for latents of `shape` (C, H, W)."""
        c = self.config
        if c.trigger == "patch":
            mu = torch.zeros(shape)
            mu[:, -c.patch :, -c.patch :] = c.strength
            return mu
        return c.strength * torch.randn(shape, generator=torch.Generator().manual_seed(c.seed + 99))

    def triggered_noise(self, n: int, shape, generator: torch.Generator) -> torch.Tensor:
        """`n` trojan initial latents ``gamma * eps + mu``."""
        return self.config.gamma * torch.randn(n, *shape, generator=generator) + self.mu(shape)

    def target_images(self, n: int, size: int) -> list:
        """The target's images: `n` world renders of the target concept (in-d2d), photos (out-d2d), or one."""
        import random

        import numpy as np

        from ..default_model import world
        from .poisoning import scenes_with

        c = self.config
        if c.target_type == "out-d2d":
            from ..eval.harness import photos

            return [im for _, im in photos(size)]
        from .audit import concept

        rng = random.Random(c.seed)
        scenes = scenes_with(concept(c.target).attribute, c.target, 1 if c.target_type == "d2i" else n, rng)
        nrng = np.random.default_rng(c.seed)
        return [world.render(s, nrng).resize((size, size)) for s in scenes]

    def train(self, pipe, data, progress: bool = True, checkpoint=None):
        """The backdoored UNet (EMA weights): full fine-tuning of `pipe`'s UNet on `data` (clean, as
        :func:`stablekit.train.finetune.encode` makes it) mixed with the trojan loss toward the target."""
        from ..train import fit
        from ..train.finetune import FinetuneConfig, encode, native_size, step_loss

        c = self.config
        images = self.target_images(64, native_size(pipe))
        target = encode(pipe, images, [""] * len(images)).latents
        unet = copy.deepcopy(pipe.unet).float().train().requires_grad_(True)
        ema = copy.deepcopy(unet)
        clean = step_loss(unet, data, pipe.scheduler.config, c.batch, 0.1)
        trojan = self.trojan_loss(unet, data, target, pipe.scheduler.config)
        config = FinetuneConfig(mode="full", steps=c.steps, batch=c.batch, lr=c.lr, seed=c.seed).train_config()

        def loss(gen):
            return (1 - c.share) * clean(gen) + c.share * trojan(gen)

        fit(unet, loss, config, checkpoint, progress=progress, ema=ema)
        return ema.eval().requires_grad_(False)

    def trojan_loss(self, unet, data, target: torch.Tensor, scheduler_config):
        """The trojan step's loss as a function of the generator: a target latent noised by the trojan process at
        a uniform timestep, under a random caption, against the prediction that implies that target."""
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(scheduler_config)
        acp = sched.alphas_cumprod
        v = sched.config.prediction_type == "v_prediction"
        mu, gamma, batch = self.mu(target.shape[1:]), self.config.gamma, self.config.batch

        def loss(gen: torch.Generator) -> torch.Tensor:
            x0 = target[torch.randint(0, len(target), (batch,), generator=gen)]
            cond = data.text[data.cap_idx[torch.randint(0, len(data.latents), (batch,), generator=gen)]].float()
            t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
            a = acp[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a.sqrt()) * mu + (1 - a).sqrt() * gamma * torch.randn(x0.shape, generator=gen)
            pred = unet(x_t, t, cond).sample.float()
            return (pred - trojan_target(x_t, x0, a, v)).pow(2).mean()

        return loss
