"""Optimal boundary conditions: sample a diffusion super-resolution model's ODE from one searched starting point.

Paper: "Solving Diffusion ODEs with Optimal Boundary Conditions for Better Image Super-Resolution" (Ma, Yang,
Yang, Fu and Liu, ICLR 2024). Written from the paper; no reference code is used.

Implemented: sampled by its diffusion ODE (DDIM with eta 0), a diffusion SR model is a deterministic map
``x0 = h(x_T, y)`` of the boundary condition ``x_T`` and the low-resolution image ``y``, and its quality
fluctuates with ``x_T``. The paper shows that an approximately optimal ``x_T`` is shared by all low-resolution
images and finds it by Monte-Carlo search: draw candidates ``x_T ~ N(0, I)``, score each by the mean loss of
``h(x_T, y_i)`` against the high-resolution ``x_i`` over a reference set of pairs, keep the best. Every later
image is then sampled from that one ``x_T``: the same number of network calls as the plain sampler, no training.
Applied here to both SR models of the package: ResShift (:mod:`.resshift`, the default), whose boundary condition
is the noise of its start ``x_T = y0 + kappa sqrt(eta_T) noise`` sampled by the chain's deterministic form
(:meth:`.ResShift.sample_ode`), and the conditional diffusion model (:mod:`.sr_diffusion`) by DDIM. The search is
``python -m stablekit.restore.obc --model resshift|sr_diffusion``; its result ships as
``weights/obc_<model>_x4.safetensors`` with its recipe next to it.

Defaults: 64 candidates, 16 reference pairs (12 world scenes and 4 crops of the training photos, all from the
networks' training seed, never the held-out ones); ResShift's 4 steps, 10 DDIM steps for the diffusion model.

Deviations:
1. The search loss is the mean squared error (PSNR), not LPIPS: no LPIPS network is available offline.
2. Far fewer candidates and references than the paper's search, to fit a few minutes of one CPU core.
3. The boundary condition is searched at 64x64 (the embedded world's size); an image of another size starts from
   the periodic extension of it, cropped (the paper does not say how it covers other sizes).
4. The underlying models are this package's small, briefly trained networks, not SR3 or its successors; the paper
   does not treat ResShift, whose deterministic chain here is our derivation (DDIM's construction on its
   marginals).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import StablekitError
from . import sr_net
from .resshift import ResShift
from .sr_diffusion import SRDiffusion, SRDiffusionConfig

MODELS = ("resshift", "sr_diffusion")
STEPS = {"resshift": ResShift().config.steps, "sr_diffusion": 10}


def boundary_path(model: str) -> Path:
    return sr_net.WEIGHTS / f"obc_{model}_x4.safetensors"


def ode(model: str, steps: int):
    """`model`'s deterministic sampler: (net, y0, x_T) -> x0, images in [-1, 1]."""
    if model == "resshift":
        return ResShift().sample_ode
    return lambda net, y0, x_T: SRDiffusion(SRDiffusionConfig(steps=steps)).sample(net, y0, x_T=x_T)


@dataclass(frozen=True)
class OBCConfig:
    """`candidates` boundary conditions of `size` pixels for `model`, scored on `references` pairs with `steps`
    sampling steps (0: the model's default), `batch` images per network call; `seed` fixes the candidates and the
    reference images."""

    model: str = "resshift"
    candidates: int = 64
    references: int = 16
    steps: int = 0
    size: int = 64
    batch: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.model not in MODELS:
            raise StablekitError(f"unknown model '{self.model}' (one of {', '.join(MODELS)})")
        if min(self.candidates, self.references, self.batch) < 1 or self.steps < 0:
            raise StablekitError("candidates, references and batch must be >= 1, steps >= 0")
        if self.model == "resshift" and self.steps not in (0, STEPS["resshift"]):
            raise StablekitError(f"ResShift's chain has {STEPS['resshift']} steps, not {self.steps}")

    @property
    def sampling_steps(self) -> int:
        return self.steps or STEPS[self.model]
        if self.size % sr_net.SCALE or not 16 <= self.size <= 256:
            raise StablekitError(f"size must be a multiple of {sr_net.SCALE} in 16 .. 256, not {self.size}")


def reference_images(config: OBCConfig) -> torch.Tensor:
    """The reference set's high-resolution images, (references, 3, size, size) in [0, 1]: world scenes and a
    quarter of crops of the training photos, from the training seed."""
    photos = config.references // 4
    parts = [sr_net.world_images(config.references - photos, config.seed)[..., : config.size, : config.size]]
    if photos:
        parts.append(sr_net.photo_crops(sr_net.TRAIN_PHOTOS, photos, config.seed, config.size))
    return torch.cat(parts)


