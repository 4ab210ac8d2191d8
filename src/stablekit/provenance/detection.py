"""What the initial-noise watermarks share: the plugin base class, key creation, and detection.

Every method (:mod:`.tree_ring`, :mod:`.gaussian_shading`, :mod:`.seal`) is a :class:`Watermark`:
a plugin on the initial-latents seam built from a :class:`~.keys.Key`, which turns standard
Gaussian noise into marked latents (:meth:`Watermark.mark`) and scores a recovered noise
(:meth:`Watermark.score`). Detection is the same for all of them::

    noise = inversion of the image back to t = T      # stablekit.edit.invert, empty prompt, guidance 1
    score, p-value = method.score(noise)             # decision: p-value <= fpr

Detection inverts with DDIM (empty prompt, no guidance, the paper setting of all three methods)
through :func:`stablekit.edit.invert`; its cost in seconds is part of the result. ``latents=``
skips the VAE encoder and inverts given image latents (e.g. ``output_type="latent"``): the check
to use where the VAE is untrained. With several keys the best-matching one is reported (``user``)
and its p-value is multiplied by the number of keys (Bonferroni), so `fpr` still bounds the
false-positive rate of the whole search.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..errors import StablekitError
from ..latents import load_image, to_pil
from ..plugins import Plugin
from ..registry import CATALOGUE
from .keys import Key

FPR = 1e-6  # default false-positive rate of a decision (Gaussian Shading's setting)


class Watermark(Plugin):
    """A generative watermark: initial latents made from a key, and their detection. The plugin's config is its
    :class:`~.keys.Key` (frozen: method, parameters, secret); :meth:`setup` checks the parameters against the
    key's latent shape."""

    name = ""
    Config = Key
    inverts = True  # detection inverts the image to its initial noise; False: the method reads the image itself

    def __init__(self, key: Key):
        if not isinstance(key, Key):
            raise StablekitError(f"expected a watermark Key (stablekit.provenance.Key.load), got {type(key).__name__}")
        if key.method != self.name:
            raise StablekitError(f"this key was made for {key.method}, not {self.name}")
        super().__init__(key)
        try:
            self.shape = tuple(int(s) for s in key.params["latent_shape"])
            self.image_size = tuple(int(s) for s in key.params["image_size"])
            if len(self.shape) != 3 or len(self.image_size) != 2:
                raise ValueError("latent_shape or image_size")
            self.setup(key.params)
        except StablekitError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise StablekitError(f"the {self.name} key is corrupt: bad or missing parameter {e}") from None

    @property
    def key(self) -> Key:
        return self.config

    def __repr__(self):
        params = {k: v for k, v in self.key.params.items() if k not in ("latent_shape", "image_size")}
        shown = [f"{k}=<{len(v)} bits>" if k == "message" else f"{k}={v!r}" for k, v in params.items()]
        return f"{type(self).__name__}({', '.join([self.size_text(), *shown])})"

    # what each method defines
    @classmethod
    def default_params(cls, shape: tuple[int, int, int], rng: torch.Generator, **params) -> dict:
        """The method's parameters for latents of `shape` (C, h, w), paper defaults unless overridden."""
        return {}

    def setup(self, params: dict) -> None:
        """Validate `params` and precompute what marking and scoring need."""

    def mark(self, noise: torch.Tensor, call) -> torch.Tensor:
        """Marked latents (B, C, h, w) float64 from standard Gaussian `noise` of the same shape."""
        raise NotImplementedError

    def score(self, noise: torch.Tensor, image: Image.Image | None, embed=None) -> dict:
        """Statistics of a recovered noise (C, h, w) float64: ``score``, ``p_value`` and extras."""
        raise NotImplementedError

    # the initial-latents seam
    def make_latents(self, call, shape, generator, dtype, device):
        if tuple(shape[1:]) != self.shape:
            raise StablekitError(
                f"the pipeline asks for latents {tuple(shape[1:])} but this {self.name} key was made "
                f"for {self.size_text()} images (latents {self.shape}); generate at that size or "
                "make a key for the new size"
            )
        noise = randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=torch.float32)
        return self.mark(noise.cpu().double(), call).to(device, dtype)

    def size_text(self) -> str:
        return f"{self.image_size[1]}x{self.image_size[0]}"


