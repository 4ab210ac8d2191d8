"""The shared training loop of the recipes: the teacher's step (v-prediction, Min-SNR-5, 10% caption dropout,
AdamW with warm-up and cosine decay, gradient clipping at 1, EMA) on the embedded world, with a recipe's hooks
in place of its fixed choices, seeded and resumable step for step.

:func:`fit` is the loop itself (any loss of a step, any modules): a checkpoint after every ``save_every`` steps
and at the end holds the weights, the optimizer, the random generator and the loss curve, written atomically,
so a run stopped anywhere and started again makes the same weights as one that never stopped.
:func:`train` is :func:`fit` with a recipe's loss on :class:`WorldData`.

Deviations from the teacher's recipe (``stablekit.default_model.train``):
  1. the learning rate decays over a number of steps, not over a time budget, so a resumed run repeats the
     uninterrupted one exactly; with a time budget alone it stays constant after the warm-up;
  2. the latents come from the shipped VAE (a recipe trains the UNet only), and the world is rendered without
     the memorization set;
  3. all randomness (batches, noise, timesteps, caption dropout, a recipe's own draws) comes from one seeded
     generator that the checkpoint saves.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..default_model import train as teacher
from ..errors import StablekitError, require_counts

UNET_SIZES = {  # block_out_channels, norm groups; "default" is the shipped model's UNet
    "default": ((32, 64, 128), 32),
    "small": ((32, 32, 64), 16),
    "tiny": ((16, 16, 32), 8),
}


@dataclass(frozen=True)
class TrainConfig:
    """How long and how: a budget of `steps` optimizer steps and/or `minutes` (whichever ends first), the batch,
    the teacher's learning rate with `warmup` steps, the seeds (`seed`: the UNet's initialisation and every draw
    of training; `data_seed`: the rendered world), the world's size and the UNet's size."""

    steps: int | None = 1000
    minutes: float | None = None
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 100
    seed: int = 0
    data_seed: int = 0
    captions: int = 1000
    variants: int = 2
    size: Literal["default", "small", "tiny"] = "default"
    save_every: int = 100

    def __post_init__(self):
        if self.steps is None and self.minutes is None:
            raise StablekitError("give a budget: steps, minutes or both")
        if self.steps is not None and self.steps < 1:
            raise StablekitError(f"steps={self.steps}: the budget must be at least 1 step")
        if self.minutes is not None and not self.minutes > 0:
            raise StablekitError(f"minutes={self.minutes}: the budget must be more than 0 minutes")
        require_counts(self, ("batch", "captions", "variants", "save_every"))
        if not self.lr > 0 or self.warmup < 0:
            raise StablekitError(f"lr={self.lr}, warmup={self.warmup}: need lr > 0 and warmup >= 0")
        if self.size not in UNET_SIZES:
            raise StablekitError(f"size '{self.size}': choose one of {', '.join(UNET_SIZES)}")


def build_unet(size: str = "default"):
    """The teacher's UNet (same blocks, text width and attention) at one of :data:`UNET_SIZES`."""
    if size == "default":
        return teacher.build_unet()
    channels, groups = UNET_SIZES[size]
    unet = teacher.build_unet()
    return type(unet)(**dict(unet.config, block_out_channels=channels, norm_num_groups=groups))


@dataclass
class WorldData:
    """Encoded training data: latents (already multiplied by `scaling_factor`), each latent's caption index, the
    captions' token embeddings (half precision) and the empty caption's embedding."""

    latents: torch.Tensor
    cap_idx: torch.Tensor
    text: torch.Tensor
    uncond: torch.Tensor
    scaling_factor: float
    captions: list[str] = field(default_factory=list)

    @classmethod
    def render(cls, captions: int, variants: int, seed: int) -> WorldData:
        """`captions` world captions with `variants` images each, drawn from `seed`, through the shipped VAE and
        MiniLM."""
        from diffusers import AutoencoderKL

        from ..default_model import WEIGHTS_DIR

        images, cap_idx, texts = teacher.render_data(captions, variants, memo_copies=0, seed=seed, workers=1)
        vae = AutoencoderKL.from_pretrained(WEIGHTS_DIR / "vae").eval()
        scale = float(vae.config.scaling_factor)
        text = teacher.encode_text(texts[:captions] + [""])
        latents = teacher.encode_latents(vae, images) * scale
        return cls(latents, cap_idx, text[:-1], text[-1].float(), scale, texts[:captions])

    def save(self, path: Path) -> None:
        atomic_save(asdict(self), path)

    @classmethod
    def load(cls, path: Path) -> WorldData:
        return cls(**torch.load(path))


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: `path` is never half written."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (from 0): linear warm-up, then cosine to 10% over `config.steps`."""
    warm = min(1.0, (step + 1) / config.warmup) if config.warmup else 1.0
    if config.steps is None:
        return config.lr * warm
    return config.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / config.steps)))


