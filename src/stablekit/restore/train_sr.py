"""Train the shipped super-resolution networks: ``python -m stablekit.restore.train_sr --method resshift`` (and
``--method sr_diffusion`` for the baseline). Both use the same data, network, optimiser and budget; the weights
go to ``restore/weights/<method>_x4.safetensors`` with the recipe that produced them next to it (``.json``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import StablekitError
from . import sr_net
from .resshift import ResShift
from .sr_diffusion import SRDiffusion

METHODS = {"resshift": ResShift, "sr_diffusion": SRDiffusion}


@dataclass(frozen=True)
class TrainConfig:
    """`iters` Adam steps at learning rate `lr` on batches of `batch` random `crop`-pixel crops from `scenes` world
    scenes and `photos` crops of the training photos; `seed` fixes data, initialisation and noise."""

    iters: int = 500
    batch: int = 16
    crop: int = 32
    lr: float = 1e-3
    scenes: int = 3000
    photos: int = 600
    seed: int = 0

    def __post_init__(self):
        if self.crop % sr_net.SCALE or not 4 * sr_net.SCALE <= self.crop <= 64:
            raise StablekitError(f"crop must be a multiple of {sr_net.SCALE} in 16 .. 64, not {self.crop}")
        if min(self.iters, self.batch, self.scenes + self.photos) < 1:
            raise StablekitError("iters, batch and the number of training images must be >= 1")


def training_images(cfg: TrainConfig) -> torch.Tensor:
    parts = [sr_net.world_images(cfg.scenes, cfg.seed)]
    if cfg.photos:
        parts.append(sr_net.photo_crops(sr_net.TRAIN_PHOTOS, cfg.photos, cfg.seed))
    return torch.cat(parts)


def train(method: str, cfg: TrainConfig = TrainConfig(), progress: bool = False, log=None):
    """A network trained for `method`'s chain; `log(i, loss)` is called every 50 iterations."""
    from tqdm import tqdm

    chain = METHODS[method]()
    hr_all = training_images(cfg) * 2 - 1
    net = sr_net.make_net(cfg.seed).train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    for i in tqdm(range(cfg.iters), disable=not progress, desc=method):
        idx = torch.randint(0, len(hr_all), (cfg.batch,), generator=g)
        x0 = sr_net.random_crops(hr_all[idx], cfg.crop, g)
        y0 = sr_net.upsample(sr_net.degrade((x0 + 1) / 2)) * 2 - 1
        loss = chain.loss(net, x0, y0, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and i % 50 == 0:
            log(i, loss.item())
    return net.eval().requires_grad_(False), chain


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=list(METHODS), required=True)
    p.add_argument("--out", type=Path, default=None, help="weights file (default: the shipped one)")
    for name, default in TrainConfig().__dict__.items():
        p.add_argument(f"--{name}", type=type(default), default=default)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = TrainConfig(**{k: getattr(a, k) for k in TrainConfig().__dict__})
    net, chain = train(a.method, cfg, progress=True)
    out = a.out or sr_net.WEIGHTS / f"{a.method}_x{sr_net.SCALE}.safetensors"
    recipe = {
        "command": f"python -m stablekit.restore.train_sr --method {a.method} "
        + " ".join(f"--{k} {v}" for k, v in cfg.__dict__.items()),
        "chain": chain.recipe(),
        "train": cfg.__dict__,
        "network": {k: list(v) if isinstance(v, tuple) else v for k, v in sr_net.UNET.items()},
        "scale": sr_net.SCALE,
        "train_photos": list(sr_net.TRAIN_PHOTOS),
    }
    sr_net.save_net(net, out, recipe)
    print(out)


if __name__ == "__main__":
    main()
