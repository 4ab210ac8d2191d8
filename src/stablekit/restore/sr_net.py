"""What the super-resolution methods share: the degradation, the training pairs, the denoising network and its
shipped weights.

**Degradation.** A high-resolution image is reduced by `scale` with an anti-aliased bicubic filter; the network's
condition is that low-resolution image brought back to full size by bicubic interpolation (as ResShift feeds it).

**Training pairs.** Scenes of the embedded world (:mod:`stablekit.default_model.world`) rendered at 64x64 with
faint sensor noise, and 64x64 crops of a few scikit-image photos, flipped at random; training sees random aligned
crops, the network being fully convolutional. The photos held out for evaluation are never trained on.

**Network.** A small convolutional UNet (diffusers' ``UNet2DModel``, no attention) that takes the noisy state and
the upsampled condition stacked on the channel axis and the step index as its timestep.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

WEIGHTS = Path(__file__).parent / "weights"
SCALE = 4  # the scale the shipped networks were trained for
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
HELDOUT_PHOTOS = ("chelsea", "colorwheel", "retina")
UNET = dict(
    in_channels=6,
    out_channels=3,
    block_out_channels=(16, 32, 64),
    down_block_types=("DownBlock2D",) * 3,
    up_block_types=("UpBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=8,
)


def degrade(hr: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] reduced `scale` times by anti-aliased bicubic filtering."""
    h, w = hr.shape[-2:]
    lr = F.interpolate(hr, size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False)
    return lr.clamp(0, 1)


def upsample(lr: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    """Bicubic interpolation of (B, 3, h, w) images to (B, 3, h * scale, w * scale), clamped to [0, 1]."""
    h, w = lr.shape[-2:]
    return F.interpolate(lr, size=(h * scale, w * scale), mode="bicubic", align_corners=False).clamp(0, 1)


def world_images(n: int, seed: int) -> torch.Tensor:
    """`n` scenes of the embedded world as (n, 3, 64, 64) in [0, 1], with faint sensor noise."""
    from ..default_model import world
    from ..latents import to_tensor

    rng, noise = random.Random(seed), np.random.default_rng(seed)
    return torch.stack([to_tensor(world.render(world.sample_scene(rng), noise)) for _ in range(n)])


def photo_crops(names: tuple[str, ...], n: int, seed: int, size: int = 64) -> torch.Tensor:
    """`n` crops of `size` pixels from scikit-image photos `names`, each photo first reduced so that its short
    side is 2 to 4 crops long, as (n, 3, size, size) in [0, 1]."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in names]
    out = []
    for i in range(n):
        photo = photos[i % len(names)]
        short = int(rng.integers(2 * size, 4 * size + 1))
        k = short / min(photo.size)
        photo = photo.resize((max(size, round(photo.width * k)), max(size, round(photo.height * k))), Image.BICUBIC)
        x, y = int(rng.integers(0, photo.width - size + 1)), int(rng.integers(0, photo.height - size + 1))
        arr = np.asarray(photo.crop((x, y, x + size, y + size)), dtype=np.float32) / 255
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out)


def random_crops(hr: torch.Tensor, size: int, g: torch.Generator, scale: int = SCALE) -> torch.Tensor:
    """One random crop of `size` pixels per image, at a position aligned to `scale`, flipped at random."""
    h = hr.shape[-1]
    pos = torch.randint(0, (h - size) // scale + 1, (len(hr), 2), generator=g) * scale
    crops = torch.stack([im[:, y : y + size, x : x + size] for im, (y, x) in zip(hr, pos.tolist(), strict=True)])
    flip = torch.rand(len(hr), generator=g) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


def make_net(seed: int = 0):
    """A fresh denoising UNet of the shared configuration."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**UNET)


def save_net(net, path: Path, recipe: dict) -> None:
    """Write the network's weights to `path` (safetensors) and `recipe` next to it (``.json``)."""
    from safetensors.torch import save_file

    from ..output import write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    write_atomically(path, lambda tmp: save_file(state, str(tmp)))
    text = json.dumps(recipe, indent=2)
    write_atomically(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))


def load_net(path: Path):
    """The network whose weights are in `path`, in eval mode; its recipe is ``path.with_suffix('.json')``."""
    from safetensors.torch import load_file

    from ..errors import StablekitError

    if not Path(path).is_file():
        raise StablekitError(f"no super-resolution weights at '{path}': train them with python -m stablekit.restore")
    net = make_net()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)
