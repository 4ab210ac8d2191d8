"""Safe-SD: a graphical mark implanted during generation when the prompt holds a trigger word.

From "Safe-SD: Safe and Traceable Stable Diffusion with Text Prompt Trigger for Invisible Generative
Watermarking" (Ma, Jia, Qi, Zhou, 2024; reference code github.com/AnonymousPony/safe-sd).

The mark: a ``grid`` x ``grid`` black-and-white pattern (a QR-like graphic of ``grid**2`` bits). Its
bits are the key's message encrypted with the key: XOR with a keystream and a permutation of the cells,
both derived from the key's secret, so the pattern in an image says nothing without the key and two
keys' patterns are unrelated (:func:`encrypt`, :func:`decrypt`).

One network (:class:`SafeSDNet`, trained once per model by :mod:`.safe_sd_train`) injects and detects:

* stage 1, the graphic injector/extractor: the model's frozen VAE encoder ``E`` encodes the rendered
  pattern ``w`` into ``z_w = E(w)`` (the encoder images are made with); an injection convolution
  ``f_c`` fuses it with an image latent ``z_i`` into ``z_m = f_c([z_i, z_w])``, which the frozen VAE
  decoder turns into the marked image; the watermark decoder reads the pattern back from the image.
  Injector and decoder are trained together (pattern loss + image loss to the unmarked decode), on
  images passed through random post-processing (JPEG, resized crop, noise, blur).
* stage 2, the latent diffuser: a zero-initialised convolution feeds ``z_w`` into the UNet's input
  convolution; the diffuser is trained to denoise marked latents ``z_m`` (noised at uniform timesteps,
  v/epsilon targets as the model's) with the prompt holding the trigger word, a fraction of them with the
  empty prompt (the unconditional half of guidance sees the pattern too). The prompt trigger layer (an
  MLP over the prompt's token embeddings, max-pooled) is fitted with lambda sampling: each prompt it is
  shown holds the trigger with probability ``lambda``.

At generation (:class:`SafeSD`, a plugin) the trigger layer reads the prompt embeddings: a triggered
prompt gets the key's pattern fed to the UNet at every denoising step, in both halves of classifier-free
guidance (so guidance does not amplify it); an untriggered prompt runs the base UNet untouched (its
image is bit-identical to the unmarked model's). Detection reads the image (no inversion): decoder
logits -> bits -> decrypted with the key -> ``score`` = fraction of bits equal to the message,
``p_value`` the binomial tail (an unmarked image reads random bits); with several keys the best match is
reported, its p-value multiplied by the number of keys.

Paper defaults: QR-code images as watermarks, the full VAE decoder copied as watermark decoder reading
the fused latent, the whole UNet fine-tuned, LPIPS + GAN image losses, triggers as learned prompt tokens
mapped to one of several watermarks, lambda-sampling of the timesteps and lambda-encryption choosing
the denoising steps that see the watermark, LSUN/FFHQ/COCO at 256x256. Deviations: (1) a small
convolutional watermark decoder reading pixels, trained on decoded, augmented images (the paper's
decoder reads the fused latent; a published image has to be read from its pixels); (2) the UNet is
frozen and gets one zero-initialised input convolution (the pattern's only way in), gated by the
trigger decision, so untriggered prompts are exactly the base model: lambda sampling mixes triggered
and untriggered prompts for the trigger layer only; (3) the pattern is an input of the network (any
key's pattern, one trained network) instead of one watermark bound to each trigger by fine-tuning;
(4) encryption is XOR + permutation of the pattern's bits with the key; the paper's lambda-encryption
of timesteps is replaced by injecting at every step; (5) pixel MSE as image loss; (6) one trigger word
per trained network (recorded in its weights file), hard decision at 0.5 at generation; (7) no QR
finder patterns or error correction: the score is a bit count with a binomial p-value; (8) sized for
the 64x64 default model and training on one CPU core (8x8 pattern, a thousand world renders, hundreds
of iterations per stage).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from scipy import stats
from torch import nn

from ..errors import StablekitError
from ..plugins import Plugin
from ..registry import register
from .detection import Watermark
from .keys import Key

WEIGHTS = Path(__file__).parent / "weights" / "safe_sd.safetensors"


def keystream(key: Key, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(XOR bits (k,), cell permutation (k,)) derived from `key`'s secret."""
    g = key.generator("safe-sd", "keystream")
    return torch.randint(0, 2, (k,), generator=g), torch.randperm(k, generator=key.generator("safe-sd", "perm"))


