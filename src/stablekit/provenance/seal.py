"""SEAL: Semantic Aware Image Watermarking (Arabi, Witter, Hegde, Cohen, 2025).

The initial noise is derived from the image's own meaning, so detection needs no database of
keys and a pattern copied onto other content does not verify.

Marking: a semantic embedding ``v`` of the prompt (``embed_prompt(prompt) -> vector``, normalised)
is hashed per latent patch with SimHash: patch ``i`` gets ``bits`` signs ``sign(<r_ij, v>)`` of
random hyperplanes ``r_ij`` (Gaussian, seeded by the key). Each patch's noise (all channels of a
``patch`` x ``patch`` spatial block) is drawn from a standard Gaussian generator seeded by
(key, i, patch bits). Every patch is therefore exactly standard Gaussian, and nearby embeddings
share most patches (locality-sensitive hashing: a bit agrees with probability 1 - angle / pi).

Detection: ``embed(image) -> vector`` re-derives the expected noise from the image; the image is
inverted to its noise (DDIM, empty prompt, no guidance) and a patch *matches* when the L2 distance
between recovered and expected patch is below ``tau``. ``score`` is the fraction of matching patches.
``p_value``: for noise unrelated to the key, a patch matches with probability
``p0 = P(chi2_d < tau^2 / 2)`` (d values per patch), so the count is Binomial(k, p0). A noise copied
from another image agrees on the patches whose hashes coincide, which is far more than ``p0``
predicts; the decision therefore also requires ``match_fraction`` of the patches (the paper's
threshold count), so ``detected`` means: p-value <= fpr *and* matches >= ``match_fraction * k``.

Default embedder (for the embedded default model): image -> attribute classifier
(:mod:`stablekit.default_model.classifier`) -> a canonical caption -> MiniLM sentence embedding
(mean of the token states under the attention mask), the prompt embedded by the same MiniLM. Any
callables can be given instead (``SEAL(key, embed_prompt=...)``, ``detect(..., embed=...)``);
they must map prompts and images into one space.

Paper defaults: 64x64 latents cut into k = 1024 patches (2x2 spatial, 4 channels), b = 7 bits per
patch, tau = 2.3, a detection threshold of 50 matching patches, 50 inversion steps; BLIP-2 captions
embedded by a fine-tuned sentence transformer. Here: 2x2 patches at any latent size, b = 7,
tau = 2.3 * sqrt(d / 16) (the same per-element threshold for other channel counts), threshold
50 / 1024 of the patches. Deviations: the generation-time embedding is the prompt's (the paper
captions a proxy image generated first); consequently the noise is a deterministic function of
(key, prompt): the same prompt gives the same image whatever the generator (the paper's noise is
likewise fixed by the caption). Patch seeds come from keyed BLAKE2b instead of Python's hash().
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy import stats

from ..errors import StablekitError
from ..registry import register
from .detection import Watermark


@functools.lru_cache(maxsize=1)
def _minilm():
    from ..default_model import load_text_encoder

    return load_text_encoder()


@torch.no_grad()
def text_embedding(text: str) -> np.ndarray:
    """MiniLM sentence embedding of `text`: token states averaged under the attention mask."""
    model, tok = _minilm()
    enc = tok([text], padding=True, truncation=True, return_tensors="pt")
    states = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].to(states.dtype)
    return ((states * mask).sum(1) / mask.sum(1))[0].numpy()


def caption(pred: dict) -> str:
    """A canonical caption from :func:`stablekit.default_model.classifier.predict`'s attributes."""
    objs = []
    for i in range(pred["count"]):
        tex, col, shp = (pred[k][min(i, len(pred[k]) - 1)] for k in ("textures", "colors", "shapes"))
        objs.append(" ".join(w for w in ("" if tex == "solid" else tex, col, shp) if w))
    return "a " + " and a ".join(objs) + f" on a {pred['background']} background"


def image_embedding(image) -> np.ndarray:
    """The default SEAL image embedder: attribute classifier -> caption -> MiniLM."""
    from ..default_model.classifier import predict

    return text_embedding(caption(predict([image])[0]))


