"""DiffDIS: foreground segmentation from the diffusion UNet's features in one step, with an auxiliary edge task.

Paper: "High-Precision Dichotomous Image Segmentation via Probing Diffusion Capacity" (Yu et al., 2024; reference
code https://github.com/qianyu-dlut/DiffDIS).

Implemented: the image's VAE latent goes through the frozen UNet once, at a fixed timestep without noise (the
paper's one-step, deterministic use of the denoiser), under the empty prompt; the outputs of its up blocks (the
decoder's multi-scale features) are upsampled to the image's size and stacked with the image itself, and a light
convolutional head predicts two maps: the foreground mask and its edge (the paper's auxiliary edge generation, which
sharpens boundaries), trained with binary cross-entropy on both. The mask is the head's probability > 0.5.

Defaults: timestep 100, a head of 32 channels (1x1 projection, two 3x3 convolutions), 300 Adam iterations at
3e-3 on 600 world scenes (``python -m stablekit.restore.diffdis``); the weights ship as
``weights/diffdis_head.safetensors`` with the recipe next to it. ``pixels=True`` gives the baseline: the same head
on the image alone (no diffusion features), trained the same way.

Deviations:
1. The UNet is frozen and only the light head is trained; the paper fine-tunes the UNet itself (with a
   batch-discriminative embedding for the mask and edge branches) to denoise the mask latent in one step.
2. The edge task is a second output channel of the head, not a second UNet branch with its own latent.
3. Trained and measured on the embedded world's scenes, whose renderer gives the exact masks, not DIS5K.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StablekitError

WEIGHTS = Path(__file__).parent / "weights"
HEAD = WEIGHTS / "diffdis_head.safetensors"
PIXEL_HEAD = WEIGHTS / "diffdis_pixels_head.safetensors"


@dataclass(frozen=True)
class DiffDISConfig:
    """Features at `timestep`; a head of `width` channels trained `iters` Adam steps at `lr` on batches of `batch`
    from `scenes` world scenes of `seed`; `edge_weight` weighs the edge loss; `pixels` drops the features."""

    timestep: int = 100
    width: int = 32
    iters: int = 300
    lr: float = 3e-3
    batch: int = 16
    scenes: int = 600
    edge_weight: float = 1.0
    pixels: bool = False
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.timestep < 1000 or min(self.width, self.iters, self.batch, self.scenes) < 1:
            raise StablekitError("timestep must be in 0 .. 999 and width, iters, batch, scenes >= 1")


class Head(nn.Module):
    """Features and image -> (mask, edge) logits."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, 1)
        self.body = nn.Sequential(
            nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1)
        )
        self.out = nn.Conv2d(width, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.out(F.silu(h + self.body(h)))


@torch.no_grad()
def features(pipe, images: torch.Tensor, timestep: int, batch: int = 16) -> list[torch.Tensor]:
    """The UNet's up-block outputs for (B, 3, H, W) images in [0, 1], one tensor per block at its resolution."""
    from ..latents import encode_prompts

    outs, store = [], []
    hooks = [b.register_forward_hook(lambda m, i, o: store.append(o)) for b in pipe.unet.up_blocks]
    try:
        for i in range(0, len(images), batch):
            x = images[i : i + batch] * 2 - 1
            z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
            cond = encode_prompts(pipe, [""] * len(x), z)[1]
            store.clear()
            pipe.unet(z, timestep, **cond)
            outs.append([s.float() for s in store])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(parts) for parts in zip(*outs, strict=True)]


def head_input(feats: list[torch.Tensor], images: torch.Tensor, pixels: bool) -> torch.Tensor:
    """The features upsampled to the images' size, stacked with the images (or the images alone)."""
    size = images.shape[-2:]
    parts = [] if pixels else [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats]
    return torch.cat([*parts, images * 2 - 1], dim=1)


def edges(mask: torch.Tensor) -> torch.Tensor:
    """The (B, 1, H, W) binary mask's boundary: pixels whose 3x3 neighbourhood holds both labels."""
    hi = F.max_pool2d(mask, 3, 1, 1)
    lo = -F.max_pool2d(-mask, 3, 1, 1)
    return (hi - lo).clamp(0, 1)


