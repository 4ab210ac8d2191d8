"""Train WOUAF's mapping network, modulation layers and fingerprint reader for a model's VAE decoder.

    python -m stablekit.provenance.wouaf_train [--model PATH] [--out FILE] [--iters 3000] [--threads 1]

Writes the safetensors file :mod:`.wouaf` loads (by default the shipped
``provenance/weights/wouaf.safetensors``), with this recipe and the digest of the base decoder in its
metadata. Data: latents of world renders (the default model's training distribution, seed 0) encoded by
the model's own VAE. The loss, augmentations and deviations from the paper are described in
:mod:`.wouaf`.
"""

from __future__ import annotations

import argparse
import io
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
from .wouaf import WEIGHTS, FingerprintNet, decoder_convs, decoder_digest, save_net


@dataclass(frozen=True)
class TrainConfig:
    """The recipe: fingerprint length, network width, data, optimisation and augmentation strengths."""

    bits: int = 32
    width: int = 128
    images: int = 512  # world renders encoded to latents (one window of each)
    window: int = 8  # side of the latent windows decoded (0: whole latents)
    first_block: int = -1  # modulate the decoder's up blocks from this one on (negative: from the end) and conv_out
    iters: int = 1200
    batch: int = 16
    lr: float = 3e-3
    quality: float = 20.0  # weight of the pixel MSE to the unmodulated decode
    warmup: float = 0.3  # fraction of the iterations without the quality loss, then a linear ramp over as many
    jpeg: tuple[int, int] = (40, 95)  # JPEG quality range
    crop: float = 0.5  # smallest kept area fraction of a resized crop
    noise: float = 0.08  # largest Gaussian noise standard deviation (pixels in [0, 1])
    blur: float = 1.0  # largest Gaussian blur standard deviation in pixels
    seed: int = 0

    def __post_init__(self):
        if not (8 <= self.bits <= 256 and self.width >= 8 and self.images >= self.batch >= 2 and self.iters >= 1):
            raise StablekitError(f"wouaf training: bad sizes in {self}")
        if self.window < 0:
            raise StablekitError(f"wouaf training: window must be >= 0, got {self.window}")
        if not (0 < self.crop <= 1 and 1 <= self.jpeg[0] <= self.jpeg[1] <= 100 and self.noise >= 0 <= self.blur):
            raise StablekitError(f"wouaf training: bad augmentation strengths in {self}")
        if not 0 <= self.warmup <= 0.5:
            raise StablekitError(f"wouaf training: warmup must lie in [0, 0.5], got {self.warmup}")
        if not (self.lr > 0 and self.quality >= 0):
            raise StablekitError(f"wouaf training: lr must be > 0 and quality >= 0, got {self.lr}, {self.quality}")


