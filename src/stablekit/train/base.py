"""What a recipe is: the teacher's step with hooks a paper changes (the noise paired with each image, the
condition, the UNet's own extra modules, the loss), and :func:`train`, the shared loop run with one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..default_model import train as teacher
from .trainer import TrainConfig, WorldData, fit

RECIPES: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: file a recipe in :data:`RECIPES` under its ``name``."""
    RECIPES[cls.name] = cls
    return cls


class Recipe:
    """The plain recipe's hooks; a paper's recipe overrides some. ``Config`` holds its parameters (frozen, checked
    on construction); ``paper`` names the paper."""

    name = "plain"
    paper = "the teacher's recipe without noise assignment"

    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, **params):
        self.config = self.Config(**params)

    def prepare(self, unet) -> torch.nn.Module | None:
        """Install whatever the recipe adds to `unet` (hooks); return the recipe's trainable module, if any."""
        return None

    def noise(self, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(x0.shape, generator=gen)

    def condition(self, cond: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return cond

    def loss(self, unet, x0, noise, t, cond, sched, snr, gen: torch.Generator) -> torch.Tensor:
        """The batch's loss; `gen` is the run's generator, for a recipe's own draws (masks, a second timestep)."""
        return teacher.v_loss(unet, x0, noise, t, cond, sched, snr)

    def for_inference(self, unet) -> None:
        """Put what the recipe adds to a UNet (with its trained values) on `unet`, e.g. the EMA copy to sample."""

    def sampler(self, scheduler):
        """The scheduler that samples a model of this recipe, given the pipeline's (which fits the standard
        noise schedule)."""
        return scheduler

    def restore(self, pipe, folder: Path) -> None:
        """Put back on a loaded pipeline what this recipe's exported `folder` needs beyond its diffusers files."""
        pipe.scheduler = self.sampler(pipe.scheduler)

    def spec(self) -> dict:
        return {"recipe": self.name, "params": dataclasses.asdict(self.config), "paper": self.paper}


def batch_loss(recipe: Recipe, unet, data: WorldData, batch: int):
    """The loss of one random batch as a function of the generator: images and captions drawn, 10% of captions
    dropped for classifier-free guidance, then the recipe's condition, noise and loss at uniform timesteps."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**teacher.SCHEDULER_CONFIG)
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)

    def step_loss(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(data.latents), (batch,), generator=gen)
        x0 = data.latents[idx]
        cond = data.text[data.cap_idx[idx]].float()
        cond[torch.rand(batch, generator=gen) < 0.1] = data.uncond
        cond = recipe.condition(cond, gen)
        noise = recipe.noise(x0, gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        return recipe.loss(unet, x0, noise, t, cond, sched, snr, gen)

    return step_loss


def train(
    recipe: Recipe,
    data: WorldData,
    config: TrainConfig,
    checkpoint: Path | None = None,
    progress: bool = True,
    callback=None,
):
    """(unet, ema unet, recipe's module, fit's state): a fresh UNet of ``config.size`` initialised from
    ``config.seed``, trained with `recipe` on `data` by :func:`fit` (which calls `callback(step, ema)`)."""
    from .trainer import build_unet

    torch.manual_seed(config.seed)
    unet = build_unet(config.size)
    extra = recipe.prepare(unet)
    state = fit(unet, batch_loss(recipe, unet, data, config.batch), config, checkpoint, extra, progress, callback)
    ema = build_unet(config.size)
    ema.load_state_dict(state["ema"])
    return unet, ema.eval().requires_grad_(False), extra, state