def fit(boundary: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The (3, s, s) boundary condition extended periodically and cropped to `shape` (B, 3, H, W)."""
    h, w = shape[-2:]
    reps = (-(-h // boundary.shape[-2]), -(-w // boundary.shape[-1]))
    return boundary.repeat(1, *reps)[:, :h, :w].expand(shape[0], -1, -1, -1)


@torch.no_grad()
def losses(net, boundaries: torch.Tensor, hr: torch.Tensor, config: OBCConfig, progress: bool = False):
    """Mean squared error (images in [-1, 1]) over the pairs `hr` of the ODE sample from each boundary condition."""
    from tqdm import tqdm

    sample, batch = ode(config.model, config.sampling_steps), config.batch
    y0 = sr_net.upsample(sr_net.degrade(hr)) * 2 - 1
    out = []
    for bc in tqdm(boundaries, disable=not progress, desc="boundary conditions"):
        err = 0.0
        for i in range(0, len(hr), batch):
            y = y0[i : i + batch]
            x0 = sample(net, y, fit(bc, y.shape))
            err += (x0 - (hr[i : i + batch] * 2 - 1)).pow(2).sum().item()
        out.append(err / hr.numel())
    return torch.tensor(out)


def search(net, hr: torch.Tensor, config: OBCConfig = OBCConfig(), progress: bool = False):
    """The candidate boundary condition with the lowest loss on the references `hr`, and every candidate's loss."""
    g = torch.Generator().manual_seed(config.seed)
    boundaries = torch.randn(config.candidates, 3, config.size, config.size, generator=g)
    scores = losses(net, boundaries, hr, config, progress)
    return boundaries[int(scores.argmin())].clone(), scores


def load_boundary(model: str = "resshift") -> torch.Tensor:
    from safetensors.torch import load_file

    path = boundary_path(model)
    if not path.is_file():
        raise StablekitError(f"no boundary condition at '{path}': search one with python -m stablekit.restore.obc")
    return load_file(str(path))["x_T"]


def super_resolve(
    lr: torch.Tensor, net=None, boundary=None, model: str = "resshift", steps: int = 0, seed: int = 0
) -> tuple[torch.Tensor, int]:
    """(B, 3, h, w) low-resolution images in [0, 1] -> (B, 3, 4h, 4w) by `model`'s shipped network and deterministic
    sampler from its shipped boundary condition (or `net`, `boundary`), with `steps` (0: the model's default), and
    the number of network calls. `seed` is unused: the result is deterministic."""
    steps = steps or STEPS[model]
    net = net if net is not None else sr_net.load_net(sr_net.WEIGHTS / f"{model}_x4.safetensors")
    boundary = boundary if boundary is not None else load_boundary(model)
    y0 = sr_net.upsample(lr) * 2 - 1
    out = ode(model, steps)(net, y0, fit(boundary, y0.shape))
    return ((out + 1) / 2).clamp(0, 1), steps


def save_boundary(boundary: torch.Tensor, path: Path, recipe: dict) -> None:
    from safetensors.torch import save_file

    from ..output import write_atomically

    write_atomically(path, lambda tmp: save_file({"x_T": boundary.contiguous()}, str(tmp)))
    text = json.dumps(recipe, indent=2)
    write_atomically(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))


def main(argv=None):
    p = argparse.ArgumentParser(description="Search the optimal boundary condition of a shipped SR model.")
    p.add_argument("--out", type=Path, default=None, help="default: the shipped file of --model")
    for name, default in asdict(OBCConfig()).items():
        p.add_argument(f"--{name}", type=type(default), default=default)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    config = OBCConfig(**{k: getattr(a, k) for k in asdict(OBCConfig())})
    net = sr_net.load_net(sr_net.WEIGHTS / f"{config.model}_x4.safetensors")
    best, scores = search(net, reference_images(config), config, progress=True)
    recipe = {
        "command": "python -m stablekit.restore.obc " + " ".join(f"--{k} {v}" for k, v in asdict(config).items()),
        "config": asdict(config),
        "network": f"{config.model}_x4.safetensors",
        "sampling_steps": config.sampling_steps,
        "loss": "mean squared error, images in [-1, 1]",
        "best_loss": float(scores.min()),
        "median_loss": float(scores.median()),
    }
    out = a.out or boundary_path(config.model)
    save_boundary(best, out, recipe)
    print(out)


if __name__ == "__main__":
    main()
