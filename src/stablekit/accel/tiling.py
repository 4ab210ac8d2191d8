"""What the any-size methods share: a UNet hook that denoises a large latent window by window, and the size check.

MultiDiffusion and shifted tiles differ only in *which* windows of the latent they run at each step.
:class:`TiledUNet` holds everything else. A hook on the UNet's forward cuts the model input into the windows of
the current step (the counted ``call.step``), runs the real UNet on batches of them (``batch`` windows per call,
windows of one size together), and puts the predictions back: where windows overlap, their predictions are
averaged. A latent that fits in one window runs as one plain call, so the output equals plain generation.

The hook wraps every other plugin's (``outermost``), so a feature cache under it sees one model call per window
batch: DeepCache stores each batch's deep features in its own slot and replays them for the same windows.
Every tensor argument whose first dimension is the batch (timesteps, text embeddings, SDXL's added conditions) is
repeated for each window in a call; ControlNet residuals, which are spatial, are refused.

While attached, the VAE decodes (and encodes) in tiles too (``tiled_vae``, diffusers' own ``enable_tiling``:
tiles of the VAE's native size blended over a quarter of their width), so a large image decodes in bounded memory.
:func:`check_size` refuses, before any work, a size the model cannot divide or the memory cannot hold.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from ..errors import StablekitError
from ..plugins import Plugin

Window = tuple[int, int, int, int]  # (top, bottom, left, right) in latent pixels


def unet_unit(unet) -> int:
    """The factor the UNet divides the latent by (2 per downsampler): window corners are multiples of it."""
    return 2 ** sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None))


@dataclass(frozen=True)
class TileConfig:
    """What both tilers take: the window or tile side in latent pixels (None: the UNet's native sample size),
    how many windows run in one UNet call, and whether the VAE decodes in tiles."""

    tile: int | None = None
    batch: int = 1
    tiled_vae: bool = True

    def _check(self) -> None:
        if self.tile is not None and (isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1):
            raise StablekitError(f"tile is a side in latent pixels, a whole number >= 1; got {self.tile!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise StablekitError(f"batch is the number of windows per UNet call, at least 1; got {self.batch!r}")


def _repeat(value, batch: int, k: int):
    """`value` with every tensor whose first dimension is `batch` repeated `k` times along it."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value.repeat(k, *([1] * (value.ndim - 1)))
    if isinstance(value, dict):
        return {key: _repeat(v, batch, k) for key, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat(v, batch, k) for v in value)
    return value


def _groups(windows: list[Window], batch: int) -> list[list[Window]]:
    """`windows` in runs of at most `batch` windows of one size, in order of first appearance."""
    sizes: dict[tuple[int, int], list[Window]] = {}
    for w in windows:
        sizes.setdefault((w[1] - w[0], w[3] - w[2]), []).append(w)
    return [same[i : i + batch] for same in sizes.values() for i in range(0, len(same), batch)]


class _TileHook(ModelHook):
    """On the UNet: run the call window by window, or as one plain call when one window covers the latent."""

    def __init__(self, plugin: TiledUNet):
        super().__init__()
        self.plugin = plugin

    def new_forward(self, module, sample, *args, **kwargs):
        forward = self.fn_ref.original_forward
        height, width = sample.shape[-2:]
        windows = self.plugin.step_windows(height, width)
        if windows == [(0, height, 0, width)]:
            self.plugin.calls += 1
            return forward(sample, *args, **kwargs)
        if kwargs.get("down_block_additional_residuals") is not None:
            raise StablekitError(f"{self.plugin.name} cannot tile ControlNet residuals; generate without ControlNet")
        return self.plugin.tiled_call(forward, sample, args, kwargs, windows)


class TiledUNet(Plugin):
    """Base of the any-size plugins: subclasses say which windows run at each step (:meth:`windows`)."""

    exclusive = ("UNet tiling",)
    outermost = True
    reach = 1.0  # the largest window's side, in tiles

    def __init__(self, *args, **params):
        super().__init__(*args, **params)
        self.pipe = None
        self.size = 0  # the tile side in latent pixels, set on attach
        self.unit = 1
        self._vae_tiling = None  # the VAE's own tiling setting, restored on detach
        self.calls = 0  # real UNet calls in the current pipeline call
        self.history: list[list[Window]] = []  # the windows of each step of the current call

    def windows(self, height: int, width: int, step: int) -> list[Window]:
        """The windows of a `height` x `width` latent at `step` (they must cover it)."""
        raise NotImplementedError

    def attach(self, pipe):
        self.pipe = pipe
        self.unit = unet_unit(pipe.unet)
        self.size = self.config.tile or pipe.unet.config.sample_size
        if self.size % self.unit:
            raise StablekitError(f"{self.name}: tile {self.size} must be a multiple of {self.unit} for this UNet")
        self.add_hook(pipe.unet, _TileHook(self))
        vae = getattr(pipe, "vae", None)
        if self.config.tiled_vae and hasattr(vae, "use_tiling"):
            self._vae_tiling = vae.use_tiling
            vae.enable_tiling()

    def detach(self, pipe):
        if self._vae_tiling is not None:
            pipe.vae.use_tiling = self._vae_tiling
        self.pipe = None
        self._vae_tiling = None

    def reset(self, call):
        super().reset(call)
        self.calls = 0
        self.history = []

    def step_windows(self, height: int, width: int) -> list[Window]:
        """The windows of this step, recorded in :attr:`history` once per step."""
        step = self.call.step
        if len(self.history) <= step:
            self.history += [[] for _ in range(step + 1 - len(self.history))]
            self.history[step] = self.windows(height, width, step)
        return self.history[step]

    def tiled_call(self, forward, sample, args, kwargs, windows: list[Window]):
        """The UNet's output for `sample`, made window by window; overlapping predictions are averaged."""
        batch = sample.shape[0]
        total = None
        out = None
        weight = torch.zeros(sample.shape[-2:], dtype=sample.dtype, device=sample.device)
        for group in _groups(windows, self.config.batch):
            crops = torch.cat([sample[..., t:b, left:r] for t, b, left, r in group])
            k = len(group)
            out = forward(crops, *_repeat(args, batch, k), **_repeat(kwargs, batch, k))
            self.calls += 1
            pred = out[0] if isinstance(out, tuple) else out.sample
            if total is None:
                total = torch.zeros((batch, pred.shape[1], *sample.shape[-2:]), dtype=pred.dtype, device=pred.device)
            for (t, b, left, r), part in zip(group, pred.chunk(k), strict=True):
                total[..., t:b, left:r] += part
                weight[t:b, left:r] += 1
        merged = total / weight.to(total.dtype)
        if isinstance(out, tuple):
            return (merged,) + tuple(out[1:])
        out.sample = merged
        return out


def available_bytes(device) -> int:
    """Memory free for a generation on `device`: the accelerator's free memory, or the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def estimate_bytes(pipe, width: int, height: int, batch: int = 1) -> int:
    """A rough peak of the memory one generation of `batch` `width` x `height` images needs beyond the weights:
    about 32 feature maps of the UNet's first level over the area one UNet call sees (the latent, or the largest
    window batch of an attached tiler), 6 of the VAE decoder's last level over the area it decodes at once, and
    the output images. Attention is counted as memory-efficient (no score matrix held)."""
    from ..plugins import attached

    f = pipe.vae_scale_factor
    area = (width // f) * (height // f)
    tiler = next((p for p in attached(pipe) if isinstance(p, TiledUNet)), None)
    if tiler is not None:
        area = min(area, int((tiler.size * tiler.reach) ** 2) * tiler.config.batch)
    elem = pipe.unet.dtype.itemsize
    unet = 32 * 2 * batch * pipe.unet.config.block_out_channels[0] * area * elem
    vae = pipe.vae
    pixels = width * height
    if getattr(vae, "use_tiling", False):
        pixels = min(pixels, vae.tile_sample_min_size**2)
    decode = 6 * batch * vae.config.block_out_channels[0] * pixels * 4
    return unet + decode + 3 * 3 * batch * width * height * 4


def check_size(pipe, width: int, height: int, batch: int = 1, free: int | None = None) -> None:
    """Refuse, before any work, a size `pipe` cannot divide or whose estimated peak (:func:`estimate_bytes`)
    exceeds `free` bytes (default: :func:`available_bytes` on the pipeline's device)."""
    m = pipe.vae_scale_factor
    if width % m or height % m:
        near = "x".join(str(max(m, round(v / m) * m)) for v in (width, height))
        raise StablekitError(f"size {width}x{height}: this model needs multiples of {m}, e.g. {near}")
    need = estimate_bytes(pipe, width, height, batch)
    free = available_bytes(pipe.device) if free is None else free
    if need > free:
        raise StablekitError(
            f"size {width}x{height} needs about {need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is free; "
            "use a smaller --size, or --accel shifted-tiles to denoise and decode it in tiles"
        )