def fit(
    unet: torch.nn.Module,
    step_loss: Callable[[torch.Generator], torch.Tensor],
    config: TrainConfig,
    checkpoint: Path | None = None,
    extra: torch.nn.Module | None = None,
    progress: bool = True,
    callback: Callable[[int, torch.nn.Module], None] | None = None,
    ema: torch.nn.Module | None = None,
) -> dict:
    """Train `unet` (and `extra`'s parameters, e.g. a recipe's own) on `step_loss(generator)` for `config`'s budget;
    resume from `checkpoint` if it exists; `callback(step, ema)` after every step. Returns the final state: unet,
    ema (state dicts), step, losses, elapsed seconds. The EMA weights are the teacher's, kept in `ema` (a module
    of `unet`'s architecture; default a fresh UNet of ``config.size``); the generator is seeded from
    ``config.seed``. Only parameters that require a gradient are trained."""
    from tqdm import tqdm

    ema = (build_unet(config.size) if ema is None else ema).requires_grad_(False)
    params = [p for p in unet.parameters() if p.requires_grad]
    params += list(extra.parameters()) if extra is not None else []
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed + 1)
    state = dict(step=0, losses=[], elapsed=0.0)
    ema.load_state_dict(unet.state_dict())
    if checkpoint is not None and checkpoint.exists():
        state = _restore(checkpoint, unet, ema, opt, gen, extra)
    t0 = time.time() - state["elapsed"]
    bar = tqdm(total=config.steps, initial=state["step"], desc="train", disable=not progress, mininterval=2)
    while _within(state, config, t0):
        for g in opt.param_groups:
            g["lr"] = lr_at(state["step"], config)
        loss = step_loss(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["step"] += 1
        teacher.ema_update(ema, unet, state["step"])
        state["losses"].append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if callback is not None:
            callback(state["step"], ema)
        if checkpoint is not None and state["step"] % config.save_every == 0:
            _checkpoint(checkpoint, state, t0, unet, ema, opt, gen, extra)
    bar.close()
    if checkpoint is not None:
        _checkpoint(checkpoint, state, t0, unet, ema, opt, gen, extra)
    return dict(state, elapsed=time.time() - t0, unet=unet.state_dict(), ema=ema.state_dict())


def _within(state: dict, config: TrainConfig, t0: float) -> bool:
    if config.steps is not None and state["step"] >= config.steps:
        return False
    return config.minutes is None or time.time() - t0 < config.minutes * 60


def _checkpoint(path: Path, state: dict, t0: float, unet, ema, opt, gen, extra) -> None:
    state["elapsed"] = time.time() - t0
    atomic_save(
        dict(
            state,
            unet=unet.state_dict(),
            ema=ema.state_dict(),
            opt=opt.state_dict(),
            generator=gen.get_state(),
            extra=extra.state_dict() if extra is not None else None,
        ),
        path,
    )


def _restore(path: Path, unet, ema, opt, gen, extra) -> dict:
    c = torch.load(path, weights_only=False)
    unet.load_state_dict(c["unet"])
    ema.load_state_dict(c["ema"])
    opt.load_state_dict(c["opt"])
    gen.set_state(c["generator"])
    if extra is not None:
        extra.load_state_dict(c["extra"])
    return dict(step=c["step"], losses=list(c["losses"]), elapsed=c["elapsed"])
