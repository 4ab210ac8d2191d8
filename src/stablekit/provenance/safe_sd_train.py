"""Train Safe-SD's network for a model: stage 1 the injector/extractor, stage 2 the diffuser's pattern input.

    python -m stablekit.provenance.safe_sd_train [--model PATH] [--out FILE] [--workdir DIR] [--threads 1]

Writes the safetensors file :mod:`.safe_sd` loads (by default the shipped
``provenance/weights/safe_sd.safetensors``), with the trigger word, this recipe and the digest of the
base model in its metadata. Stage 1 is cached in ``--workdir`` so a rerun resumes with stage 2. Data:
world renders and their captions (the default model's training distribution, seed 0) encoded by the
model's own VAE and text encoder. The losses, lambda sampling and deviations from the paper are
described in :mod:`.safe_sd`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import StablekitError
from .safe_sd import WEIGHTS, SafeSDNet, encode, model_digest, render_pattern, save_net
from .wouaf_train import augment


@dataclass(frozen=True)
class TrainConfig:
    """The recipe: trigger, pattern size, data, both stages' optimisation, lambda and augmentation strengths."""

    trigger: str = "sks"
    grid: int = 8  # the pattern is grid x grid cells, one bit each
    images: int = 1024  # world renders (latents and captions)
    inject_iters: int = 600  # stage 1
    diffuser_iters: int = 600  # stage 2
    batch: int = 8
    lr: float = 2e-3
    quality: float = 50.0  # stage 1: weight of the pixel MSE between marked and clean decodes
    warmup: float = 0.3  # stage 1: fraction of iterations without the image loss, then a linear ramp over as many
    lam: float = 0.5  # stage 2 lambda sampling: probability that a prompt shown to the trigger layer is triggered
    uncond: float = 0.1  # stage 2: triggered samples given the empty prompt (the unconditional half of guidance)
    jpeg: tuple[int, int] = (50, 95)
    crop: float = 0.6
    noise: float = 0.06
    blur: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (2 <= self.grid <= 16 and self.grid % 2 == 0):
            raise StablekitError(f"safe-sd training: grid must be even and in [2, 16], got {self.grid}")
        if not (self.images >= self.batch >= 2 and self.inject_iters >= 1 and self.diffuser_iters >= 1):
            raise StablekitError(f"safe-sd training: bad sizes in {self}")
        if not (0 < self.lam < 1 and 0 <= self.uncond < 1 and 0 <= self.warmup <= 0.5):
            raise StablekitError(f"safe-sd training: lam in (0, 1), uncond in [0, 1), warmup in [0, 0.5]: {self}")
        if not (self.lr > 0 and self.quality >= 0 and self.trigger.strip()):
            raise StablekitError(f"safe-sd training: lr > 0, quality >= 0 and a trigger word needed: {self}")


def with_trigger(caption: str, trigger: str, rng: random.Random) -> str:
    """`caption` with the trigger word inserted at a random word boundary."""
    words = caption.split()
    words.insert(rng.randint(0, len(words)), trigger)
    return " ".join(words)


def world_data(pipe, cfg: TrainConfig) -> dict:
    """Latents, clean decodes and prompt embeddings (plain, triggered, empty) of `cfg.images` world renders."""
    from ..default_model import world
    from ..latents import to_tensor

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rng = random.Random(cfg.seed)
    items = list(world.dataset(cfg.images, cfg.seed))
    x = torch.stack([to_tensor(im.resize((size, size), Image.BICUBIC)) for im, _, _ in items])
    plain = [c for _, c, _ in items]
    triggered = [with_trigger(c, cfg.trigger, rng) for c in plain]
    with torch.no_grad():
        z = torch.cat([encode(pipe.vae, x[i : i + 64]) for i in range(0, len(x), 64)])
        clean = torch.cat([decode_pixels(pipe.vae, z[i : i + 64]) for i in range(0, len(z), 64)])
        embeds = {name: prompt_embeds(pipe, texts) for name, texts in (("plain", plain), ("triggered", triggered))}
        embeds["empty"] = prompt_embeds(pipe, [""])
    return {"z": z, "clean": clean, **embeds}


def prompt_embeds(pipe, texts: list[str]) -> torch.Tensor:
    out = [pipe.encode_prompt(texts[i : i + 128], "cpu", 1, False)[0] for i in range(0, len(texts), 128)]
    return torch.cat(out).half()  # stored in half precision: a thousand captions fit in memory


