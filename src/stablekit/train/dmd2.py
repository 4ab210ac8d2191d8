"""DMD2: a one-step student by distribution matching, with the two time-scale update rule and a GAN term.

Paper: Yin, Gharbi, Park, Shechtman, Durand, Freeman, "Improved Distribution Matching Distillation for Fast Image
Synthesis" (NeurIPS 2024); reference code github.com/tianweiy/DMD2.

What is implemented:
1. **Generator.** A copy of the teacher's UNet called once, at the last training timestep, on pure noise; the clean
   latent its prediction implies is the sample (exactly the pipeline's one-step sample, so the student loads and
   samples with the teacher's scheduler).
2. **Distribution matching gradient.** The generated latent ``x0`` is noised to ``x_t`` (``t`` uniform in
   ``[0.02 T, 0.98 T]``); the *real* score is the frozen teacher under classifier-free guidance, the *fake* score a
   trainable copy of the teacher that tracks the generator's own distribution. The generator's gradient at ``x0``
   is ``(x0_fake - x0_real) / mean|x0 - x0_real|``: the fake minus the real score, rescaled per sample by DMD's
   weighting; it is applied through the paper's surrogate ``0.5 ||x0 - sg(x0 - grad)||^2``.
3. **Two time-scale update rule.** The fake score is updated `fake_updates` times (denoising loss on the
   generator's samples, detached) per generator update, so that it keeps up with the generator.
4. **GAN term.** A small classifier head on the fake-score UNet's bottleneck (mid-block) features tells noised
   real data (world renders encoded by the model's VAE, with their captions) from noised generator samples with
   the non-saturating logistic loss; it trains with the fake score, and the generator is trained to fool it.
5. **No regression loss**: no teacher (noise, image) pairs are drawn.

Paper defaults (its SDXL recipe): the fake score updated 5 times per generator update, real-score guidance 8
(SD v1.5: 1.75), GAN weights 5e-3 (generator) and 1e-2 (classifier), ``t`` in ``[0.02 T, 0.98 T]`` for the
distribution matching gradient and in ``[0, T)`` for the fake score, AdamW, gradient norm clipped at 10, the
generator and the fake score initialised from the teacher.

Deviations:
1. Size: a thousand world renders and their captions, hundreds of generator updates at batch 16 on a CPU, where
   the paper trains on millions of prompts and images for tens of thousands of updates.
2. Learning rate (`lr`, both networks) fits the embedded model's size (1e-5 and up, where the paper uses 5e-7 to
   1e-5), with clipping at 1.
3. The teacher predicts v, not noise; the fake score is trained on the teacher's own target (v), and every
   prediction is read as a clean latent before the gradient is formed.
4. Real-score guidance 7.5 (the teacher's own setting; plain guidance, no rescale).
5. One forward pass of the fake score serves twice: its classifier reads the bottleneck features of the same pass
   that gives the denoising loss (fake-score update) or the fake score of the DMD gradient (generator update),
   where the reference draws separate noise and timesteps for the GAN term.
6. Only the one-step generator; the paper's four-step generator with backward simulation is not implemented.
7. The generator may start from another model's UNet (``init``, e.g. a reflowed one-step student); the paper
   starts it from the teacher.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import require_counts
from ..latents import noise_scheduler, training_target
from .instaflow import check_teacher
from .lcm_distill import x0_and_eps
from .students import Pairs, Stages, elapsed_minutes, world_latents

PAPER = "Improved Distribution Matching Distillation for Fast Image Synthesis (NeurIPS 2024)"


@dataclass(frozen=True)
class Config:
    images: int = 1024
    iterations: int = 400
    fake_updates: int = 5
    batch: int = 16
    lr: float = 1e-5
    guidance: float = 7.5
    gan_generator_weight: float = 5e-3
    gan_critic_weight: float = 1e-2
    min_t: float = 0.02
    max_t: float = 0.98
    save_every: int = 25
    seed: int = 0

    def __post_init__(self):
        require_counts(self, ("images", "iterations", "fake_updates", "batch", "save_every"))
        if self.lr <= 0 or self.guidance < 0 or min(self.gan_generator_weight, self.gan_critic_weight) < 0:
            raise ValueError("lr must be > 0, guidance and the GAN weights >= 0")
        if not 0 <= self.min_t < self.max_t <= 1:
            raise ValueError(f"need 0 <= min_t < max_t <= 1, got {self.min_t}, {self.max_t}")


class Critic(torch.nn.Module):
    """The fake score: a trainable UNet, with a GAN classifier head on its bottleneck (mid-block) features."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        ch = unet.config.block_out_channels[-1]
        self.head = torch.nn.Sequential(
            torch.nn.Conv2d(ch, ch, 3, padding=1),
            torch.nn.GroupNorm(min(32, ch), ch),
            torch.nn.SiLU(),
            torch.nn.Conv2d(ch, 1, 1),
        )
        self.features = None
        unet.mid_block.register_forward_hook(self.keep)

    def keep(self, _module, _inputs, output) -> None:
        self.features = output

    def forward(self, x_t, t, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(the UNet's prediction, one real-vs-fake logit per sample)."""
        pred = self.unet(x_t, t, cond).sample
        return pred, self.head(self.features).mean(dim=(1, 2, 3))


def dmd_loss(x0: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """DMD's surrogate: its gradient at `x0` is ``(fake_x0 - real_x0) / mean|x0 - real_x0|`` (per sample) over the
    number of elements, the fake minus the real score up to a positive per-sample factor."""
    weight = (x0 - real_x0).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
    grad = torch.nan_to_num((fake_x0 - real_x0) / weight)
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


class DMD2:
    """The three networks (frozen teacher, generator, critic), their optimisers and one update of each."""

    def __init__(self, pipe, generator, config: Config):
        self.config = config
        self.sched = noise_scheduler(pipe)
        self.acp = self.sched.alphas_cumprod.float()
        self.kind = pipe.scheduler.config.prediction_type
        self.teacher = pipe.unet.requires_grad_(False)
        self.uncond = pipe.encode_prompt([""], "cpu", 1, False)[0].float()
        self.gen = generator.float().requires_grad_(True)
        torch.manual_seed(config.seed)
        self.critic = Critic(copy.deepcopy(pipe.unet).float().requires_grad_(True))
        self.opt_g = torch.optim.AdamW(self.gen.parameters(), lr=config.lr, weight_decay=0.0)
        self.opt_c = torch.optim.AdamW(self.critic.parameters(), lr=config.lr, weight_decay=0.0)

    def x0(self, pred, x_t, t) -> torch.Tensor:
        return x0_and_eps(pred, x_t, self.acp[t].view(-1, 1, 1, 1), self.kind)[0]

    def noised(self, x0, t, g) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(x0.shape, generator=g)
        a = self.acp[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, noise

    def generate(self, noise, cond) -> torch.Tensor:
        """The generator's one-step sample: the clean latent its prediction at the last timestep implies."""
        t = torch.full((len(noise),), len(self.acp) - 1)
        return self.x0(self.gen(noise, t, cond).sample, noise, t)

    @torch.no_grad()
    def real_x0(self, x_t, t, cond) -> torch.Tensor:
        """The frozen teacher's guided clean-latent estimate (the real score)."""
        b = len(x_t)
        both = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, self.uncond.expand(b, -1, -1)]))
        c, u = both.sample.chunk(2)
        return self.x0(u + self.config.guidance * (c - u), x_t, t)

    def critic_loss(self, noise, cond, real, real_cond, g) -> tuple[torch.Tensor, dict]:
        """The fake score's denoising loss on the generator's (detached) samples plus the classifier's GAN loss."""
        with torch.no_grad():
            x0 = self.generate(noise, cond)
        t = torch.randint(0, len(self.acp), (len(x0),), generator=g)
        x_t, eps = self.noised(x0, t, g)
        pred, fake_logit = self.critic(x_t, t, cond)
        denoise = F.mse_loss(pred, training_target(self.sched, x0, eps, t))
        t_real = torch.randint(0, len(self.acp), (len(real),), generator=g)
        _, real_logit = self.critic(self.noised(real, t_real, g)[0], t_real, real_cond)
        gan = F.softplus(fake_logit).mean() + F.softplus(-real_logit).mean()
        logs = {"fake_denoise": denoise.item(), "critic_gan": gan.item()}
        return denoise + self.config.gan_critic_weight * gan, logs

    def generator_loss(self, noise, cond, g) -> tuple[torch.Tensor, dict]:
        """The distribution matching loss plus the GAN term, through a frozen critic."""
        x0 = self.generate(noise, cond)
        n = len(self.acp)
        t = torch.randint(int(self.config.min_t * n), int(self.config.max_t * n), (len(x0),), generator=g)
        x_t, _ = self.noised(x0, t, g)
        real = self.real_x0(x_t.detach(), t, cond)
        self.critic.requires_grad_(False)
        pred, logit = self.critic(x_t, t, cond)
        self.critic.requires_grad_(True)
        dmd = dmd_loss(x0, real, self.x0(pred.detach(), x_t.detach(), t))
        gan = F.softplus(-logit).mean()
        return dmd + self.config.gan_generator_weight * gan, {"dmd": dmd.item(), "generator_gan": gan.item()}

    def update(self, net, opt, loss) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    def iteration(self, data: Pairs, g) -> dict:
        """`fake_updates` critic updates, then one generator update (each on fresh batches); their last losses."""
        c = self.config
        shape = data.latents.shape[1:]
        logs = {}
        for _ in range(c.fake_updates):
            _, cond, _ = data.batch(torch.randint(0, len(data), (c.batch,), generator=g))
            _, real_cond, real = data.batch(torch.randint(0, len(data), (c.batch,), generator=g))
            loss, logs_c = self.critic_loss(torch.randn(c.batch, *shape, generator=g), cond, real, real_cond, g)
            self.update(self.critic, self.opt_c, loss)
        _, cond, _ = data.batch(torch.randint(0, len(data), (c.batch,), generator=g))
        loss, logs = self.generator_loss(torch.randn(c.batch, *shape, generator=g), cond, g)
        self.update(self.gen, self.opt_g, loss)
        return logs | logs_c

    def state(self) -> dict:
        nets = {"gen": self.gen, "critic": self.critic, "opt_g": self.opt_g, "opt_c": self.opt_c}
        return {k: v.state_dict() for k, v in nets.items()}

    def load(self, state: dict) -> None:
        for key in ("gen", "critic", "opt_g", "opt_c"):
            getattr(self, key).load_state_dict(state[key])


def train(trainer: DMD2, data: Pairs, checkpoint: Path | None, minutes: float | None) -> tuple[int, list[dict]]:
    """Run generator iterations until the config's count or the time budget ends, keeping a checkpoint every
    `save_every` iterations (and at the end) from which a re-run resumes; (iterations done, per-iteration losses)."""
    c = trainer.config
    done = 0
    logs = []
    if checkpoint is not None and checkpoint.exists():
        kept = torch.load(checkpoint)
        trainer.load(kept)
        done, logs = kept["done"], kept["logs"]
    g = torch.Generator().manual_seed(c.seed + done)
    t0 = time.perf_counter()
    bar = tqdm(total=c.iterations, initial=done, desc="DMD2", unit="step")
    while done < c.iterations and (minutes is None or time.perf_counter() - t0 < 60 * minutes):
        logs.append(trainer.iteration(data, g))
        done += 1
        bar.update()
        if checkpoint is not None and (done % c.save_every == 0 or done == c.iterations):
            save_checkpoint(checkpoint, trainer.state() | {"done": done, "logs": logs})
    bar.close()
    if checkpoint is not None:
        save_checkpoint(checkpoint, trainer.state() | {"done": done, "logs": logs})
    return done, logs


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    torch.save(state, tmp)
    os.replace(tmp, path)


def distill(pipe, config: Config = Config(), *, init=None, workdir: Path | None = None, minutes: float | None = None):
    """Train a one-step student of `pipe` (whose UNet is left as it was), its generator starting from the UNet
    `init` (default: the teacher's): returns (student pipeline, recipe). With `workdir`, the world latents and a
    checkpoint are kept there and a re-run with the same config resumes; `minutes` bounds this run's training."""
    check_teacher(pipe, "DMD2")
    t0 = time.perf_counter()
    stage = Stages(workdir, config)
    data = stage.pairs("world", lambda: world_latents(pipe, config.images, config.seed))
    student = copy.deepcopy(pipe)
    if init is not None:
        student.unet = copy.deepcopy(init)
    trainer = DMD2(pipe, student.unet, config)
    checkpoint = None if workdir is None else Path(workdir) / "dmd2.pt"
    done, logs = train(trainer, data, checkpoint, minutes)
    student.unet.requires_grad_(False).eval()
    tail = logs[-50:]
    recipe = {
        "method": "dmd2",
        "paper": PAPER,
        "config": asdict(config),
        "iterations_done": done,
        "steps": 1,
        "guidance": 1.0,
        "losses": {k: sum(r[k] for r in tail) / len(tail) for k in tail[0]} if tail else {},
        "minutes_this_run": elapsed_minutes(t0),
    }
    return student, recipe


__all__ = ["Config", "Critic", "DMD2", "distill", "dmd_loss"]
