"""What the faces (command line, HTTP service, batch engine) share: sizes as WxH, quiet loading, and writing
results: atomic files, and PNGs whose text chunks say how each image was made (the same keys whichever face wrote
it)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from .errors import StablekitError
from .pipeline import DEFAULT_MODEL, load
from .plugins import SchedulerPlugin, attached
from .registry import CATALOGUE


def write_atomically(path: Path, write, mode: int = 0o666) -> None:
    """`write(tmp)` into a temp file beside `path` created with `mode` (less the umask), then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode))
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def png_info(meta: dict) -> PngInfo:
    """`meta` as PNG text chunks, one per key."""
    info = PngInfo()
    for key, value in meta.items():
        info.add_text(key, str(value))
    return info


def save_png(image, path: Path, meta: dict) -> None:
    """Write `image` with `meta` as PNG text chunks, atomically."""
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_info(meta)))


def scheduler_name(pipe) -> str:
    """The :data:`~stablekit.registry.CATALOGUE` scheduler name of `pipe`'s scheduler (its class name if none)."""
    cls = type(pipe.scheduler)
    return next((name for name, c in CATALOGUE["scheduler"].items() if c is cls), cls.__name__)


def generation_metadata(
    pipe,
    prompt: str,
    seed: int,
    *,
    negative: str | None,
    steps: int,
    guidance: float,
    guidance_rescale: float,
    size: tuple[int, int],
    scheduler: str | None,
    model: str | None,
    specs: dict[str, list[str]],
) -> dict:
    """The text chunks of a generated image: prompt, seed and settings, `scheduler` (a ``NAME[:k=v]`` spec;
    default: the pipeline's own), the attached plugins' names (schedulers aside: `scheduler` names them), and
    each non-empty list of `specs` (``{"accel": [...], "guard": [...], ...}``) joined by spaces."""
    from . import __version__

    meta = dict(
        prompt=prompt,
        seed=seed,
        negative=negative or "",
        steps=steps,
        guidance=guidance,
        guidance_rescale=guidance_rescale,
        size=f"{size[0]}x{size[1]}",
        scheduler=scheduler.strip() if scheduler else scheduler_name(pipe),
        model=model or DEFAULT_MODEL,
        plugins=",".join(p.name for p in attached(pipe) if not isinstance(p, SchedulerPlugin)),
        dtype=str(pipe.unet.dtype).removeprefix("torch."),
        stablekit=__version__,
    )
    for key, items in specs.items():
        if items:
            meta[key] = " ".join(item.strip() for item in items)
    return meta


def load_quietly(model: str | None, device: str | None, **kw):
    """The pipeline, loaded without progress bars, so that an error found after loading stays one line
    on stderr and parallel workers do not garble one another's bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        return load(model, device=device, **kw)
    finally:
        for lib in libraries:
            lib.enable_progress_bar()


def parse_size(size: str | None, what: str = "--size") -> tuple[int, int] | None:
    """``"WxH"`` -> ``(W, H)``, both positive multiples of 8; None stays None (the model's native size). `what`
    names the option or field in the one-line error."""
    if size is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size)
    if not m:
        raise StablekitError(f"{what} '{size}' is not WxH; write it like {what} 512x512")
    w, h = int(m[1]), int(m[2])
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        near = "x".join(str(max(8, round(v / 8) * 8)) for v in (w, h))
        raise StablekitError(f"{what} {w}x{h}: width and height must be positive multiples of 8, e.g. {what} {near}")
    return w, h
