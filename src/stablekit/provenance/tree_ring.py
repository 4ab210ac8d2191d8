"""Tree-Ring: a key of concentric rings in the Fourier transform of the initial latents.

Baseline from "Tree-Ring Watermarks: Fingerprints for Diffusion Images that are Invisible and
Robust" (Wen, Kirchenbauer, Geiping, Goldstein, NeurIPS 2023); the p-value follows the paper's
(and WAVES') chi-square test.

Marking: draw standard Gaussian latents, take the 2-D FFT of one channel, overwrite the
coefficients within `radius` of the zero frequency by the key (one value per integer ring,
``ceil(distance)``), transform back. Detection: invert the image to its initial noise (DDIM,
empty prompt, no guidance), then

* ``score``: mean absolute difference (L1) between the recovered and the key coefficients in the
  masked region (lower means marked);
* ``p_value``: with the real and imaginary parts of the masked coefficients ``r`` (one of each
  conjugate pair), the key ``k`` and ``sigma`` the standard deviation of ``r``, the statistic
  ``sum((r - k)^2) / sigma^2`` of an unmarked image (``r`` ~ N(0, sigma^2)) is non-central chi-square
  with ``len(r)`` degrees of freedom and non-centrality ``sum(k^2) / sigma^2``; the p-value is its CDF
  at the observed value.

Paper defaults: ring pattern in the last channel (3 of 4), radius 10 at 64x64 latents, 50 inversion
steps. Here the radius scales with the latent size (``round(10 * min(h, w) / 64)``, at least 1).
Deviations: (1) the key's ring values are real numbers drawn from N(0, 1) and the mask is centred
exactly on the zero frequency (excluding it), so the pattern is Hermitian and the marked latents are
real without discarding part of the key; the paper copies complex values from an FFT of Gaussian
noise into a mask offset by one pixel (including the zero frequency) and keeps the real part of the
inverse transform. (2) The FFT is orthonormal, so key values have the scale of the coefficients
they replace (E|k|^2 = E|c|^2 = 1) and the pooled latents keep mean 0, variance 1. The latents are
still *not* exactly Gaussian: the masked coefficients are fixed by the key (the distortion SEAL and
Gaussian Shading avoid).
"""

from __future__ import annotations

import torch
from scipy import stats

from ..errors import StablekitError
from ..registry import register
from .detection import Watermark


def _fft(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))


def _ifft(f: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifft2(torch.fft.ifftshift(f, dim=(-2, -1)), norm="ortho").real


@register("watermark")
class TreeRing(Watermark):
    name = "tree-ring"

    @classmethod
    def default_params(cls, shape, rng, radius: int | None = None, channel: int | None = None) -> dict:
        c, h, w = shape
        radius = max(1, int(10 * min(h, w) / 64 + 0.5)) if radius is None else int(radius)
        return {"radius": radius, "channel": c - 1 if channel is None else int(channel)}

    def setup(self, params):
        c, h, w = self.shape
        self.radius, self.channel = int(params["radius"]), int(params["channel"])
        if not 0 <= self.channel < c or not 1 <= self.radius < min(h, w) / 2:
            raise StablekitError(
                f"tree-ring needs 0 <= channel < {c} and 1 <= radius < {min(h, w) / 2:g} "
                f"(got channel {self.channel}, radius {self.radius})"
            )
        u = (torch.arange(h) - h // 2)[:, None]
        v = (torch.arange(w) - w // 2)[None]
        dist = (u**2 + v**2).double().sqrt()
        self.mask = (dist > 0) & (dist <= self.radius)
        self.half = self.mask & ((u > 0) | ((u == 0) & (v > 0)))  # one coefficient of each conjugate pair
        rings = torch.randn(self.radius, generator=self.key.generator("rings"), dtype=torch.float64)
        self.pattern = torch.zeros(h, w, dtype=torch.complex128)
        self.pattern[self.mask] = rings[dist[self.mask].ceil().long() - 1].to(torch.complex128)

    def mark(self, noise, call):
        f = _fft(noise[:, self.channel])
        f[:, self.mask] = self.pattern[self.mask]
        noise[:, self.channel] = _ifft(f)
        return noise

    def score(self, noise, image, embed=None):
        f = _fft(noise[self.channel])
        l1 = (f[self.mask] - self.pattern[self.mask]).abs().mean().item()
        r = torch.cat([f[self.half].real, f[self.half].imag])
        k = torch.cat([self.pattern[self.half].real, self.pattern[self.half].imag])
        var = r.var().item()
        p = stats.ncx2.cdf(((r - k) ** 2).sum().item() / var, df=len(r), nc=(k**2).sum().item() / var)
        return {"score": l1, "p_value": float(p)}
