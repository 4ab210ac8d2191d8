"""Train the asymmetric decoder (:mod:`.asymmetric_decoder`) for the embedded model's VAE; the encoder is frozen.

    python -m stablekit.edit.asymmetric_decoder_train --workdir runs/asymvq   # writes edit/weights/

Data: world renders (seed 0, the VAE's own training distribution), each with a random mask
(:func:`random_mask`); the latent is a sample of the frozen encoder's posterior. Loss: L1 + MSE on all pixels.
The conditional branch learns at `--lr`, the layers taken from the VAE's decoder (and the extra blocks) at
`--decoder-lr-scale` of it (the shipped weights: the same rate).
Stage 1 trains on random 32x32 crops (cheap), stage 2 on whole frames (GroupNorm sees full images), under one
cosine learning-rate schedule. Every finished stage is cached in `--workdir`, and a checkpoint every 100 steps
lets a rerun resume; the weights and their recipe (this command and its settings) go to `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..default_model import world
from .asymmetric_decoder import WEIGHTS, AsymmetricDecoder

MASK_KINDS = {"object": 0.35, "box": 0.2, "stroke": 0.2, "ones": 0.15, "zeros": 0.1}


def random_mask(rng: random.Random, scene: world.Scene, size: int = world.SIZE) -> np.ndarray:
    """A (size, size) float mask, 1 where the decoder must generate: the scene's objects (dilated 0-3 pixels),
    one to three boxes, one to three brush strokes, everything or nothing (:data:`MASK_KINDS`)."""
    kind = rng.choices(list(MASK_KINDS), weights=list(MASK_KINDS.values()))[0]
    if kind in ("ones", "zeros"):
        return np.full((size, size), float(kind == "ones"), np.float32)
    if kind == "object":
        m = np.max([world.object_mask(o, size) for o in scene.objects], axis=0) > 0.01
        grow = rng.randint(0, 3)
        m = F.max_pool2d(torch.from_numpy(m).float()[None], 2 * grow + 1, 1, grow)[0].numpy() if grow else m
        return m.astype(np.float32)
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 3)):
        if kind == "box":
            w = rng.randint(6, size // 2)
            h = rng.randint(6, size // 2)
            x = rng.randint(0, size - w)
            y = rng.randint(0, size - h)
            draw.rectangle([x, y, x + w, y + h], fill=255)
        else:
            pts = [(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(rng.randint(2, 5))]
            draw.line(pts, fill=255, width=rng.randint(3, 9), joint="curve")
    return (np.asarray(img, np.float32) > 127).astype(np.float32)


@torch.no_grad()
def make_data(vae, n: int, seed: int) -> dict:
    """`n` world renders (uint8), a random mask each, and the frozen encoder's posterior mean and std."""
    rng = random.Random(seed + 1)
    images, masks = [], []
    for image, _, scene in tqdm(world.dataset(n, seed), total=n, desc="render", mininterval=10):
        images.append(np.asarray(image))
        masks.append(random_mask(rng, scene))
    x = torch.from_numpy(np.stack(images))
    means, stds = [], []
    for i in range(0, n, 256):
        post = vae.encode(x[i : i + 256].permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return {"images": x, "masks": torch.from_numpy(np.stack(masks)), "mean": torch.cat(means), "std": torch.cat(stds)}


def batch(data: dict, size: int, crop: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(latent sample, image in [-1, 1], mask) of `size` random images, cropped to `crop` pixels."""
    idx = torch.randint(0, len(data["images"]), (size,), generator=g)
    f = world.SIZE // data["mean"].shape[-1]
    cy, cx = (torch.randint(0, (world.SIZE - crop) // f + 1, (2,), generator=g) * f).tolist()
    x = data["images"][idx].permute(0, 3, 1, 2).float() / 127.5 - 1
    z = data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=g)
    lat = slice(cy // f, (cy + crop) // f), slice(cx // f, (cx + crop) // f)
    pix = slice(cy, cy + crop), slice(cx, cx + crop)
    return z[..., lat[0], lat[1]], x[..., pix[0], pix[1]], data["masks"][idx][:, None, pix[0], pix[1]]


def train(model: AsymmetricDecoder, data: dict, a: argparse.Namespace, ckpt: Path) -> AsymmetricDecoder:
    """`a.crop_steps` steps on 32x32 crops then `a.full_steps` on whole frames, resuming from `ckpt`."""
    branch = [p for n, p in model.named_parameters() if n.startswith("cond.")]
    decoder = [p for n, p in model.named_parameters() if not n.startswith("cond.")]
    groups = [{"params": branch, "scale": 1.0}, {"params": decoder, "scale": a.decoder_lr_scale}]
    opt = torch.optim.AdamW([g | {"lr": a.lr * g["scale"]} for g in groups])
    total = a.crop_steps + a.full_steps
    first = 0
    if ckpt.exists():
        state = torch.load(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        first = state["step"]
    g = torch.Generator().manual_seed(a.seed + first)
    model.train()
    for step in tqdm(range(first, total), initial=first, total=total, desc="train decoder", mininterval=10):
        full = step >= a.crop_steps
        z, x, m = batch(data, a.batch // 2 if full else a.batch, world.SIZE if full else 32, g)
        out = model(z, x, m)
        loss = F.l1_loss(out, x) + F.mse_loss(out, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay to 5%
            group["lr"] = a.lr * group["scale"] * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / total)))
        if (step + 1) % 100 == 0 or step + 1 == total:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
            print(f"step {step + 1} loss {loss.item():.4f}", flush=True)
    return model.eval()


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("runs/asymmetric_decoder"))
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p.add_argument("--vae", type=Path, default=Path(world.__file__).parent / "weights" / "vae", help="frozen VAE")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--crop-steps", type=int, default=420)
    p.add_argument("--full-steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the conditional branch")
    p.add_argument("--decoder-lr-scale", type=float, default=1.0, help="the decoder's own layers' rate, relative")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    a = parse(argv)
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    a.workdir.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(a.vae).eval().requires_grad_(False)
    cached = a.workdir / "data.pt"
    if not cached.exists():
        torch.save(make_data(vae, a.images, a.seed), cached)
    start = time.time()
    model = train(AsymmetricDecoder.from_vae(vae), torch.load(cached), a, a.workdir / "ckpt.pt")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(a.out))
    settings = {k: v for k, v in vars(a).items() if k not in ("workdir", "out", "vae")}
    recipe = {
        "command": "python -m stablekit.edit.asymmetric_decoder_train "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items()),
        "mask_kinds": MASK_KINDS,
        "loss": "L1 + MSE on all pixels",
        "minutes_last_run": round((time.time() - start) / 60, 1),
        "vae_config": model.vae_config,
    }
    a.out.with_suffix(".json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(a.out)


if __name__ == "__main__":
    main()