def scenes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` world scenes with faint sensor noise, (n, 3, 64, 64) in [0, 1], and their exact foreground masks
    (n, 1, 64, 64) in {0, 1}: a pixel is foreground where objects cover more than half of it."""
    from ..default_model import world
    from ..latents import to_tensor

    rng, noise = random.Random(seed), np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(n):
        scene = world.sample_scene(rng)
        images.append(to_tensor(world.render(scene, noise)))
        cover = np.max([world.object_mask(o) for o in scene.objects], axis=0)
        masks.append(torch.from_numpy(cover > 0.5).float()[None])
    return torch.stack(images), torch.stack(masks)


def loss(head: Head, x: torch.Tensor, mask: torch.Tensor, edge_weight: float) -> torch.Tensor:
    logits = head(x)
    bce = F.binary_cross_entropy_with_logits
    return bce(logits[:, :1], mask) + edge_weight * bce(logits[:, 1:], edges(mask))


def train(pipe, config: DiffDISConfig = DiffDISConfig(), progress: bool = False) -> Head:
    """A head trained on `config.scenes` world scenes, the UNet's features computed once and kept."""
    from tqdm import tqdm

    images, masks = scenes(config.scenes, config.seed)
    feats = [] if config.pixels else features(pipe, images, config.timestep)
    x = head_input(feats, images, config.pixels)
    torch.manual_seed(config.seed)
    head = Head(x.shape[1], config.width)
    opt = torch.optim.Adam(head.parameters(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    for _ in tqdm(range(config.iters), disable=not progress, desc="head"):
        idx = torch.randint(0, len(x), (config.batch,), generator=g)
        flip = torch.rand(()) < 0.5
        xb, mb = (x[idx].flip(-1), masks[idx].flip(-1)) if flip else (x[idx], masks[idx])
        step = loss(head, xb, mb, config.edge_weight)
        opt.zero_grad(set_to_none=True)
        step.backward()
        opt.step()
    return head.eval().requires_grad_(False)


def save(head: Head, config: DiffDISConfig, path: Path) -> None:
    from safetensors.torch import save_file

    from ..output import write_atomically

    state = {k: v.contiguous() for k, v in head.state_dict().items()}
    write_atomically(path, lambda tmp: save_file(state, str(tmp)))
    flags = " ".join(f"--{k} {v}" for k, v in asdict(config).items() if k != "pixels")
    recipe = {"command": f"python -m stablekit.restore.diffdis {flags}" + (" --pixels" if config.pixels else "")}
    text = json.dumps(recipe | {"config": asdict(config), "in_channels": head.proj.in_channels}, indent=2)
    write_atomically(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))


def load(path: Path = HEAD) -> tuple[Head, DiffDISConfig]:
    """The head in `path` and the configuration it was trained with."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise StablekitError(f"no segmentation head at '{path}': train one with python -m stablekit.restore.diffdis")
    recipe = json.loads(Path(path).with_suffix(".json").read_text())
    config = DiffDISConfig(**recipe["config"])
    head = Head(recipe["in_channels"], config.width)
    head.load_state_dict(load_file(str(path)))
    return head.eval().requires_grad_(False), config


MULTIPLE, MAX_SIDE = 32, 256  # the embedded UNet halves its 8x-reduced latent twice


def check_image(image) -> None:
    """One-line StablekitError for an image :func:`segment` cannot take."""
    from .super_resolution import MODES

    if image.mode not in MODES:
        raise StablekitError(f"images of mode {image.mode} are not supported (use {', '.join(MODES)})")
    w, h = image.size
    if w % MULTIPLE or h % MULTIPLE or max(w, h) > MAX_SIDE:
        raise StablekitError(
            f"a {w}x{h} image is not supported: sides must be multiples of {MULTIPLE} up to {MAX_SIDE}"
        )


@torch.no_grad()
def segment(pipe, images: torch.Tensor, head: Head | None = None, config: DiffDISConfig | None = None):
    """Foreground probabilities (B, 1, H, W) of (B, 3, H, W) images in [0, 1], by the shipped head (or `head`
    with its `config`): one UNet call per image."""
    if head is None:
        head, config = load()
    feats = [] if config.pixels else features(pipe, images, config.timestep)
    return torch.sigmoid(head(head_input(feats, images, config.pixels))[:, :1])


def main(argv=None):
    p = argparse.ArgumentParser(description="Train DiffDIS's segmentation head on the embedded model's features.")
    p.add_argument("--out", type=Path, default=None, help="weights file (default: the shipped one)")
    for name, default in asdict(DiffDISConfig()).items():
        if name != "pixels":
            p.add_argument(f"--{name}", type=type(default), default=default)
    p.add_argument("--pixels", action="store_true", help="the baseline: the head on the image alone")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    config = DiffDISConfig(**{k: getattr(a, k) for k in asdict(DiffDISConfig())})
    from ..pipeline import load as load_pipeline

    pipe = load_pipeline(device="cpu")
    out = a.out or (PIXEL_HEAD if config.pixels else HEAD)
    save(train(pipe, config, progress=True), config, out)
    print(out)


if __name__ == "__main__":
    main()
