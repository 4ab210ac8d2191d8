"""WOUAF: a user's fingerprint modulates the VAE decoder's weights; a fingerprint reader attributes images.

From "WOUAF: Weight Modulation for User Attribution and Fingerprinting in Text-to-Image Diffusion
Models" (Kim, Basu, Liu, Yang, Chen, Ren, 2024; reference code github.com/kylemin/WOUAF).

Marking: a user's fingerprint ``phi`` (``bits`` bits, derived from the key's secret) goes through a
mapping network (an MLP) to a vector ``w``; for every modulated convolution ``l`` of the VAE decoder an
affine layer turns ``w`` into per-input-channel scales ``s_l = 1 + A_l(w)`` and the convolution's
weights become ``W_l * s_l`` (modulation along the input channels). The modulated weights are baked
into the decoder while the plugin is attached (a reversible weight edit): the user's copy of the model
is an ordinary model whose every image carries the fingerprint. The UNet, the text encoder and the
initial noise are untouched, so the mark survives any sampler and needs no inversion. Which
convolutions are modulated is recorded in the weights file (the shipped one: the last up block and
``conv_out``).

Detection: the fingerprint reader (a small CNN) maps the image (resized to the model's native size,
area resampling) to ``bits`` logits. ``score`` is the fraction of bits that match the key's
fingerprint and ``p_value`` the binomial probability of at least that many matches by chance (an
image from another model reads random bits); with several keys the best-matching user is reported and
the p-value is multiplied by the number of keys (Bonferroni).

Training (:mod:`.wouaf_train`): mapping network, affine layers and reader are trained jointly with the
base decoder frozen, on windows of latents of the default model's world (the unmodulated start of the
decoder runs once, before training); per batch, random fingerprints; loss = binary cross-entropy of
the reader on augmented images (JPEG, resized crop, Gaussian noise, blur, each at a random strength;
JPEG through a straight-through estimator) + ``quality`` x the pixel MSE between modulated and
original decodes, that weight off for the first ``warmup`` of the iterations and then ramped up (the
reader learns to read a strong mark first, then the mark is made faint).

Paper defaults: 32-bit fingerprints, an 8-layer mapping network, modulation with demodulation of all
VAE decoder convolutions, the decoder fine-tuned, a ResNet-50 reader, LPIPS + MSE quality loss,
MS-COCO latents of Stable Diffusion 2 at 512x512. Deviations: (1) a 2-layer mapping network, a
4-convolution reader and only the decoder's last up block and output convolution modulated, trained on
8x8 latent windows: sized for the 64x64 default model and training on one CPU core; (2) no
demodulation: plain scaling is the identity at ``s = 1`` and a modulated convolution is then exactly a
convolution of the channel-scaled input (how training applies it per sample); (3) the base decoder
is frozen, so the unmarked model is unchanged and a fingerprint is a weight delta of the decoder
alone; (4) pixel MSE only as quality loss (no LPIPS network); (5) the fingerprint is derived from the
key's secret, not chosen by the model owner.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from ..errors import StablekitError
from ..plugins import Plugin, WeightEdit
from ..registry import register
from .detection import Watermark

WEIGHTS = Path(__file__).parent / "weights" / "wouaf.safetensors"


def decoder_convs(vae) -> dict[str, nn.Conv2d]:
    """The VAE decoder's convolutions by name (the modulated layers)."""
    return {n: m for n, m in vae.decoder.named_modules() if isinstance(m, nn.Conv2d)}