def encrypt(bits: torch.Tensor, key: Key) -> torch.Tensor:
    """The pattern's cells (k,) in {0, 1} carrying message `bits` (k,): XOR with the keystream, then permuted."""
    xor, perm = keystream(key, len(bits))
    return (bits.long() ^ xor)[perm]


def decrypt(cells: torch.Tensor, key: Key) -> torch.Tensor:
    """The message bits (k,) of pattern `cells` (k,): the inverse of :func:`encrypt`."""
    xor, perm = keystream(key, len(cells))
    out = torch.empty_like(cells.long())
    out[perm] = cells.long()
    return out ^ xor


def render_pattern(cells: torch.Tensor, size: int) -> torch.Tensor:
    """Patterns (B, 3, size, size) in [0, 1]: cells (B, grid**2) as a black-and-white grid."""
    grid = round(cells.shape[-1] ** 0.5)
    x = cells.float().view(-1, 1, grid, grid)
    return F.interpolate(x, size=(size, size), mode="nearest").expand(-1, 3, -1, -1)


def encode(vae, x: torch.Tensor) -> torch.Tensor:
    """Scaled latent (encoder mean) of images `x` (B, 3, H, W) in [0, 1]; differentiable."""
    return vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor


def model_digest(pipe) -> str:
    """A short SHA-256 of the weights the network was trained against (VAE encoder and decoder, UNet input)."""
    h = hashlib.sha256()
    for t in (pipe.vae.encoder.conv_in.weight, pipe.vae.decoder.conv_out.weight, pipe.unet.conv_in.weight):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class SafeSDNet(nn.Module):
    """Injection convolution, watermark decoder, the UNet's pattern input and the prompt trigger layer."""

    def __init__(self, grid=8, latent_channels=4, unet_channels=32, text_dim=384, size=64):
        super().__init__()
        self.grid, self.size, c, w = grid, size, latent_channels, 64
        self.inject = nn.Conv2d(2 * c, c, 1)
        with torch.no_grad():  # start from the image latent plus half the pattern's: a visible mark to learn to read
            self.inject.weight.zero_()
            self.inject.weight[:, :c, 0, 0] = torch.eye(c)
            self.inject.weight[:, c:, 0, 0] = 0.5 * torch.eye(c)
            self.inject.bias.zero_()
        chans, layers = [3, w // 2, w, w, w], []
        for i, (a, b) in enumerate(zip(chans, chans[1:], strict=False)):
            layers += [nn.Conv2d(a, b, 3 if i == 0 else 4, 1 if i == 0 else 2, 1), nn.BatchNorm2d(b), nn.SiLU()]
        pool = nn.AdaptiveAvgPool2d(grid // 2)
        self.decoder = nn.Sequential(*layers, pool, nn.Flatten(), nn.Linear(w * (grid // 2) ** 2, grid * grid))
        self.adapter = nn.Conv2d(c, unet_channels, 3, 1, 1)
        nn.init.zeros_(self.adapter.weight)
        nn.init.zeros_(self.adapter.bias)
        self.trigger = nn.Sequential(nn.Linear(text_dim, 64), nn.SiLU(), nn.Linear(64, 1))

    def fuse(self, z_i: torch.Tensor, z_w: torch.Tensor) -> torch.Tensor:
        """The marked latent z_m of image latents `z_i` and pattern latents `z_w`."""
        return self.inject(torch.cat([z_i, z_w], 1))

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """Pattern logits (B, grid**2) of images `x` (B, 3, H, W) in [0, 1], read at the model's native size."""
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="area")
        return self.decoder(x * 2 - 1)

    def trigger_logit(self, embeds: torch.Tensor) -> torch.Tensor:
        """Per prompt (B,): the trigger layer's logit over the token embeddings (B, T, D), max-pooled."""
        return self.trigger(embeds.float()).amax(dim=(1, 2))


def save_net(net: SafeSDNet, path: Path, meta: dict) -> None:
    """Write the network as safetensors with its layout and `meta` (trigger, recipe, model digest)."""
    from safetensors.torch import save_file

    info = {"grid": net.grid, "latent_channels": net.inject.out_channels}
    info.update(unet_channels=net.adapter.out_channels, text_dim=net.trigger[0].in_features, size=net.size, **meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"safe_sd": json.dumps(info)})


@functools.lru_cache(maxsize=4)
def load_net(path: str) -> tuple[SafeSDNet, dict]:
    """(network, its metadata) from a file written by :func:`save_net`."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise StablekitError(f"Safe-SD weights '{path}' do not exist; train them with python -m {__name__}_train")
    try:
        with safe_open(path, "pt") as f:
            info = json.loads(f.metadata()["safe_sd"])
        net = SafeSDNet(info["grid"], info["latent_channels"], info["unet_channels"], info["text_dim"], info["size"])
        net.load_state_dict(load_file(path))
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
        raise StablekitError(f"'{path}' is not a Safe-SD weights file ({type(e).__name__})") from None
    return net.eval().requires_grad_(False), info


class _PatternInput(ModelHook):
    """On the UNet's input convolution: adds the pattern's features to the rows whose prompt is triggered."""

    def __init__(self, plugin: SafeSD):
        super().__init__()
        self.plugin = plugin

    def post_forward(self, module, output):
        on = self.plugin.triggered
        if on is None or not bool(on.any()):
            return output
        rows = on.repeat(len(output) // len(on)).to(output.device)  # both halves of classifier-free guidance
        z_w = self.plugin.z_w.to(output.device, output.dtype).expand(int(rows.sum()), -1, -1, -1)
        with torch.no_grad():
            extra = self.plugin.net.adapter.to(output.device, output.dtype)(z_w)
        out = output.clone()
        out[rows] = out[rows] + extra
        return out


@register("watermark")
class SafeSD(Watermark):
    name = "safe-sd"
    inverts = False
    make_latents = Plugin.make_latents  # the mark enters through the UNet, not the initial latents

    @classmethod
    def default_params(cls, shape, rng, weights: str = "embedded", message: str | None = None) -> dict:
        path = WEIGHTS if weights == "embedded" else Path(weights).resolve()
        net, info = load_net(str(path))
        k = net.grid**2
        if message is None:
            message = "".join(str(int(b)) for b in torch.randint(0, 2, (k,), generator=rng))
        return {
            "weights": str(weights if weights == "embedded" else path),
            "digest": file_digest(path),
            "trigger": info["trigger"],
            "message": str(message),
        }

    def setup(self, params):
        self.path = WEIGHTS if params["weights"] == "embedded" else Path(params["weights"])
        self.net, self.info = load_net(str(self.path))
        if file_digest(self.path) != params["digest"]:
            raise StablekitError(
                f"this Safe-SD key was made for other weights than '{self.path}'; use the weights it names"
            )
        k = self.net.grid**2
        msg = params["message"]
        if not (isinstance(msg, str) and len(msg) == k and set(msg) <= {"0", "1"}):
            raise StablekitError(f"the Safe-SD key's message must be {k} characters 0/1, got {msg!r}")
        self.message = torch.tensor([int(c) for c in msg])
        self.cells = encrypt(self.message, self.key)
        self.trigger_word = params["trigger"]
        self.z_w, self.triggered = None, None

    def check_model(self, pipe) -> None:
        """Refuse a pipeline other than the one the network was trained for."""
        if model_digest(pipe) != self.info["model"]:
            raise StablekitError(
                "this Safe-SD key's network was trained for another model; use the model it was made for"
            )

    def attach(self, pipe):
        self.check_model(pipe)
        size = self.image_size[0]
        with torch.no_grad():
            pattern = render_pattern(self.cells[None], size).to(pipe.vae.device, pipe.vae.dtype)
            self.z_w = encode(pipe.vae, pattern).float()
        self.add_hook(pipe.unet.conv_in, _PatternInput(self))

    def reset(self, call):
        super().reset(call)
        self.triggered = None

    def transform_embeds(self, call, prompt_embeds, negative_prompt_embeds):
        with torch.no_grad():
            self.triggered = self.net.trigger_logit(prompt_embeds.cpu()) > 0
        return prompt_embeds, negative_prompt_embeds

    def read(self, pipe, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(pattern logits (grid**2,), seconds) of an image (1, 3, H, W) in [0, 1]."""
        self.check_model(pipe)
        start = time.perf_counter()
        with torch.no_grad():
            logits = self.net.read(x.float().cpu())[0]
        return logits, time.perf_counter() - start

    def score(self, logits, image, embed=None):
        bits = decrypt((logits > 0).long(), self.key)
        m, k = int((bits == self.message).sum()), len(self.message)
        return {
            "score": m / k,
            "p_value": float(stats.binom.sf(m - 1, k, 0.5)),
            "message": "".join(map(str, bits.tolist())),
            "matches": m,
        }


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