@register("watermark")
class SEAL(Watermark):
    name = "seal"

    def __init__(self, key, embed_prompt=None):
        super().__init__(key)
        self.embed_prompt = embed_prompt or text_embedding

    @classmethod
    def default_params(
        cls, shape, rng, patch: int = 2, bits: int = 7, tau: float | None = None, match_fraction: float = 50 / 1024
    ) -> dict:
        tau = 2.3 * math.sqrt(shape[0] * patch * patch / 16) if tau is None else float(tau)
        return {"patch": int(patch), "bits": int(bits), "tau": round(tau, 4), "match_fraction": float(match_fraction)}

    def setup(self, params):
        c, h, w = self.shape
        self.p, self.b = int(params["patch"]), int(params["bits"])
        self.tau, self.match_fraction = float(params["tau"]), float(params["match_fraction"])
        if self.p < 1 or h % self.p or w % self.p or not 1 <= self.b <= 64 or self.tau <= 0:
            raise StablekitError(
                f"seal: the patch size must divide {h} and {w}, 1 <= bits <= 64, tau > 0 "
                f"(got patch {self.p}, bits {self.b}, tau {self.tau})"
            )
        self.grid = (h // self.p, w // self.p)
        self.k, self.d = self.grid[0] * self.grid[1], c * self.p * self.p
        self.p0 = float(stats.chi2.cdf(self.tau**2 / 2, self.d))
        self.min_matches = max(1, math.ceil(self.match_fraction * self.k))
        self._cache = {}  # embedding dimension -> hyperplanes

    def _planes(self, dim: int) -> torch.Tensor:
        if dim not in self._cache:
            self._cache[dim] = torch.randn(
                self.k, self.b, dim, generator=self.key.generator("planes", dim), dtype=torch.float64
            )
        return self._cache[dim]

    def hash(self, vector) -> torch.Tensor:
        """SimHash bits (k, bits) of an embedding."""
        v = torch.as_tensor(np.asarray(vector, dtype=np.float64).ravel())
        if not torch.isfinite(v).all() or v.norm() == 0:
            raise StablekitError("seal: the embedding must be a finite, non-zero vector")
        return (self._planes(len(v)) @ (v / v.norm())) > 0

    def pattern(self, vector) -> torch.Tensor:
        """The expected initial noise (C, h, w) float64 of an embedding."""
        c, (gh, gw), p = self.shape[0], self.grid, self.p
        bits = self.hash(vector)
        patches = [
            torch.randn(
                c, p, p, dtype=torch.float64, generator=self.key.generator("patch", i, bytes(bits[i].tolist()))
            )
            for i in range(self.k)
        ]
        return torch.stack(patches).view(gh, gw, c, p, p).permute(2, 0, 3, 1, 4).reshape(self.shape)

    def mark(self, noise, call):
        prompts = [call.prompt] if isinstance(call.prompt, str) else call.prompt
        if not prompts or not all(isinstance(t, str) for t in prompts) or len(noise) % len(prompts):
            raise StablekitError(
                "SEAL derives the noise from the prompt text: call the pipeline with prompt=..., not prompt_embeds"
            )
        per = len(noise) // len(prompts)
        return torch.stack([self.pattern(self.embed_prompt(prompts[i // per])) for i in range(len(noise))])

    def score(self, noise, image, embed=None):
        if image is None:
            raise StablekitError("SEAL detection needs the image itself (its semantics give the expected noise)")
        diff = noise - self.pattern((embed or image_embedding)(image))
        c, (gh, gw), p = self.shape[0], self.grid, self.p
        dist = diff.view(c, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(self.k, -1).norm(dim=1)
        m = int((dist < self.tau).sum())
        return {
            "score": m / self.k,
            "p_value": float(stats.binom.sf(m - 1, self.k, self.p0)),
            "passes": m >= self.min_matches,
            "matches": m,
            "min_matches": self.min_matches,
        }
