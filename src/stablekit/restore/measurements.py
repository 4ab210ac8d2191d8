"""Linear measurement operators for compressed sensing and subsampling, with their exact pseudo-inverses.

Every operator takes (B, 3, H, W) images in [-1, 1] and has ``measure(x)`` (A x), ``pinv(y)`` (A^+ y, the
minimum-norm image that explains y) and ``project(x, y)`` (x + A^+ (y - A x): the image closest to x that explains
y exactly, the range-null-space decomposition), and ``ratio`` (measured numbers per pixel value).

- :class:`PixelSubsampling`: observe every channel of the cells (``block`` x ``block`` pixels) where a boolean
  mask is set; y is the image with the unobserved pixels zeroed.
- :class:`BlockGaussian`: block compressed sensing; every ``block`` x ``block`` RGB cell is measured by the same
  random matrix of ``round(ratio * 3 block^2)`` orthonormal Gaussian rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import StablekitError


def check_ratio(ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise StablekitError(f"the sampling ratio must be in (0, 1], not {ratio}")


def check_size(shape, block: int) -> None:
    h, w = shape[-2:]
    if h % block or w % block:
        raise StablekitError(f"a {w}x{h} image is not supported: each side must be a multiple of {block} pixels")


class PixelSubsampling:
    """The cells where `mask` ((H / block, W / block) booleans) is True, all channels."""

    def __init__(self, mask: torch.Tensor, block: int = 2):
        self.mask, self.block = mask.bool(), block

    @classmethod
    def random(cls, ratio: float, size: tuple[int, int], block: int = 2, g: torch.Generator | None = None):
        """A uniformly random set of round(ratio * cells) cells."""
        check_ratio(ratio)
        check_size(size, block)
        cells = (size[0] // block) * (size[1] // block)
        pick = torch.randperm(cells, generator=g)[: max(1, round(ratio * cells))]
        mask = torch.zeros(cells, dtype=torch.bool)
        mask[pick] = True
        return cls(mask.view(size[0] // block, size[1] // block), block)

    def pixels(self) -> torch.Tensor:
        """(1, 1, H, W) float mask of the observed pixels."""
        m = self.mask.float()[None, None]
        return m.repeat_interleave(self.block, -2).repeat_interleave(self.block, -1)

    @property
    def ratio(self) -> float:
        return float(self.mask.float().mean())

    def measure(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.pixels().to(x)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = self.pixels().to(x)
        return x * (1 - m) + y * m

    def with_cells(self, cells: torch.Tensor) -> PixelSubsampling:
        """A copy that also observes the flat cell indices `cells`."""
        mask = self.mask.flatten().clone()
        mask[cells] = True
        return PixelSubsampling(mask.view_as(self.mask), self.block)


class BlockGaussian:
    """y = Phi vec(cell) for every `block` x `block` RGB cell; Phi has orthonormal rows, so A^+ = A^T."""

    def __init__(self, ratio: float, block: int = 8, seed: int = 0):
        check_ratio(ratio)
        n = 3 * block * block
        gaussian = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        q, _ = torch.linalg.qr(gaussian)
        self.phi = q[:, : max(1, round(ratio * n))].T.float().contiguous()
        self.block = block

    @property
    def ratio(self) -> float:
        return len(self.phi) / self.phi.shape[1]

    def measure(self, x: torch.Tensor) -> torch.Tensor:
        check_size(x.shape, self.block)
        return self.phi.to(x) @ F.unfold(x, self.block, stride=self.block)

    def pinv(self, y: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        cells = y.shape[-1]
        size = size or (int(cells**0.5) * self.block,) * 2
        return F.fold(self.phi.to(y).T @ y, size, self.block, stride=self.block)

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + self.pinv(y - self.measure(x), tuple(x.shape[-2:]))
