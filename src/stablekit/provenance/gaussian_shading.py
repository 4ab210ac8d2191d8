"""Gaussian Shading: a multi-bit message, encrypted, sampled into the initial latents losslessly.

Baseline from "Gaussian Shading: Provable Performance-Lossless Image Watermarking for Diffusion
Models" (Yang, Zeng, Zhang, Chen, Wang, Ma, Yu, CVPR 2024).

Marking: the key's message (``bits`` long) is diffused over the latent by tiling it
``channel_copies`` times over the channels and ``hw_copies`` x ``hw_copies`` times over the spatial
grid (``Tensor.repeat``, so copies of a bit lie far apart), then encrypted by XOR with a ChaCha20
keystream (``cryptography``; key and nonce derived from the key file's secret). Each latent element
carries ``bits_per_element`` = l encrypted bits, read as an integer y in [0, 2^l), and is drawn from
the standard normal restricted to the y-th of 2^l equal-probability intervals:
``z = Phi^-1((y + u) / 2^l)`` with ``u = Phi(n)`` uniform, ``n`` the pipeline's own Gaussian draw.
As the ciphertext is uniform, ``z`` is exactly standard Gaussian.

Decoding: invert the image to its noise (DDIM, empty prompt, no guidance), ``y = floor(2^l Phi(z))``,
decrypt, majority vote over the copies (a tie gives 0, as in the paper's code): the ``message``, its
``bit_accuracy`` against the key's and ``bits_p_value``, the binomial probability of at least that many
matching bits by chance (the paper's test, written as a p-value).

Detection (our deviation): ``score`` is ``z = sum_i s_i x_i / ||x||`` over every latent ``x_i`` of the
recovered noise, ``s_i = +-1`` the half of the Gaussian the key put latent ``i`` in, and ``p_value =
1 - Phi(z)`` (for a key independent of the image, ``z`` is standard normal). The paper thresholds the
bit accuracy of the majority vote, which keeps only signs and loses ties; ``z`` keeps every magnitude.
Where inversion recovers the noise only weakly, as on the default model, the difference is large
(benchmarks/RESULTS.md, "Watermarks"). With several keys (one per user) detection reports the key of
smallest p-value.

Paper defaults: channel_copies 1, hw_copies 8 at 64x64 latents (256 bits), l = 1, FPR 1e-6,
50 inversion steps. Here ``hw_copies`` scales with the latent (``round(8 * min(h, w) / 64)``) and is
lowered until it divides the latent and the message has at least 64 bits; 256 bits at every
square size that is a multiple of 8. Deviations: the nonce is fixed per key (derived from it), so
all images of one key share the ciphertext: each is exactly Gaussian and lossless over keys, but
images of one key agree in their latents' signs (the paper's experiments draw a fresh key per
image); ``u`` is clamped to [1e-15, 1 - 1e-15] to keep ``Phi^-1`` finite.
"""

from __future__ import annotations

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from ..errors import StablekitError
from ..registry import register
from .detection import Watermark

MIN_BITS = 64


@register("watermark")
class GaussianShading(Watermark):
    name = "gaussian-shading"

    @classmethod
    def default_params(
        cls,
        shape,
        rng,
        channel_copies: int = 1,
        hw_copies: int | None = None,
        bits_per_element: int = 1,
        message: str | None = None,
    ) -> dict:
        c, h, w = shape
        fc, per = int(channel_copies), int(bits_per_element)
        if hw_copies is None:
            hw_copies = max(1, int(8 * min(h, w) / 64 + 0.5))
            while hw_copies > 1 and (
                h % hw_copies or w % hw_copies or per * (c // fc) * (h // hw_copies) * (w // hw_copies) < MIN_BITS
            ):
                hw_copies -= 1
        n = per * (c // fc) * (h // int(hw_copies)) * (w // int(hw_copies))
        if message is None:
            message = "".join(map(str, torch.randint(0, 2, (n,), generator=rng).tolist()))
        return {"channel_copies": fc, "hw_copies": int(hw_copies), "bits_per_element": per, "message": str(message)}

    def setup(self, params):
        c, h, w = self.shape
        self.fc, self.f = int(params["channel_copies"]), int(params["hw_copies"])
        self.l = int(params["bits_per_element"])
        if min(self.fc, self.f, self.l) < 1 or c % self.fc or h % self.f or w % self.f or self.l > 8:
            raise StablekitError(
                f"gaussian-shading: channel_copies must divide {c}, hw_copies {h} and {w}, and "
                f"1 <= bits_per_element <= 8 (got {self.fc}, {self.f}, {self.l})"
            )
        self.grid = (c // self.fc, h // self.f, w // self.f, self.l)
        n = int(np.prod(self.grid))
        msg = str(params["message"])
        if len(msg) != n or set(msg) - {"0", "1"}:
            raise StablekitError(
                f"gaussian-shading: the message must be {n} characters 0/1 for latents {self.shape} "
                f"with these copy factors, got {len(msg)} characters"
            )
        if n < MIN_BITS:
            raise StablekitError(
                f"gaussian-shading: the message has {n} bits; at least {MIN_BITS} are needed "
                "(fewer copies or a larger image)"
            )
        self.message = torch.tensor([int(b) for b in msg], dtype=torch.uint8)
        size = c * h * w * self.l
        cipher = Cipher(algorithms.ChaCha20(self.key.derive("chacha20"), self.key.derive("nonce")[:16]), mode=None)
        stream = cipher.encryptor().update(bytes((size + 7) // 8))
        bits = np.unpackbits(np.frombuffer(stream, np.uint8))[:size]
        self.stream = torch.from_numpy(bits.copy()).view(c, h, w, self.l)
        self.weights = 2 ** torch.arange(self.l - 1, -1, -1)
        self.bits = self.message.view(self.grid).repeat(self.fc, self.f, self.f, 1) ^ self.stream
        self.signs = self.bits[..., 0].double() * 2 - 1  # the top bit: which half of the Gaussian each latent is in

    def mark(self, noise, call):
        y = (self.bits.long() * self.weights).sum(-1).double()
        u = torch.special.ndtr(noise).clamp(1e-15, 1 - 1e-15)
        return torch.special.ndtri((y + u) / 2**self.l)

    def decode(self, noise: torch.Tensor) -> torch.Tensor:
        """The message bits (uint8) read from a noise (C, h, w) by majority vote."""
        y = (torch.special.ndtr(noise) * 2**self.l).floor().long().clamp(0, 2**self.l - 1)
        bits = ((y[..., None] // self.weights) % 2).to(torch.uint8) ^ self.stream
        c, h, w, per = self.grid
        votes = bits.view(self.fc, c, self.f, h, self.f, w, per).double().mean((0, 2, 4))
        return (votes > 0.5).to(torch.uint8).flatten()

    def score(self, noise, image, embed=None):
        bits = self.decode(noise)
        k = int((bits == self.message).sum())
        z = float((self.signs * noise).sum() / noise.norm())
        return {
            "score": z,
            "p_value": float(stats.norm.sf(z)),
            "message": "".join(map(str, bits.tolist())),
            "bit_accuracy": k / len(bits),
            "bits_p_value": float(stats.binom.sf(k - 1, len(bits), 0.5)),
        }
