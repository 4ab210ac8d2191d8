"""The one calibration path: the full-precision model's own denoising trajectories, the UNet inputs a method
keeps from them (its timestep rule), and the activation statistics of every layer to be quantized.

1. :func:`trajectories` runs the pipeline on calibration prompts and records every UNet call's inputs
   (latents, timestep, text embeddings; guided batches whole), with a progress bar.
2. A method picks calls by timestep: :func:`spread` (evenly over the whole trajectory, Q-Diffusion) or
   :func:`normal_timesteps` (timesteps drawn from a normal distribution, PTQ4DM).
3. :func:`collect` runs the full-precision UNet on the kept calls and gathers, per layer, each input's
   range (global, per timestep bucket, per channel half where the layer has a split), per-channel magnitudes
   (for SVDQuant's smoothing), the output range (for the int8 kernels) and a sample of input values (for
   range searches).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import StablekitError
from ..plugins import settle, unet_kwargs
from .core import TIME_BUCKETS, TimeContext


@dataclass(frozen=True)
class CalibrationConfig:
    """`prompts` calibration prompts, sampled with `steps` steps at `guidance`, from `seed`; `samples` UNet calls
    kept (each a whole guided batch); `size`: image side in pixels (None: the model's native size)."""

    prompts: int = 16
    steps: int = 25
    samples: int = 64
    guidance: float = 7.5
    seed: int = 1234
    size: int | None = None
    batch: int = 8

    def __post_init__(self):
        for name in ("prompts", "steps", "samples", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise StablekitError(f"calibration {name} must be a whole number >= 1, got {v!r}")
        if self.size is not None and (self.size < 8 or self.size % 8):
            raise StablekitError(f"calibration size must be a multiple of 8, got {self.size}")
        settle(self, guidance=float(self.guidance))


@dataclass
class Call:
    """One recorded UNet call: its inputs by name, the timestep and the step index."""

    kwargs: dict
    timestep: float
    step: int


@dataclass
class Trajectories:
    calls: list[Call] = field(default_factory=list)
    train_steps: int = 1000


def calibration_prompts(n: int, seed: int) -> list[str]:
    """`n` captions of the synthetic world (short scene descriptions, usable with any text-to-image model)."""
    from ..default_model import world

    rng = random.Random(seed)
    return [world.caption(world.sample_scene(rng), rng) for _ in range(n)]


def trajectories(pipe, cfg: CalibrationConfig) -> Trajectories:
    """Every UNet call of the full-precision pipeline on the calibration prompts."""
    if getattr(pipe, "unet", None) is None:
        raise StablekitError("this pipeline has no UNet to quantize")
    prompts = calibration_prompts(cfg.prompts, cfg.seed)
    out = Trajectories(train_steps=int(pipe.scheduler.config.num_train_timesteps))
    step = [0]

    def record(module, args, kwargs):
        kw = unet_kwargs(module, args, kwargs)
        t = kw["timestep"]
        kw = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items() if v is not None}
        out.calls.append(Call(kw, float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t), step[0]))
        step[0] += 1

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    bars = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)  # one bar over the prompts instead of one per batch
    size = {} if cfg.size is None else {"height": cfg.size, "width": cfg.size}
    bar = tqdm(total=len(prompts), desc="calibration trajectories", unit="prompt")
    try:
        for i in range(0, len(prompts), cfg.batch):
            chunk = prompts[i : i + cfg.batch]
            step[0] = 0
            gens = [torch.Generator("cpu").manual_seed(cfg.seed * 1000 + i + k) for k in range(len(chunk))]
            with torch.no_grad():  # not inference mode: the recorded inputs feed optimisation later
                pipe(chunk, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, generator=gens,
                     output_type="latent", **size)  # fmt: skip
            bar.update(len(chunk))
    finally:
        handle.remove()
        bar.close()
        pipe._progress_bar_config = bars
    return out


def spread(traj: Trajectories, n: int, seed: int = 0) -> list[Call]:
    """`n` calls at timesteps spread evenly over the whole trajectory (Q-Diffusion's rule)."""
    steps = sorted({c.step for c in traj.calls})
    picks = np.linspace(0, len(steps) - 1, min(n, len(steps))).round().astype(int)
    return _take(traj, [steps[i] for i in picks], n, seed)


def normal_timesteps(traj: Trajectories, n: int, mean: float, std: float, seed: int = 0) -> list[Call]:
    """`n` calls whose timesteps are drawn from N(mean * T, (std * T)^2), each draw taken to the nearest
    recorded timestep (PTQ4DM's rule)."""
    rng = np.random.default_rng(seed)
    by_t = {}
    for c in traj.calls:
        by_t.setdefault(round(c.timestep), c.step)
    ts = np.array(sorted(by_t))
    draws = np.clip(rng.normal(mean * traj.train_steps, std * traj.train_steps, n), 0, traj.train_steps - 1)
    steps = [by_t[int(ts[np.abs(ts - d).argmin()])] for d in draws]
    return _take(traj, steps, n, seed)