def _method(name: str) -> type[Watermark]:
    methods = CATALOGUE["watermark"]
    if name not in methods:
        raise StablekitError(f"unknown watermark method '{name}'; choose one of: {', '.join(methods)}")
    return methods[name]


def latent_shape(pipe, height: int | None = None, width: int | None = None):
    """((C, h, w), (H, W)): the latent shape of `pipe` for images of H x W (default: its native size)."""
    f = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size * f
    h, w = int(height or native), int(width or native)
    if h % f or w % f or h <= 0 or w <= 0:
        raise StablekitError(f"image size {w}x{h} must be positive multiples of {f} (the VAE's factor)")
    return (pipe.unet.config.in_channels, h // f, w // f), (h, w)


def make_key(
    pipe, method: str, *, height: int | None = None, width: int | None = None, seed: int | None = None, **params
) -> Key:
    """A new key for `method` and `pipe`'s latents at H x W; `seed` makes it reproducible (tests only:
    a seeded key is guessable), else the secret comes from ``os.urandom``. Extra `params` override
    the method's defaults (see each method's ``default_params``)."""
    cls = _method(method)
    shape, size = latent_shape(pipe, height, width)
    secret = os.urandom(32) if seed is None else Key("", {}, bytes(32)).derive("seed", int(seed))
    try:
        extra = cls.default_params(shape, Key(method, {}, secret).generator("params"), **params)
    except TypeError as e:
        raise StablekitError(f"{method}: {e}") from None
    key = Key(method, {"latent_shape": list(shape), "image_size": list(size), **extra}, secret)
    cls(key)  # validates
    return key


def watermark(key: Key, method: str | None = None, **kw) -> Watermark:
    """The plugin for `key` (``stablekit.use(pipe, watermark(key))``); `method`, if given, must be the key's."""
    if not isinstance(key, Key):
        raise StablekitError(f"expected a watermark Key, got {type(key).__name__}")
    return _method(method or key.method)(key, **kw)


@dataclass
class DetectionResult:
    """One detection. `score` is the method's statistic (Tree-Ring: L1 distance in the key's Fourier
    region, lower means marked; Gaussian Shading: its z, with the bit accuracy in `details`; SEAL:
    fraction of matching patches); `p_value` the probability of a statistic at least as extreme in an
    unmarked image; `detected` the decision at false-positive rate `fpr`; `seconds` the inversion's cost."""

    method: str
    detected: bool
    score: float
    p_value: float
    fpr: float
    seconds: float
    user: int | None = None  # index of the best-matching key when several were given
    message: str | None = None  # Gaussian Shading: the decoded bits
    details: dict = field(default_factory=dict)
    stage: str = "inversion"  # what `seconds` measured: the inversion, or reading the image (no inversion)

    def __str__(self):
        verdict = "watermarked" if self.detected else "not detected"
        who = f", key #{self.user}" if self.user is not None else ""
        return (
            f"{self.method}: {verdict} (score {self.score:.4g}, p-value {self.p_value:.3g} at FPR {self.fpr:g}"
            f"{who}; {self.stage} {self.seconds:.2f} s)"
        )


def recover_noise(
    pipe,
    image: torch.Tensor | None = None,
    latents: torch.Tensor | None = None,
    *,
    steps: int = 50,
    inversion: str = "ddim",
    decoder_steps: int = 0,
) -> tuple[torch.Tensor, float]:
    """(initial noise (1, C, h, w) float64 on the CPU, seconds) by inverting `image` ((1, 3, H, W) in
    [0, 1]) or its `latents` with the empty prompt and no guidance."""
    from ..edit import invert
    from ..edit.inversion import ddim_invert
    from ..latents import Schedule, encode_prompts

    start = time.perf_counter()
    if latents is None:
        noise = invert(
            pipe, image[0], "", method=inversion, steps=steps, guidance=1.0, decoder_steps=decoder_steps
        ).latents[0]
    else:  # adapter: stablekit.edit.invert starts from pixels; this starts from the image latent
        if inversion != "ddim":
            raise StablekitError(f"latent-level detection inverts with DDIM only, not '{inversion}'")
        z0 = latents.to(pipe._execution_device, torch.float32)
        with torch.no_grad():
            noise = ddim_invert(pipe, Schedule(pipe, int(steps)), z0, encode_prompts(pipe, [""], z0), 1.0)[0]
    return noise.detach().cpu().double(), time.perf_counter() - start


def detect(
    pipe,
    image,
    keys: Key | list[Key],
    *,
    latents: torch.Tensor | None = None,
    steps: int = 50,
    inversion: str = "ddim",
    decoder_steps: int = 0,
    fpr: float = FPR,
    embed=None,
) -> DetectionResult:
    """Is `image` (path, PIL image or (3, H, W) tensor in [0, 1]) watermarked with `keys` (one key, or a
    list of keys of the same method and size: which one matched is ``user``)?

    `latents` (1, C, h, w): invert these instead of the image's VAE encoding (the image is then
    optional, except for SEAL's semantics). `inversion`: a :data:`stablekit.edit.METHODS` name;
    `decoder_steps` > 0 inverts the decoder first. `embed`: SEAL's image -> vector callable.
    """
    marks = _watermarks(keys)
    first = marks[0]
    if not 0 < fpr < 1:
        raise StablekitError(f"fpr must lie in (0, 1), got {fpr}")
    x = _pixels(pipe, image, first)
    if latents is not None and tuple(latents.shape) != (1, *first.shape):
        raise StablekitError(f"latents have shape {tuple(latents.shape)}; the key needs {(1, *first.shape)}")
    if x is None and latents is None:
        raise StablekitError("give an image or its latents")
    if not first.inverts:
        if x is None:
            raise StablekitError(f"{first.name} reads the image itself: give the image, not its latents")
        evidence, seconds = first.read(pipe, x)
    else:
        noise, seconds = recover_noise(pipe, x, latents, steps=steps, inversion=inversion, decoder_steps=decoder_steps)
        evidence = noise[0]
    pil = None if x is None else to_pil(x)
    result = _decide(first.name, [m.score(evidence, pil, embed) for m in marks], fpr, seconds)
    result.stage = "inversion" if first.inverts else "reading"
    return result


def _watermarks(keys: Key | list[Key]) -> list[Watermark]:
    """The plugins of `keys`, checked to share one method and image size."""
    marks = [watermark(k) for k in ([keys] if isinstance(keys, Key) else list(keys))]
    if not marks:
        raise StablekitError("no key given")
    if any(m.name != marks[0].name or m.shape != marks[0].shape for m in marks):
        raise StablekitError("all keys must be for the same method and image size")
    return marks


def _pixels(pipe, image, mark: Watermark) -> torch.Tensor | None:
    """`image` as (1, 3, H, W) in [0, 1], checked to be of the size `mark`'s key was made for; None stays None."""
    if image is None:
        return None
    x = load_image(pipe, image)
    h, w = x.shape[-2:]
    if (h, w) != mark.image_size:
        raise StablekitError(
            f"image is {w}x{h} but the key is for {mark.size_text()} images; detect at the size it was generated"
        )
    return (x + 1) / 2


def _decide(method: str, stats: list[dict], fpr: float, seconds: float) -> DetectionResult:
    """The result for the best-matching key's statistics, its p-value Bonferroni-corrected for the number of keys."""
    best = min(range(len(stats)), key=lambda i: stats[i]["p_value"])
    s = dict(stats[best])
    p = min(1.0, float(s.pop("p_value")) * len(stats))
    passes = s.pop("passes", True)
    return DetectionResult(
        method,
        bool(p <= fpr and passes),
        float(s.pop("score")),
        p,
        fpr,
        seconds,
        best if len(stats) > 1 else None,
        s.pop("message", None),
        s,
    )
