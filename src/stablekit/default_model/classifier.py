"""The attribute classifier: the default model's pinned judge of prompt fidelity.

A small CNN on 64x64 RGB images of the synthetic world with five heads: background (4-way),
shape / colour / texture presence (multi-label) and object count (1 or 2). Its penultimate
features give a Fréchet distance between image sets. Trained on world images rendered on the fly
(seeds 10_000 and up; held-out seed 999) with blur, noise and brightness jitter, so that it also
judges the slightly blurry, noisy images of a small diffusion model.

    python -m stablekit.default_model.classifier --out src/stablekit/default_model/classifier.safetensors
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import latents
from . import world

WEIGHTS = Path(__file__).resolve().parent / "classifier.safetensors"
HEADS = {
    "background": len(world.BACKGROUND_NAMES),
    "shape": len(world.SHAPE_NAMES),
    "color": len(world.COLOR_NAMES),
    "texture": len(world.TEXTURE_NAMES),
    "count": 2,
}
NAMES = {
    "background": world.BACKGROUND_NAMES,
    "shape": world.SHAPE_NAMES,
    "color": world.COLOR_NAMES,
    "texture": world.TEXTURE_NAMES,
}
TRAIN_SEED, HELDOUT_SEED = 10_000, 999


def _block(cin: int, cout: int, stride: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AttributeClassifier(nn.Module):
    """CNN 64x64 -> 8x8 (a 4x4 stride-2 stem, then 3x3 convs); global average and max pools give
    2 * 4 * width features (the max pool finds small objects); one linear layer per head."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            _block(3, 3 * w // 4, 2, k=4),
            _block(3 * w // 4, w, 1),
            _block(w, 2 * w, 2),
            _block(2 * w, 2 * w, 1),
            _block(2 * w, 4 * w, 2),
            _block(4 * w, 4 * w, 1),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(8 * w, n) for k, n in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 8 * width) of images `x` (B, 3, 64, 64) in [0, 1]."""
        h = self.body((x - 0.5) / 0.25)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: h(f) for k, h in self.heads.items()}


# ---------------------------------------------------------------- data


def to_tensor(images) -> torch.Tensor:
    """A list of PIL images (or a float tensor in [0, 1]) as (B, 3, 64, 64) floats in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        x = torch.stack([latents.to_tensor(im) for im in images])
    if x.shape[-2:] != (world.SIZE, world.SIZE):
        x = F.interpolate(x, size=(world.SIZE, world.SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def targets(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    """Training targets: class index for background and count, multi-hot presence for the others."""
    out = {
        "background": torch.tensor([world.BACKGROUND_NAMES.index(s.background) for s in scenes]),
        "count": torch.tensor([len(s.objects) - 1 for s in scenes]),
    }
    for key in ("shape", "color", "texture"):
        hot = torch.zeros(len(scenes), HEADS[key])
        for i, s in enumerate(scenes):
            hot[i, world.labels(s)[key]] = 1.0
        out[key] = hot
    return out


def batch(n: int, seed: int, two_prob: float = 0.25):
    """`n` world images (B, 3, 64, 64) in [0, 1] and their scenes."""
    ims, scenes = zip(*[(im, sc) for im, _, sc in world.dataset(n, seed, two_prob)], strict=False)
    return to_tensor(list(ims)), list(scenes)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-image Gaussian blur (sigma 0-1.3 px), brightness/contrast/colour jitter and Gaussian noise."""
    b = len(x)
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    sigma = torch.where(u(b) < 0.7, 0.2 + 1.1 * u(b), torch.full((b,), 1e-3))
    r = torch.arange(-3, 4, dtype=torch.float32)
    k1 = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(3, 0)[:, None]  # (3B, 1, 7, 7)
    x = F.conv2d(F.pad(x.reshape(1, 3 * b, *x.shape[2:]), (3, 3, 3, 3), mode="replicate"), k2, groups=3 * b)
    x = x.reshape(b, 3, *x.shape[2:])
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (0.85 + 0.3 * u(b, 1, 1, 1)) + mean  # contrast
    x = x + 0.16 * (u(b, 1, 1, 1) - 0.5) + 0.06 * (u(b, 3, 1, 1) - 0.5)  # brightness, colour cast
    x = x + 0.07 * u(b, 1, 1, 1) * torch.randn(x.shape, generator=g)  # noise, std up to 0.07
    return x.clamp(0, 1)


def loss_fn(out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
    ce = F.cross_entropy(out["background"], t["background"]) + F.cross_entropy(out["count"], t["count"])
    bce = sum(F.binary_cross_entropy_with_logits(out[k], t[k]) * HEADS[k] for k in ("shape", "color", "texture"))
    return ce + bce / 3


# ---------------------------------------------------------------- training and evaluation


def train(
    steps: int = 1800, batch_size: int = 64, lr: float = 3e-3, seed: int = 0, chunk: int = 2048, log_every: int = 250
) -> AttributeClassifier:
    """Train with AdamW and a one-cycle schedule; world data rendered in chunks of fresh seeds."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    t0, c0, losses, pool = time.time(), time.process_time(), [], None
    for step in range(steps):
        if step % (chunk // batch_size) == 0:  # a fresh chunk of world images, 40% with two objects
            pool = batch(chunk, TRAIN_SEED + seed * 100_000 + step // (chunk // batch_size), two_prob=0.4)
        perm = torch.randperm(chunk, generator=g)[:batch_size]
        x = augment(pool[0][perm], g)
        loss = loss_fn(model(x), targets([pool[1][i] for i in perm]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            print(
                f"step {step + 1}/{steps} loss {np.mean(losses):.4f} wall {time.time() - t0:.0f}s "
                f"cpu {time.process_time() - c0:.0f}s",
                flush=True,
            )
            losses = []
    return model.eval()


@torch.no_grad()
def predict_logits(model: AttributeClassifier, x: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    outs = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return {k: torch.cat([o[k] for o in outs]) for k in HEADS}


def decode(logits: dict[str, torch.Tensor]) -> list[dict]:
    """Per image: background, count, and the top-`count` shapes/colours/textures by presence logit
    (the second only where its presence probability exceeds 0.5, so two same-coloured objects give one colour)."""
    counts = (logits["count"].argmax(1) + 1).tolist()
    out = []
    for i, n in enumerate(counts):
        d = {"background": world.BACKGROUND_NAMES[int(logits["background"][i].argmax())], "count": n}
        for key, plural in (("shape", "shapes"), ("color", "colors"), ("texture", "textures")):
            order = logits[key][i].argsort(descending=True)[:n].tolist()
            d[plural] = [NAMES[key][j] for r, j in enumerate(order) if r == 0 or logits[key][i, j] > 0]
        out.append(d)
    return out


def truth(scene: world.Scene) -> dict:
    """The scene's attributes in :func:`predict`'s format (sets as sorted lists)."""
    return {
        "background": scene.background,
        "count": len(scene.objects),
        "shapes": sorted({o.shape for o in scene.objects}),
        "colors": sorted({o.color for o in scene.objects}),
        "textures": sorted({o.texture for o in scene.objects}),
    }


def match(pred: dict, true: dict) -> dict[str, bool]:
    """Per attribute: does the prediction equal the truth (as sets for shapes, colours, textures)?"""
    return {k: (set(pred[k]) == set(true[k])) if isinstance(true[k], list) else pred[k] == true[k] for k in true}


def accuracy(preds: list[dict], scenes: list[world.Scene]) -> dict[str, dict[str, float]]:
    """Accuracy per attribute, separately for one- and two-object scenes."""
    res = {}
    for n, name in ((1, "one_object"), (2, "two_objects")):
        ms = [match(p, truth(s)) for p, s in zip(preds, scenes, strict=False) if len(s.objects) == n]
        if ms:
            res[name] = {k: float(np.mean([m[k] for m in ms])) for k in ms[0]} | {"n": len(ms)}
    return res


# ---------------------------------------------------------------- shipped weights


def load_classifier(path: str | Path = WEIGHTS) -> AttributeClassifier:
    from safetensors.torch import load_file

    model = AttributeClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


_MODEL: AttributeClassifier | None = None


def predict(images, model: AttributeClassifier | None = None) -> list[dict]:
    """Attributes of each image (list of PIL images, or float tensor (B, 3, H, W) in [0, 1]):
    background, shapes, colors, textures (lists of names) and count (1 or 2)."""
    global _MODEL
    if model is None:
        if _MODEL is None:
            _MODEL = load_classifier()
        model = _MODEL
    return decode(predict_logits(model, to_tensor(images)))


def main(argv=None):
    p = argparse.ArgumentParser(description="train the default model's attribute classifier")
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=2000, help="held-out images (seed 999) to evaluate on")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from safetensors.torch import save_file

    t0, c0 = time.time(), time.process_time()
    model = train(a.steps, a.batch, a.lr, a.seed)
    minutes, cpu_minutes = (time.time() - t0) / 60, (time.process_time() - c0) / 60
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(a.out))
    x, scenes = batch(a.heldout, HELDOUT_SEED)
    res = accuracy(decode(predict_logits(model, x)), scenes)
    print(
        f"trained {a.steps} steps in {minutes:.1f} min wall, {cpu_minutes:.1f} min CPU; "
        f"saved {a.out} ({a.out.stat().st_size / 1e6:.2f} MB)"
    )
    aug = accuracy(decode(predict_logits(model, augment(x, torch.Generator().manual_seed(1)))), scenes)
    rows = [(f"held-out {k}", v) for k, v in res.items()] + [(f"held-out augmented {k}", v) for k, v in aug.items()]
    for label, r in rows:
        print(f"{label}: " + ", ".join(f"{k} {v:.4f}" if k != "n" else f"n {v}" for k, v in r.items()))
    return model, res


if __name__ == "__main__":
    main()