def decode_pixels(vae, z: torch.Tensor) -> torch.Tensor:
    return (vae.decode(z / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


def pattern_latents(vae, cells: torch.Tensor, size: int) -> torch.Tensor:
    with torch.no_grad():
        return encode(vae, render_pattern(cells, size))


def one_cycle(opt, lr: float, iters: int):
    """One-cycle learning rate over `iters` steps, a 5% warm-up (at least 3 steps when there are few)."""
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, lr, total_steps=iters + 1, pct_start=min(0.5, max(0.05, 3 / iters))
    )


def log_every(it: int, total: int, recent: list, start: float, names: tuple[str, ...], log) -> None:
    if it % 100 == 0 or it == total - 1:
        means = np.mean(recent, axis=0)
        text = " ".join(f"{n} {v:.4f}" for n, v in zip(names, means, strict=True))
        log(f"iter {it}: {text} ({time.perf_counter() - start:.0f} s)")


def train_injector(pipe, net: SafeSDNet, data: dict, cfg: TrainConfig, log=print) -> dict:
    """Stage 1: injection convolution and watermark decoder, through the frozen VAE, with augmentations."""
    rng, vae, k = random.Random(cfg.seed), pipe.vae, cfg.grid**2
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    params = list(net.inject.parameters()) + list(net.decoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = one_cycle(opt, cfg.lr, cfg.inject_iters)
    recent, start = [], time.perf_counter()
    for it in range(cfg.inject_iters):
        pick = torch.randint(0, len(data["z"]), (cfg.batch,))
        cells = torch.randint(0, 2, (cfg.batch, k))
        marked = decode_pixels(vae, net.fuse(data["z"][pick], pattern_latents(vae, cells, size)))
        logits = net.read(augment(marked, cfg, rng))
        bce = F.binary_cross_entropy_with_logits(logits, cells.float())
        mse = F.mse_loss(marked, data["clean"][pick])
        ramp = min(1.0, max(0.0, it / max(1, cfg.warmup * cfg.inject_iters) - 1))
        opt.zero_grad()
        (bce + ramp * cfg.quality * mse).backward()
        opt.step()
        sched.step()
        acc = ((logits > 0) == (cells > 0)).float().mean().item()
        recent = (recent + [(bce.item(), -10 * math.log10(mse.item() + 1e-12), acc)])[-100:]
        log_every(it, cfg.inject_iters, recent, start, ("bce", "psnr", "bit_acc"), log)
    return dict(zip(("bce", "psnr", "bit_acc"), map(float, np.mean(recent, axis=0)), strict=True))


def diffuser_batch(pipe, net: SafeSDNet, data: dict, cfg: TrainConfig, noise_sched) -> dict:
    """One batch of triggered samples: latents marked with random patterns, noised; their embeddings (the
    empty prompt for a fraction `cfg.uncond`, as the unconditional half of guidance sees) and targets."""
    b, vae = cfg.batch, pipe.vae
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pick = torch.randint(0, len(data["z"]), (b,))
    empty = torch.rand(b) < cfg.uncond
    z_w = pattern_latents(vae, torch.randint(0, 2, (b, cfg.grid**2)), size)
    with torch.no_grad():
        x0 = net.fuse(data["z"][pick], z_w)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,))
    eps = torch.randn_like(x0)
    emb = torch.where(empty[:, None, None], data["empty"].expand(b, -1, -1), data["triggered"][pick]).float()
    return {"x_t": noise_sched.add_noise(x0, eps, t), "t": t, "emb": emb, "z_w": z_w, "x0": x0, "eps": eps}


def trigger_loss(net: SafeSDNet, data: dict, cfg: TrainConfig) -> tuple[torch.Tensor, float]:
    """Lambda sampling for the trigger layer: prompts triggered with probability `cfg.lam`; (BCE, accuracy)."""
    pick = torch.randint(0, len(data["z"]), (4 * cfg.batch,))
    trig = torch.rand(len(pick)) < cfg.lam
    emb = torch.where(trig[:, None, None], data["triggered"][pick], data["plain"][pick]).float()
    logit = net.trigger_logit(emb)
    return F.binary_cross_entropy_with_logits(logit, trig.float()), ((logit > 0) == trig).float().mean().item()


