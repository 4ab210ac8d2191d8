"""What every few-step student shares: the teacher's (noise, prompt, image) pairs, a training loop, and saving
the student as a diffusers folder that :func:`stablekit.load` opens.

Students learn from the teacher's *own samples*: for a prompt and an initial noise ``z``, the teacher's
deterministic sampler (guidance included) returns a clean latent ``x0``. The pair ``(z, x0)`` is the coupling
that reflow straightens and that one-step distillation regresses. Prompts come from the training side of the
embedded model's world (seed 0), never the held-out side the benchmarks judge on (seed 777).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import StablekitError
from ..latents import encode_image, to_tensor

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@dataclass
class Pairs:
    """The teacher's samples: initial noise, conditional prompt embeddings and the clean latents it drew."""

    noise: torch.Tensor
    cond: torch.Tensor
    latents: torch.Tensor

    def __len__(self) -> int:
        return len(self.noise)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.noise[idx], self.cond[idx].float(), self.latents[idx]

    def save(self, path: Path) -> None:
        torch.save({"noise": self.noise, "cond": self.cond, "latents": self.latents}, path)

    @classmethod
    def load(cls, path: Path) -> Pairs:
        return cls(**torch.load(path))


def world_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` captions of the embedded model's world, from the training side (seed 0 by default)."""
    from ..default_model import world

    rng = random.Random(seed)
    return [world.caption(world.sample_scene(rng), rng) for _ in range(n)]


@torch.no_grad()
def sample_pairs(
    pipe, prompts: list[str], *, steps: int, guidance: float, seed: int, batch: int = 32, guidance_rescale: float = 0.0
) -> Pairs:
    """The pipeline's own samples for `prompts` (fresh noise per prompt from `seed`), as latents, with the noise
    it started from and the conditional prompt embeddings."""
    if not prompts:
        raise StablekitError("no prompts to draw the teacher's samples from; give at least one")
    unet = pipe.unet
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    g = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(len(prompts), *shape, generator=g) * pipe.scheduler.init_noise_sigma
    pipe.set_progress_bar_config(disable=True)
    out, conds = [], []
    for i in tqdm(range(0, len(prompts), batch), desc="teacher samples", unit="batch"):
        cond, _ = pipe.encode_prompt(prompts[i : i + batch], "cpu", 1, False)
        x = pipe(
            prompt_embeds=cond,
            latents=noise[i : i + batch].to(unet.dtype),
            num_inference_steps=steps,
            guidance_scale=guidance,
            guidance_rescale=guidance_rescale if guidance > 1 else 0.0,
            output_type="latent",
        ).images
        out.append(x.float())
        conds.append(cond.half())
    return Pairs(noise=noise, cond=torch.cat(conds), latents=torch.cat(out))


def world_latents(pipe, n: int, seed: int, batch: int = 64) -> Pairs:
    """`n` world renders (training side) encoded by the pipeline's VAE, with their captions' embeddings."""
    from ..default_model import world

    scenes = list(world.dataset(n, seed))
    latents, conds = [], []
    with torch.no_grad():
        for i in range(0, n, batch):
            chunk = scenes[i : i + batch]
            pixels = torch.stack([to_tensor(im) for im, _, _ in chunk]) * 2 - 1
            latents.append(encode_image(pipe, pixels))
            conds.append(pipe.encode_prompt([c for _, c, _ in chunk], "cpu", 1, False)[0].half())
    x0 = torch.cat(latents).float()
    return Pairs(noise=torch.zeros_like(x0), cond=torch.cat(conds), latents=x0)


def add_lora(unet, rank: int) -> None:
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))


@torch.no_grad()
def teacher_halves(unet, x_t, t, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher's (conditional, unconditional) predictions: the LoRA-adapted `unet` with its adapters off."""
    unet.disable_adapters()
    b = len(x_t)
    both = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond.expand(b, -1, -1)])).sample
    unet.enable_adapters()
    return both.chunk(2)


def fit(unet, loss, pairs: Pairs, *, iterations: int, batch: int, lr: float, seed: int, desc: str) -> list[float]:
    """Train `unet` in place for `iterations` AdamW steps of ``loss(unet, noise, cond, x0, generator)`` on random
    batches of `pairs`; the per-step losses."""
    if iterations < 1 or len(pairs) == 0:
        raise StablekitError(f"{desc}: nothing to train ({iterations} iterations on {len(pairs)} pairs)")
    g = torch.Generator("cpu").manual_seed(seed)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    unet.train()
    losses = []
    for _ in tqdm(range(iterations), desc=desc, unit="step"):
        idx = torch.randint(0, len(pairs), (min(batch, len(pairs)),), generator=g)
        value = loss(unet, *pairs.batch(idx), g)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        losses.append(value.item())
    unet.eval()
    return losses


def save_student(pipe, out: Path, recipe: dict) -> Path:
    """Write `pipe` (its UNet now the student's) as a diffusers folder at `out`, with ``recipe.json`` (how it was
    made, and the ``steps``/``guidance`` it is meant for); atomically: a folder is either complete or absent."""

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StablekitError(f"output '{out}' exists and is not an empty folder; choose another -o or remove it")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if pipe.text_encoder.__class__.__name__ == "BertModel":  # MiniLM comes from its package, as the default's
            shutil.rmtree(tmp / "text_encoder")
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def elapsed_minutes(t0: float) -> float:
    return round((time.perf_counter() - t0) / 60, 2)


class Stages:
    """Stage results kept in a work folder (none: nothing kept), so that a stopped distillation resumes; `config` (a
    dataclass) must match the one the folder was started with."""

    def __init__(self, workdir: Path | None, config):
        self.dir = None if workdir is None else Path(workdir)
        self.losses = {}
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        record = self.dir / "config.json"
        wanted = json.dumps(asdict(config), sort_keys=True)
        if record.exists() and record.read_text() != wanted:
            raise StablekitError(f"work folder '{self.dir}' holds a distillation with other settings; remove it")
        record.write_text(wanted)

    def _path(self, name: str) -> Path | None:
        return None if self.dir is None else self.dir / f"{name}.pt"

    def pairs(self, name: str, make) -> Pairs:
        path = self._path(name)
        if path is not None and path.exists():
            return Pairs.load(path)
        pairs = make()
        if path is not None:
            pairs.save(path)
        return pairs

    def train(self, name: str, unet, run) -> None:
        """Run `run` (training `unet` in place, returning its losses) unless the stage's weights are kept."""
        path = self._path(name)
        if path is not None and path.exists():
            kept = torch.load(path)
            unet.load_state_dict(kept["unet"])
            self.losses[name] = kept["loss_last"]
        else:
            unet.requires_grad_(True)
            losses = run()
            self.losses[name] = sum(losses[-50:]) / len(losses[-50:])
            if path is not None:
                torch.save({"unet": unet.state_dict(), "loss_last": self.losses[name]}, path)
        unet.requires_grad_(False)
