"""Laundering forensics: tell pristine images, images passed through the VAE ("laundered") and generated ones apart.

From "When Synthetic Traces Hide Real Content: Analysis of Stable Diffusion Image Laundering"
(Mandelli, Bestagini, Tubaro, 2024; reference code github.com/polimi-ispl/synthetic-image-detection).

Laundering: encode a real image with the model's VAE and decode it; the copy looks the same but carries
the decoder's traces, so a synthetic-image detector calls a real photo synthetic. The paper's two-stage
detector: stage 1 separates pristine images from synthetic ones (laundered or generated); stage 2, run
on what stage 1 calls synthetic, separates laundered from fully generated images. Each stage is a CNN
scoring image patches; an image's score is the mean patch logit.

Here (:func:`classify`): two small CNNs on 64x64 patches (the default model's size; larger images are
cut into non-overlapping patches, at most ``max_patches`` of them, evenly spaced), each giving a logit;
``p_synthetic = sigmoid(stage 1)``, ``p_generated = sigmoid(stage 2)`` and the label is ``pristine`` when
``p_synthetic < 0.5``, else ``generated`` or ``laundered`` by stage 2. Training (``python -m
stablekit.provenance.laundering``): pristine = world renders with sensor noise and random crops of
scikit-image photos (a training split of them), laundered = those through the model's VAE, generated
= text-to-image samples of world captions; binary cross-entropy, Adam, random flips.

Paper defaults: EfficientNet-B4 patch detectors (ImageNet-pretrained), 96x96 patches at training, real
images from RAISE / COCO / LSUN and others, laundered and generated with several SD versions.
Deviations: (1) small CNNs trained from scratch at 64x64 on one CPU core; (2) one model (the embedded
default) is the laundering and generating model; (3) the camera-model-identification study (laundering
hides source traces) is not reproduced.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StablekitError

WEIGHTS = Path(__file__).parent / "weights" / "laundering.safetensors"
PATCH = 64
LABELS = ("pristine", "laundered", "generated")
TRAIN_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon")
TEST_PHOTOS = ("clock", "brick", "gravel", "hubble_deep_field", "immunohistochemistry", "cat", "retina")


def stage_net(width: int = 32) -> nn.Sequential:
    """A patch classifier: (B, 3, 64, 64) in [0, 1] -> (B,) logit. The first layer sees full resolution (the
    decoder's traces are in the highest frequencies)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1),
        nn.SiLU(),
        nn.Conv2d(width, width, 3, 1, 1),
        nn.SiLU(),
        nn.Conv2d(width, 2 * width, 4, 2, 1),
        nn.SiLU(),
        nn.Conv2d(2 * width, 2 * width, 4, 2, 1),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 1),
        nn.Flatten(0),
    )