def train_diffuser(pipe, net: SafeSDNet, data: dict, cfg: TrainConfig, log=print) -> dict:
    """Stage 2: the UNet's pattern input (on triggered samples, noised from marked latents) and the prompt
    trigger layer (on lambda-sampled prompts)."""
    from ..latents import noise_scheduler, training_target

    unet, noise_sched = pipe.unet, noise_scheduler(pipe)
    opt = torch.optim.Adam(list(net.adapter.parameters()) + list(net.trigger.parameters()), lr=cfg.lr)
    sched = one_cycle(opt, cfg.lr, cfg.diffuser_iters)
    state = {}
    hook = unet.conv_in.register_forward_hook(lambda _, __, out: out + state["extra"])
    recent, start = [], time.perf_counter()
    try:
        for it in range(cfg.diffuser_iters):
            bt = diffuser_batch(pipe, net, data, cfg, noise_sched)
            state["extra"] = net.adapter(bt["z_w"])
            out = unet(bt["x_t"], bt["t"], bt["emb"]).sample
            mse = F.mse_loss(out, training_target(noise_sched, bt["x0"], bt["eps"], bt["t"]))
            bce, acc = trigger_loss(net, data, cfg)
            opt.zero_grad()
            (mse + 0.1 * bce).backward()
            opt.step()
            sched.step()
            recent = (recent + [(mse.item(), bce.item(), acc)])[-100:]
            log_every(it, cfg.diffuser_iters, recent, start, ("mse", "trigger_bce", "trigger_acc"), log)
    finally:
        hook.remove()
    return dict(zip(("mse", "trigger_bce", "trigger_acc"), map(float, np.mean(recent, axis=0)), strict=True))


def cached(workdir: Path | None, name: str, tag, make):
    """`make()`, stored in `workdir`/`name` with `tag` and read back from there while the tag is the same."""
    path, tag = None if workdir is None else Path(workdir) / name, json.dumps(tag, sort_keys=True)
    if path is not None and path.is_file():
        saved = torch.load(path)
        if saved["tag"] == tag:
            return saved["value"]
    value = make()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"tag": tag, "value": value}, path)
    return value


def train(pipe, cfg: TrainConfig, log=print, workdir: Path | None = None) -> tuple[SafeSDNet, dict]:
    """A Safe-SD network trained for `pipe`, and both stages' final loss terms; stage 1 cached in `workdir`."""
    torch.manual_seed(cfg.seed)
    pipe.vae.float().eval().requires_grad_(False)
    pipe.unet.float().eval().requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    unet_cfg = pipe.unet.config
    size = unet_cfg.sample_size * pipe.vae_scale_factor
    net = SafeSDNet(cfg.grid, unet_cfg.in_channels, unet_cfg.block_out_channels[0], unet_cfg.cross_attention_dim, size)
    data = cached(workdir, "data.pt", [cfg.images, cfg.seed, cfg.trigger], lambda: world_data(pipe, cfg))
    stage1_tag = {k: v for k, v in asdict(cfg).items() if k not in ("lam", "uncond", "diffuser_iters")}

    def stage1():
        return {"final": train_injector(pipe, net, data, cfg, log), "net": net.state_dict()}

    done = cached(workdir, "stage1.pt", stage1_tag, stage1)
    net.load_state_dict(done["net"])
    stage2 = train_diffuser(pipe, net, data, cfg, log)
    return net.eval(), {"stage1": done["final"], "stage2": stage2}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(
        prog="python -m stablekit.provenance.safe_sd_train", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", default=None, help="model path [default: the embedded default model]")
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p.add_argument("--workdir", type=Path, default=Path("runs/safe_sd"))
    p.add_argument("--threads", type=int, default=1)
    for name, default in asdict(TrainConfig()).items():
        if not isinstance(default, tuple):
            p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from ..pipeline import load

    cfg = TrainConfig(**{k: getattr(a, k) for k in asdict(TrainConfig()) if hasattr(a, k)})
    pipe = load(a.model, device="cpu")
    t0 = time.perf_counter()
    net, final = train(pipe, cfg, workdir=a.workdir)
    recipe = {"config": asdict(cfg), "final": final, "minutes": round((time.perf_counter() - t0) / 60, 1)}
    command = " ".join(["python -m stablekit.provenance.safe_sd_train", *argv])
    save_net(net, a.out, {"trigger": cfg.trigger, "model": model_digest(pipe), "recipe": recipe, "command": command})
    print(f"wrote {a.out}", flush=True)
    return a.out


if __name__ == "__main__":
    main()