def _take(traj: Trajectories, steps: list[int], n: int, seed: int) -> list[Call]:
    """`n` calls, cycling through `steps`, each from a random recorded batch at that step."""
    rng = random.Random(seed)
    at = {}
    for c in traj.calls:
        at.setdefault(c.step, []).append(c)
    return [rng.choice(at[steps[i % len(steps)]]) for i in range(n)]


# ---------------------------------------------------------------- per-layer statistics


class LayerStats:
    """What :func:`collect` learns about one layer's input (split into `parts` channel halves) and output."""

    SAMPLE = 4096  # input values kept per forward, per part

    def __init__(self, split: int = 0):
        self.split, self.parts = split, 2 if split else 1
        self.lo = torch.full((1 + TIME_BUCKETS, self.parts), float("inf"))
        self.hi = torch.full((1 + TIME_BUCKETS, self.parts), float("-inf"))
        self.chan_absmax = None
        self.out_lo, self.out_hi = float("inf"), float("-inf")
        self.values: dict[int, list[torch.Tensor]] = {}  # bucket -> (parts, k) samples

    def add_input(self, x: torch.Tensor, dim: int, bucket: int, gen: torch.Generator) -> None:
        x = x.detach().float()
        chans = x.movedim(dim, 0).flatten(1)  # (C, tokens)
        amax = chans.abs().amax(1)
        self.chan_absmax = amax if self.chan_absmax is None else torch.maximum(self.chan_absmax, amax)
        parts = chans.split([self.split, len(chans) - self.split]) if self.split else [chans]
        lo = torch.stack([p.amin() for p in parts])
        hi = torch.stack([p.amax() for p in parts])
        for row in (0, bucket):
            self.lo[row] = torch.minimum(self.lo[row], lo)
            self.hi[row] = torch.maximum(self.hi[row], hi)
        kept = []
        for p in parts:
            flat = p.flatten()
            kept.append(flat[torch.randint(0, len(flat), (self.SAMPLE,), generator=gen)])
        self.values.setdefault(bucket, []).append(torch.stack(kept))

    def add_output(self, y: torch.Tensor) -> None:
        self.out_lo = min(self.out_lo, float(y.min()))
        self.out_hi = max(self.out_hi, float(y.max()))

    def sample(self, bucket: int | None = None) -> torch.Tensor:
        """(parts, k) kept input values: of one timestep bucket, or of all."""
        rows = self.values.get(bucket, []) if bucket else [v for vs in self.values.values() for v in vs]
        return torch.cat(rows, 1) if rows else torch.empty(self.parts, 0)


def collect(unet, layers: dict[str, torch.nn.Module], calls: list[Call], splits: dict[str, int], train_steps: int):
    """{layer name: LayerStats} from running the full-precision `unet` on `calls`."""
    if not calls:
        raise StablekitError("the calibration set is empty: ask for at least one sample")
    stats = {n: LayerStats(splits.get(n, 0)) for n in layers}
    ctx, gen, handles = TimeContext(train_steps), torch.Generator().manual_seed(0), []
    for name, layer in layers.items():
        dim = -1 if isinstance(layer, torch.nn.Linear) else 1

        def pre(module, args, s=stats[name], d=dim):
            s.add_input(args[0], d, ctx.bucket, gen)

        def post(module, args, out, s=stats[name]):
            s.add_output(out)

        handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    try:
        with torch.inference_mode():
            for call in tqdm(calls, desc="calibration statistics", unit="call"):
                ctx.set(call.timestep)
                unet(**call.kwargs)
    finally:
        for h in handles:
            h.remove()
    return stats


def capture(unet, modules: dict[str, torch.nn.Module], calls: list[Call]) -> dict[str, list[tuple]]:
    """{name: [(args, kwargs, output), ...]}: each module's inputs and output in every call of `calls`
    (the full-precision UNet's, for reconstruction)."""
    seen, handles = {n: [] for n in modules}, []

    def detached(v):
        if isinstance(v, torch.Tensor):
            return v.detach().clone()
        if isinstance(v, (tuple, list)):
            return type(v)(detached(x) for x in v)
        return v

    for name, module in modules.items():

        def post(m, args, kwargs, out, n=name):
            first = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
            seen[n].append((detached(args), detached(kwargs), first.detach().clone()))

        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():  # not inference mode: the captured tensors feed optimisation later
            for call in tqdm(calls, desc="block inputs", unit="call"):
                unet(**call.kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen
