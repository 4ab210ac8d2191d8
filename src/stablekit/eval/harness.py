"""What the benchmarks share: held-out world prompts, scikit-image's photos with captions, batched
generation with a fresh seed per image, labelled PNG grids (samples with prompts; tables of images
under column headers), and the pinned judge (the default model's attribute classifier) with its
metrics and a paired bootstrap of accuracy differences."""

from __future__ import annotations

import math
import random
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..latents import to_pil

PHOTOS = {
    "astronaut": "a photo of an astronaut",
    "coffee": "a cup of coffee on a saucer",
    "chelsea": "a photo of a tabby cat",
    "camera": "a black and white photo of a man with a camera",
    "rocket": "a rocket on a launch pad",
    "coins": "a black and white photo of coins",
    "moon": "a black and white photo of the surface of the moon",
    "clock": "a black and white photo of a clock",
    "brick": "a black and white photo of a brick wall",
    "gravel": "a black and white photo of gravel",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "a microscope image of stained tissue",
}


ATTRS = {"shapes": "shape", "colors": "color", "background": "background", "textures": "texture", "count": "count"}


def heldout_prompts(n_single: int, n_pair: int, seed: int):
    """Scenes (n_single with one object, then n_pair with two) and their paraphrased captions."""
    from ..default_model import world

    rng = random.Random(seed)
    scenes = [world.sample_scene(rng, two_prob=0.0) for _ in range(n_single)]
    scenes += [world.sample_scene(rng, two_prob=1.0) for _ in range(n_pair)]
    return scenes, [world.caption(s, rng) for s in scenes]


def square(im: Image.Image, size: int) -> Image.Image:
    """`im` as RGB, centre-cropped to a square and resized to `size` pixels."""
    s = min(im.size)
    box = ((im.width - s) // 2, (im.height - s) // 2, (im.width + s) // 2, (im.height + s) // 2)
    return im.convert("RGB").resize((size, size), Image.LANCZOS, box=box)


def photos(size: int, n: int | None = None) -> list[tuple[str, Image.Image]]:
    """The first `n` (default all) of scikit-image's :data:`PHOTOS`, squared to `size` pixels."""
    try:
        from skimage import data
    except ImportError:
        from ..errors import StablekitError

        raise StablekitError("the photos need scikit-image: pip install 'stablekit[bench]'") from None
    return [(name, square(Image.fromarray(getattr(data, name)()), size)) for name in list(PHOTOS)[:n]]


def bench_pipeline(a):
    """A benchmark's pipeline: ``a.model`` (None: the embedded default) on ``a.device`` in ``a.dtype`` (if the
    benchmark has one), progress bars off."""
    from ..pipeline import load

    pipe = load(a.model, device=a.device, dtype=getattr(a, "dtype", None))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe,
    prompts: list[str],
    *,
    steps: int,
    guidance: float,
    seed: int,
    batch: int = 32,
    desc: str = "generate",
    **call,
) -> tuple[torch.Tensor, float]:
    """Images (N, 3, H, W) in [0, 1] with noise seed ``seed * 100_000 + i`` for prompt i (fresh noise
    per image), and seconds per image. `call` goes to the pipeline (e.g. ``latents=``, sliced per batch; a string
    ``negative_prompt`` is used for every prompt)."""
    pipe.set_progress_bar_config(disable=True)
    out, t0 = [], time.perf_counter()
    latents = call.pop("latents", None)
    for i in range(0, len(prompts), batch):
        j = min(i + batch, len(prompts))
        gens = [torch.Generator("cpu").manual_seed(seed * 100_000 + k) for k in range(i, j)]
        extra = dict(call, **({} if latents is None else {"latents": latents[i:j]}))
        if isinstance(extra.get("negative_prompt"), str):  # the pipeline wants one per prompt of a list
            extra["negative_prompt"] = [extra["negative_prompt"]] * (j - i)
        with torch.inference_mode():
            ims = pipe(
                prompts[i:j],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                output_type="pt",
                **extra,
            ).images
        out.append(ims.float().cpu())
        print(f"{desc}: {j}/{len(prompts)}", flush=True)
    return torch.cat(out).clamp(0, 1), (time.perf_counter() - t0) / max(1, len(prompts))


def grid(images: torch.Tensor, prompts: list[str], path: Path, cols: int = 8, rows: int = 6, cell: int = 160):
    """Samples upscaled to `cell` pixels, each with its prompt in small text below."""
    n = min(len(prompts), cols * rows)
    font, line_h, chars = ImageFont.load_default(), 12, cell // 6
    text_h = 4 + line_h * max(len(textwrap.wrap(p, chars)) for p in prompts[:n])
    sheet = Image.new("RGB", (cols * cell, ((n + cols - 1) // cols) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        sheet.paste(to_pil(images[i]).resize((cell - 4, cell - 4), Image.NEAREST), (x + 2, y + 2))
        for j, line in enumerate(textwrap.wrap(prompts[i], chars)):
            draw.text((x + 3, y + cell + j * line_h), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def table_grid(rows: list[list[tuple[Image.Image | None, str]]], header: list[str], path: Path, cell: int = 128):
    """One row of (image or None, caption) cells per item, under the column `header`."""
    font, text_h = ImageFont.load_default(), 14
    sheet = Image.new("RGB", (len(header) * cell, text_h + len(rows) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, title in enumerate(header):
        draw.text((j * cell + 3, 1), title, fill="black", font=font)
    for i, row in enumerate(rows):
        y = text_h + i * (cell + text_h)
        for j, (im, caption) in enumerate(row):
            if im is not None:
                sheet.paste(im.resize((cell - 4, cell - 4), Image.NEAREST), (j * cell + 2, y + 2))
            draw.text((j * cell + 3, y + cell), caption, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def rnd(x, nd: int = 4):
    """Round for JSON: 4 significant digits (floats), ints and None unchanged, non-finite as None."""
    if x is None or isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return None if x is None else int(x)
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{nd}g}")


class Judge:
    """The default model's attribute classifier: per-image matches, features, and the metrics on them."""

    def __init__(self, scenes, seed: int):
        from ..default_model import classifier as C
        from ..default_model import world

        self.C, self.scenes, self.clf = C, scenes, C.load_classifier()
        rng = np.random.default_rng(seed)
        self.real = self.features(C.to_tensor([world.render(s, rng) for s in scenes]))
        self.real2 = self.features(C.to_tensor([world.render(s, rng) for s in scenes]))  # new noise: the scale

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        C = self.C
        return torch.cat([self.clf.features(C.to_tensor(x[i : i + 256])) for i in range(0, len(x), 256)])

    def matches(self, images: torch.Tensor) -> np.ndarray:
        """(N, 5) booleans: does the classifier find each attribute of the prompt's scene."""
        C = self.C
        preds = C.predict(images, self.clf)
        return np.array([[C.match(p, C.truth(s))[k] for k in ATTRS] for p, s in zip(preds, self.scenes, strict=False)])

    def evaluate(self, images: torch.Tensor) -> tuple[dict, np.ndarray, torch.Tensor]:
        from .metrics import frechet_distance, rate_interval

        m, feats = self.matches(images), self.features(images)
        n = len(m)
        out = {}
        for j, name in enumerate(ATTRS.values()):
            k = int(m[:, j].sum())
            out[f"{name}_acc"] = rnd(k / n)
            out[f"{name}_acc_ci95"] = [rnd(v) for v in rate_interval(k, n)]
        k = int(m.sum())
        out["attr_acc_mean"] = rnd(k / m.size)
        out["attr_acc_mean_ci95"] = [
            rnd(v) for v in rate_interval(k, m.size)
        ]  # treats the 5n judgements as independent
        joint = int(m[:, :3].all(1).sum())  # shape, colour and background all right
        out["joint_acc"], out["joint_acc_ci95"] = rnd(joint / n), [rnd(v) for v in rate_interval(joint, n)]
        out["fd_real"] = rnd(frechet_distance(feats, self.real))
        return out, m, feats


def paired_delta(m: np.ndarray, ref: np.ndarray, seed: int = 0, reps: int = 2000) -> dict:
    """Mean attribute accuracy minus the reference's, in points, with a paired bootstrap 95% interval."""
    d = m.mean(1) - ref.mean(1)  # per prompt
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(reps, len(d)))].mean(1)
    return {
        "points": rnd(100 * d.mean()),
        "ci95": [rnd(100 * np.quantile(boots, 0.025)), rnd(100 * np.quantile(boots, 0.975))],
    }
