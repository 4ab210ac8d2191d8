"""The inversion benchmark's work (``benchmarks/inversion.py``): one worker holds the pipeline and the judge, and
turns a unit -- a method and a batch of world images or photos -- into that batch's reconstruction metrics, edit
results and grid cells. The benchmark hands the units to :func:`stablekit.batch.map_units`: this process, local
processes (``--workers``) or Ray actors (``--ray``; this module and ``_common`` travel to them by value)."""

from __future__ import annotations

from types import SimpleNamespace

import _common
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

EDITS = {"color": "colors", "shape": "shapes"}  # edit -> the classifier's attribute list


class Evaluator:
    """A worker: `settings` are the benchmark's ``steps``, ``decoder_steps`` and ``controller``; `classifier` the
    judge's weights (None: shipped); `pipe` this process's pipeline (None: loaded from `model`)."""

    def __init__(self, model, device, threads, settings: dict, classifier=None, *, pipe=None):
        from stablekit.default_model import classifier as C
        from stablekit.pipeline import load

        if threads:
            torch.set_num_threads(threads)
        self.pipe = load(model, device=device) if pipe is None else pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.clf = C.load_classifier(*([classifier] if classifier else []))
        self.a = SimpleNamespace(**settings)

    def render(self, unit) -> list[dict]:
        """``[{"rec": metrics per image, "edits": {edit: rows}, "cells": grid rows}]`` of one unit
        ``(method, "world" or "photos", items)``."""
        method, kind, items = unit
        return [self.world(method, items) if kind == "world" else self.photos(method, items)]

    def world(self, method: str, items: list) -> dict:
        """World images ``(image, prompt, scene, targets, source prediction)``: reconstruction, then each edit."""
        from stablekit.default_model import classifier as C
        from stablekit.default_model import world
        from stablekit.edit import edit
        from stablekit.eval.metrics import psnr

        pipe, a = self.pipe, self.a
        images, prompts, scenes, targets, source_preds = (list(x) for x in zip(*items, strict=False))
        inv, outs, metrics = reconstruction(pipe, method, images, prompts, a)
        rows = [[(out, f"{m['pixel_psnr_db']:.1f} dB")] for out, m in zip(outs, metrics, strict=False)]
        edits = {}
        for name in [] if inv is None else EDITS:
            olds = [getattr(sc.objects[0], name) for sc in scenes]
            words, edited = zip(*(t[name] for t in targets), strict=False)
            t0 = _common.clock(pipe.device)
            results = edit(
                pipe,
                inv,
                prompts,
                [world.canonical_caption(t) for t in edited],
                method=method,
                controller=controller(a.controller, olds[0], words[0]),
            )  # blend: batch 1
            seconds = (_common.clock(pipe.device) - t0) / len(results)
            edits[name] = []
            for k, (result, pred) in enumerate(zip(results, C.predict(results, self.clf), strict=False)):
                keep = outside(scenes[k], edited[k], images[k].width)
                edits[name].append(
                    {
                        "success": words[k] in pred[EDITS[name]],
                        "seconds": seconds,
                        "background": pred["background"] == source_preds[k]["background"],
                        "psnr_outside_db": psnr(pixels(result)[keep], pixels(images[k])[keep]),
                    }
                )
                rows[k].append((result, f"{olds[k]}->{words[k]}"))
        return {"rec": metrics, "edits": edits, "cells": rows}

    def photos(self, method: str, items: list) -> dict:
        """Photos ``(name, image)``: reconstruction only."""
        from stablekit.eval.harness import PHOTOS

        names, images = (list(x) for x in zip(*items, strict=False))
        inv, outs, metrics = reconstruction(self.pipe, method, images, [PHOTOS[n] for n in names], self.a)
        cells = [
            [(out, f"{m['pixel_psnr_db']:.1f} dB")] + [(None, "")] * (0 if inv is None else len(EDITS))
            for out, m in zip(outs, metrics, strict=False)
        ]
        return {"rec": metrics, "edits": {}, "cells": cells}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255


def outside(scene, target, size: int) -> np.ndarray:
    """Pixels (size x size, bool) covered by neither the first object before nor after the edit."""
    from stablekit.default_model import world

    cover = np.maximum(world.object_mask(scene.objects[0]), world.object_mask(target.objects[0]))
    cover = F.interpolate(torch.from_numpy(cover)[None, None], size=(size, size), mode="area")[0, 0].numpy()
    return cover == 0


def reconstruction(pipe, method: str, images: list[Image.Image], prompts: list[str], a):
    """(what `edit` takes, or None; reconstructed images; metrics per image) for a batch of images. Method "vae"
    is the encode-decode round trip; "infedit" inverts nothing: it gives back the images, and reconstructs by
    editing to the source prompts. Seconds are the batch's divided by its images."""
    from stablekit.edit import decode, edit, invert, reconstruct
    from stablekit.edit.inversion import load_images
    from stablekit.latents import encode_image

    t0 = _common.clock(pipe.device)
    if method == "infedit":
        outs = edit(pipe, images, prompts, prompts, method="infedit", decoder_steps=a.decoder_steps)
        t1 = _common.clock(pipe.device)
        z, z0 = (encode_image(pipe, load_images(pipe, x)).double().cpu() for x in (outs, images))
        return images, outs, _metrics(images, outs, z, z0, (t1 - t0) / len(images), 0.0)
    if method == "vae":
        inv, z0 = None, encode_image(pipe, load_images(pipe, images), a.decoder_steps)
        z, t1 = z0, _common.clock(pipe.device)
    else:
        inv = invert(pipe, images, prompts, method, a.steps, decoder_steps=a.decoder_steps)
        t1 = _common.clock(pipe.device)
        z, z0 = reconstruct(pipe, inv)[-1], inv.latents[-1]
    outs = [decode(pipe, row[None]) for row in z]
    t2 = _common.clock(pipe.device)
    n = len(images)
    return inv, outs, _metrics(images, outs, z.double().cpu(), z0.double().cpu(), (t1 - t0) / n, (t2 - t1) / n)


def _metrics(images, outs, z, z0, seconds_invert: float, seconds_reconstruct: float) -> list[dict]:
    from stablekit.eval.metrics import psnr

    rows = []
    for image, out, zi, z0i in zip(images, outs, z, z0, strict=False):
        x, y = pixels(image), pixels(out)
        rows.append(
            {
                "pixel_psnr_db": psnr(y, x),
                "pixel_mse": float(np.mean((y - x) ** 2)),
                "latent_psnr_db": psnr(zi, z0i, data_range=float(z0i.max() - z0i.min())),
                "latent_mse": float(((zi - z0i) ** 2).mean()),
                "seconds_invert": seconds_invert,
                "seconds_reconstruct": seconds_reconstruct,
            }
        )
    return rows


def controller(kind: str, source_word: str, target_word: str):
    from stablekit.edit import PromptToPrompt

    if kind == "none":
        return None
    return PromptToPrompt("replace", blend=(source_word, target_word) if kind == "blend" else ())