def world_latents(pipe, n: int, seed: int) -> torch.Tensor:
    """Scaled VAE latents (n, C, h, w) of `n` world renders at the model's native size."""
    from ..default_model import world
    from ..latents import encode_image, to_tensor

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    renders = [im for im, _, _ in world.dataset(n, seed)]
    for i in range(0, n, 64):
        x = torch.stack([to_tensor(im.resize((size, size), Image.BICUBIC)) for im in renders[i : i + 64]])
        out.append(encode_image(pipe, x * 2 - 1))
    return torch.cat(out)


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    arr = (x.detach().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    y = torch.from_numpy(np.asarray(Image.open(buf), dtype=np.float32) / 255).permute(2, 0, 1)
    return x + (y - x).detach()  # straight-through: JPEG forward, identity backward


def _crop(x: torch.Tensor, area: float, rng: random.Random) -> torch.Tensor:
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * math.sqrt(area))), max(1, round(w * math.sqrt(area)))
    top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
    return F.interpolate(x[None, :, top : top + ch, left : left + cw], size=(h, w), mode="bilinear")[0]


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, math.ceil(2 * sigma))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    y = F.conv2d(F.pad(x[:, None], (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))[:, 0]


def augment(x: torch.Tensor, cfg: TrainConfig, rng: random.Random) -> torch.Tensor:
    """Each image (3, H, W) in [0, 1] through one random post-processing (or none) at a random strength."""
    out = []
    for im in x:
        kind = rng.randrange(5)
        if kind == 1:
            im = _jpeg(im, rng.randint(*cfg.jpeg))
        elif kind == 2:
            im = _crop(im, rng.uniform(cfg.crop, 1.0), rng)
        elif kind == 3:
            im = im + rng.uniform(0, cfg.noise) * torch.randn_like(im)
        elif kind == 4 and cfg.blur > 0:
            im = _blur(im, rng.uniform(0.3, cfg.blur))
        out.append(im.clamp(0, 1))
    return torch.stack(out)


def modulated_names(vae, first_block: int) -> dict[str, int]:
    """Input channels of the convolutions modulated: up blocks from `first_block` on, and conv_out."""
    first = first_block % len(vae.decoder.up_blocks)
    keep = tuple(f"up_blocks.{i}." for i in range(first, len(vae.decoder.up_blocks))) + ("conv_out",)
    return {n: c.in_channels for n, c in decoder_convs(vae).items() if n.startswith(keep)}


@torch.no_grad()
def prefix_bank(vae, z: torch.Tensor, first_block: int, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(input of up block `first_block`, clean image in [0, 1]) of each latent: the unmodulated part of the
    decoder runs once, before training."""
    block = vae.decoder.up_blocks[first_block]
    feats, images = [], []
    hook = block.register_forward_pre_hook(lambda _, args: feats.append(args[0].clone()))
    try:
        for i in range(0, len(z), batch):
            images.append(_decode(vae, z[i : i + batch]))
    finally:
        hook.remove()
    return torch.cat(feats), torch.cat(images)


def tail(vae, h: torch.Tensor, first_block: int) -> torch.Tensor:
    """The decoder from up block `first_block` on (as diffusers' Decoder.forward runs it), image in [0, 1]."""
    dec = vae.decoder
    for block in dec.up_blocks[first_block % len(dec.up_blocks) :]:
        h = block(h, None)
    return (dec.conv_out(dec.conv_act(dec.conv_norm_out(h))) / 2 + 0.5).clamp(0, 1)


def windows(z: torch.Tensor, side: int, rng: random.Random) -> torch.Tensor:
    """A random `side` x `side` window of each latent (the decoder is convolutional: training on windows
    costs less and the reader, which pools globally, reads whole images the same way); 0 keeps all."""
    h, w = z.shape[-2:]
    if not side or side >= min(h, w):
        return z
    out = []
    for x in z:
        top, left = rng.randint(0, h - side), rng.randint(0, w - side)
        out.append(x[:, top : top + side, left : left + side])
    return torch.stack(out)


def _decode(vae, z: torch.Tensor) -> torch.Tensor:
    return (vae.decode(z / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


def train(pipe, cfg: TrainConfig, log=print, checkpoint=None) -> tuple[FingerprintNet, dict]:
    """A fingerprint network trained for `pipe`'s VAE decoder; and the last iterations' mean loss terms.
    `checkpoint(net, it, terms)`, if given, is called every 250 iterations."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    vae = pipe.vae.float().eval().requires_grad_(False)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    z = windows(world_latents(pipe, cfg.images, cfg.seed), cfg.window, rng)
    feats, clean = prefix_bank(vae, z, cfg.first_block)
    net = FingerprintNet(modulated_names(vae, cfg.first_block), cfg.bits, cfg.width, size)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.iters, pct_start=0.05)
    recent, start = [], time.perf_counter()
    for it in range(cfg.iters):
        pick = torch.randint(0, len(z), (cfg.batch,))
        phi = torch.randint(0, 2, (cfg.batch, cfg.bits)).float()
        with net.modulated(vae, phi):
            marked = tail(vae, feats[pick], cfg.first_block)
        logits = net.reader(augment(marked, cfg, rng))
        bce = F.binary_cross_entropy_with_logits(logits, phi)
        mse = F.mse_loss(marked, clean[pick])
        ramp = min(1.0, max(0.0, it / max(1, cfg.warmup * cfg.iters) - 1))
        opt.zero_grad()
        (bce + ramp * cfg.quality * mse).backward()
        opt.step()
        sched.step()
        recent = (recent + [(bce.item(), mse.item(), ((logits > 0) == (phi > 0)).float().mean().item())])[-100:]
        if it % 100 == 0 or it == cfg.iters - 1:
            b, m, acc = np.mean(recent, axis=0)
            log(
                f"iter {it}: bce {b:.4f} psnr {-10 * math.log10(m + 1e-12):.1f} dB bit acc {acc:.4f} "
                f"({time.perf_counter() - start:.0f} s)"
            )
        if checkpoint is not None and it % 250 == 249:
            checkpoint(net.eval(), it + 1, {"bce": float(b), "mse": float(m), "bit_acc": float(acc)})
            net.train()
    b, m, acc = np.mean(recent, axis=0)
    return net.eval(), {"bce": float(b), "mse": float(m), "bit_acc": float(acc)}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m stablekit.provenance.wouaf_train", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model path [default: the embedded default model]")
    p.add_argument("--out", type=Path, default=WEIGHTS)
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
    command = " ".join(["python -m stablekit.provenance.wouaf_train", *argv])

    def save(net, iters, final):
        recipe = {"config": asdict(cfg), "iterations_done": iters, "final": final}
        recipe["minutes"] = round((time.perf_counter() - t0) / 60, 1)
        save_net(net, a.out, {"decoder": decoder_digest(pipe.vae), "recipe": recipe, "command": command})
        print(f"wrote {a.out} after {iters} iterations", flush=True)

    net, final = train(pipe, cfg, checkpoint=save)
    save(net, cfg.iters, final)
    return a.out


if __name__ == "__main__":
    main()