class TwoStage(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.stage1, self.stage2 = stage_net(width), stage_net(width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stage-1 logit: synthetic vs pristine, stage-2 logit: generated vs laundered) of patches."""
        x = x * 2 - 1
        return self.stage1(x), self.stage2(x)


def patches(x: torch.Tensor, max_patches: int = 16) -> torch.Tensor:
    """Non-overlapping PATCH x PATCH patches (K, 3, PATCH, PATCH) of an image (3, H, W), evenly spaced, at most
    `max_patches`."""
    h, w = x.shape[-2:]
    if h < PATCH or w < PATCH:
        raise StablekitError(f"image is {w}x{h}; laundering forensics needs at least {PATCH}x{PATCH} pixels")
    tops = np.linspace(0, h - PATCH, max(1, h // PATCH)).round().astype(int)
    lefts = np.linspace(0, w - PATCH, max(1, w // PATCH)).round().astype(int)
    cells = [(t, left) for t in tops for left in lefts]
    pick = np.linspace(0, len(cells) - 1, min(len(cells), max_patches)).round().astype(int)
    return torch.stack([x[:, cells[i][0] : cells[i][0] + PATCH, cells[i][1] : cells[i][1] + PATCH] for i in pick])


@functools.lru_cache(maxsize=2)
def load_detector(path: str = str(WEIGHTS)) -> tuple[TwoStage, dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise StablekitError(
            f"laundering detector weights '{path}' do not exist; train them with python -m {__name__}"
        )
    try:
        with safe_open(path, "pt") as f:
            info = json.loads(f.metadata()["laundering"])
        net = TwoStage(info["width"])
        net.load_state_dict(load_file(path))
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
        raise StablekitError(f"'{path}' is not a laundering detector file ({type(e).__name__})") from None
    return net.eval().requires_grad_(False), info


def logits(images, net: TwoStage | None = None, max_patches: int = 16) -> np.ndarray:
    """(N, 2) mean patch logits (stage 1, stage 2) of images (PIL images or (3, H, W) tensors in [0, 1])."""
    from ..latents import to_tensor

    net = net or load_detector()[0]
    out = []
    with torch.no_grad():
        for im in images:
            x = im if torch.is_tensor(im) else to_tensor(im)
            s1, s2 = net(patches(x.float(), max_patches))
            out.append([s1.mean().item(), s2.mean().item()])
    return np.array(out).reshape(-1, 2)


def classify(images, net: TwoStage | None = None, max_patches: int = 16) -> list[dict]:
    """Per image: ``label`` (pristine, laundered or generated), ``p_synthetic`` and ``p_generated``."""
    out = []
    for s1, s2 in logits(images, net, max_patches):
        p1, p2 = 1 / (1 + np.exp(-s1)), 1 / (1 + np.exp(-s2))
        label = "pristine" if p1 < 0.5 else "generated" if p2 >= 0.5 else "laundered"
        out.append({"label": label, "p_synthetic": round(float(p1), 4), "p_generated": round(float(p2), 4)})
    return out


# ---------------------------------------------------------------- data (shared with the benchmark)


def world_images(n: int, seed: int) -> list:
    """`n` world renders with sensor noise (pristine) and their scenes."""
    from ..default_model import world

    return [im for im, _, _ in world.dataset(n, seed)]


def photo_crops(names, n: int, seed: int, size: int = PATCH) -> list:
    """`n` random crops of scikit-image photos `names` (each at a random scale, resized to `size`; pristine)."""
    try:
        from skimage import data
    except ImportError:
        raise StablekitError("the photos need scikit-image: pip install 'stablekit[bench]'") from None
    from PIL import Image

    rng = random.Random(seed)
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in names]
    out = []
    for _ in range(n):
        im = rng.choice(photos)
        side = int(min(im.size) * rng.uniform(0.15, 1.0))
        left, top = rng.randint(0, im.width - side), rng.randint(0, im.height - side)
        out.append(im.resize((size, size), Image.LANCZOS, box=(left, top, left + side, top + side)))
    return out


def launder(pipe, images, batch: int = 64) -> list:
    """`images` passed through `pipe`'s VAE (encoder mean, decoder), as 8-bit images."""
    from ..latents import encode_image, to_pil, to_tensor

    vae, out = pipe.vae, []
    for i in range(0, len(images), batch):
        x = torch.stack([to_tensor(im) for im in images[i : i + batch]]).to(pipe.device)
        z = encode_image(pipe, x * 2 - 1)
        with torch.no_grad():
            y = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample.float()
        out += [to_pil(v / 2 + 0.5) for v in y]
    return out


def generated(pipe, prompts: list[str], seed: int, steps: int = 25, guidance: float = 7.5, batch: int = 50) -> list:
    """Text-to-image samples of `prompts`, noise seed ``seed * 100000 + i`` for prompt i."""
    from ..pipeline import guidance_rescale

    out = []
    for i in range(0, len(prompts), batch):
        j = min(i + batch, len(prompts))
        gens = [torch.Generator().manual_seed(seed * 100_000 + k) for k in range(i, j)]
        with torch.inference_mode():
            out += pipe(
                prompts[i:j],
                num_inference_steps=steps,
                guidance_scale=guidance,
                guidance_rescale=guidance_rescale(pipe),
                generator=gens,
            ).images
        print(f"generated: {j}/{len(prompts)}", flush=True)
    return out


# ---------------------------------------------------------------- training


def training_sets(pipe, n: int, seed: int) -> dict[str, list]:
    """Pristine (half world renders, half photo crops), their laundered copies, and generated images."""
    import random as rnd

    from ..default_model import world

    pristine = world_images(n // 2, seed) + photo_crops(TRAIN_PHOTOS, n - n // 2, seed)
    rng = rnd.Random(seed + 1)
    prompts = [world.caption(world.sample_scene(rng), rng) for _ in range(n)]
    return {"pristine": pristine, "laundered": launder(pipe, pristine), "generated": generated(pipe, prompts, seed)}


def fit(sets: dict[str, list], iters: int, batch: int = 32, lr: float = 2e-3, width: int = 32, seed: int = 0):
    """Both stages trained on `sets` (label -> images): stage 1 pristine (0) vs the rest (1), stage 2 laundered
    (0) vs generated (1)."""
    from ..latents import to_tensor

    torch.manual_seed(seed)
    data = {k: torch.stack([to_tensor(im) for im in v]) for k, v in sets.items()}
    net = TwoStage(width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=iters, pct_start=0.05)
    for it in range(iters):
        k = batch // 4
        pick = {name: x[torch.randint(0, len(x), (2 * k if name == "pristine" else k,))] for name, x in data.items()}
        x = torch.cat([pick["pristine"], pick["laundered"], pick["generated"]])
        flip = torch.rand(len(x)) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        s1, s2 = net(x)
        y1 = torch.cat([torch.zeros(2 * k), torch.ones(2 * k)])
        y2 = torch.cat([torch.zeros(k), torch.ones(k)])
        loss = F.binary_cross_entropy_with_logits(s1, y1) + F.binary_cross_entropy_with_logits(s2[2 * k :], y2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if it % 100 == 0 or it == iters - 1:
            print(f"iter {it}: loss {loss.item():.4f}", flush=True)
    return net.eval()


def main(argv: list[str] | None = None) -> Path:
    import argparse
    import sys
    import time

    from safetensors.torch import save_file

    p = argparse.ArgumentParser(prog=f"python -m {__name__}", description="train the two-stage laundering detector")
    p.add_argument("--model", default=None)
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p.add_argument("--n", type=int, default=100, help="images per class")
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from ..pipeline import load

    t0 = time.perf_counter()
    pipe = load(a.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    net = fit(training_sets(pipe, a.n, 0), a.iters, a.batch)
    info = {"width": 32, "n": a.n, "iters": a.iters, "batch": a.batch, "train_photos": TRAIN_PHOTOS, "world_seed": 0}
    info |= {
        "command": " ".join([f"python -m {__name__}", *argv]),
        "minutes": round((time.perf_counter() - t0) / 60, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(net.state_dict()), str(a.out), metadata={"laundering": json.dumps(info)})
    print(f"wrote {a.out}")
    return a.out


if __name__ == "__main__":
    main()