def decoder_digest(vae) -> str:
    """A short SHA-256 of the decoder convolutions' weights: the base model a network was trained for."""
    h = hashlib.sha256()
    for name, conv in decoder_convs(vae).items():
        h.update(name.encode())
        h.update(conv.weight.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Reader(nn.Module):
    """The fingerprint reader: images (B, 3, H, W) in [0, 1] -> `bits` logits (global pooling: any size; trained
    on windows of the model's native size `size`, at which detection reads images)."""

    def __init__(self, bits: int, size: int, width: int = 64):
        super().__init__()
        self.size = size
        chans = [3, width // 2, width, width, 2 * width]
        layers = []
        for i, (a, b) in enumerate(zip(chans, chans[1:], strict=False)):
            layers += [nn.Conv2d(a, b, 3 if i == 0 else 4, 1 if i == 0 else 2, 1), nn.BatchNorm2d(b), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


class FingerprintNet(nn.Module):
    """Mapping network, one affine layer per modulated convolution, and the reader."""

    def __init__(self, convs: dict[str, int], bits: int = 32, width: int = 128, size: int = 64):
        super().__init__()
        self.bits, self.names = bits, list(convs)
        self.mapping = nn.Sequential(nn.Linear(bits, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.affine = nn.ModuleList(nn.Linear(width, c) for c in convs.values())
        for layer in self.affine:  # start near the identity: s = 1 + a small fingerprint-dependent term
            nn.init.normal_(layer.weight, std=0.1)
            nn.init.zeros_(layer.bias)
        self.reader = Reader(bits, size)

    def scales(self, phi: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-convolution input-channel scales (B, C_in) of fingerprints `phi` (B, bits) in {0, 1}."""
        w = self.mapping(phi.float() * 2 - 1)
        return {n: 1 + a(w) for n, a in zip(self.names, self.affine, strict=True)}

    @contextmanager
    def modulated(self, vae, phi: torch.Tensor):
        """Within the block, `vae`'s decoder runs with sample i modulated by fingerprint ``phi[i]`` (scaled
        convolution inputs: the same as scaled weights)."""
        scales = self.scales(phi)
        convs = decoder_convs(vae)
        handles = [
            convs[n].register_forward_pre_hook(lambda _, args, s=s: (args[0] * s[:, :, None, None].to(args[0]),))
            for n, s in scales.items()
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def deltas(self, vae, phi: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weight deltas ``W * (s - 1)`` that bake fingerprint `phi` (bits,) into `vae`'s decoder."""
        convs = decoder_convs(vae)
        with torch.no_grad():
            scales = self.scales(phi[None])
            return {
                f"vae.decoder.{n}.weight": convs[n].weight.detach().float().cpu() * (s[0] - 1)[None, :, None, None]
                for n, s in scales.items()
            }


def save_net(net: FingerprintNet, path: Path, meta: dict) -> None:
    """Write the network as safetensors with its layout and `meta` (recipe, base decoder) as metadata."""
    from safetensors.torch import save_file

    info = {"bits": net.bits, "convs": {n: a.out_features for n, a in zip(net.names, net.affine, strict=True)}}
    info.update(width=net.mapping[0].out_features, size=net.reader.size, **meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata={"wouaf": json.dumps(info)}
    )


@functools.lru_cache(maxsize=4)
def load_net(path: str) -> tuple[FingerprintNet, dict]:
    """(network, its metadata) from a file written by :func:`save_net`."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise StablekitError(f"WOUAF weights '{path}' do not exist; train them with python -m {__name__}_train")
    try:
        with safe_open(path, "pt") as f:
            info = json.loads(f.metadata()["wouaf"])
        net = FingerprintNet(info["convs"], info["bits"], info["width"], info["size"])
        net.load_state_dict(load_file(path))
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
        raise StablekitError(f"'{path}' is not a WOUAF weights file ({type(e).__name__})") from None
    return net.eval().requires_grad_(False), info


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@register("watermark")
class WOUAF(Watermark):
    name = "wouaf"
    inverts = False
    make_latents = Plugin.make_latents  # the mark lives in the decoder's weights, not in the initial latents

    @classmethod
    def default_params(cls, shape, rng, weights: str = "embedded") -> dict:
        path = WEIGHTS if weights == "embedded" else Path(weights).resolve()
        net, info = load_net(str(path))
        return {"weights": str(weights if weights == "embedded" else path), "digest": file_digest(path)}

    def setup(self, params):
        self.path = WEIGHTS if params["weights"] == "embedded" else Path(params["weights"])
        self.net, self.info = load_net(str(self.path))
        if file_digest(self.path) != params["digest"]:
            raise StablekitError(
                f"this WOUAF key was made for other fingerprint weights than '{self.path}'; use the weights it names"
            )
        g = self.key.generator("fingerprint")
        self.fingerprint = torch.randint(0, 2, (self.net.bits,), generator=g)
        self._edit = None

    def check_model(self, pipe) -> None:
        """Refuse a pipeline whose VAE decoder is not the one the fingerprint network was trained for."""
        if decoder_digest(pipe.vae) != self.info["decoder"]:
            raise StablekitError(
                "this WOUAF key's fingerprint network was trained for another model's VAE decoder; "
                "use the model it was made for"
            )

    def attach(self, pipe):
        self.check_model(pipe)
        self._edit = WeightEdit(self.net.deltas(pipe.vae, self.fingerprint))
        self._edit.attach(pipe)

    def detach(self, pipe):
        if self._edit is not None:
            self._edit.detach(pipe)
            self._edit = None

    def read(self, pipe, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(fingerprint logits (bits,), seconds) of an image (1, 3, H, W) in [0, 1]."""
        self.check_model(pipe)
        start = time.perf_counter()
        x = x.float().cpu()
        size = self.net.reader.size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="area")
        with torch.no_grad():
            logits = self.net.reader(x)[0]
        return logits, time.perf_counter() - start

    def score(self, logits, image, embed=None):
        bits = (logits > 0).long()
        m, k = int((bits == self.fingerprint).sum()), len(self.fingerprint)
        return {
            "score": m / k,
            "p_value": float(stats.binom.sf(m - 1, k, 0.5)),
            "message": "".join(map(str, bits.tolist())),
            "matches": m,
        }
