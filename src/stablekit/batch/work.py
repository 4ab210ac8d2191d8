"""The work function every executor runs: one pipeline per worker, a unit of rows in (one row, or rows that differ
by prompt and seed only, generated as one batch), one PNG (as bytes) and its manifest record out per row. The
worker writes nothing: the driver stores each result, so a row computed twice (a retried task) is still written
once, and a cluster needs no shared file system (adapters aside: their files are read by the workers)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import time

import torch

from ..output import generation_metadata, load_quietly, png_info
from ..pipeline import guidance_rescale, scheduler_plugin
from ..plugins import use
from ..registry import CATALOGUE, build
from .jobs import PLUGIN_KINDS, Row, plugin_kind


def row_specs(row: Row) -> dict[str, list[str]]:
    """``{kind: [spec, ...]}`` of `row`'s plugins, adapters by file name, for the PNG metadata (as `generate`)."""
    specs = {kind: [s for s in row.plugins if plugin_kind(s) == kind] for kind in PLUGIN_KINDS}
    return specs | {"adapter": [os.path.basename(p) for p in row.adapters]}


class Renderer:
    """Loads the pipeline once (or takes `pipe`); ``renderer(row)`` -> ``{"id", "png": bytes, "record": dict}``,
    ``renderer.render(rows)`` the same for a unit of rows. The plugins a row names are built once per worker and
    reused by every row that names them, as `generate` reuses them for its images."""

    def __init__(self, model: str | None = None, device: str | None = None, threads: int | None = None, *, pipe=None):
        if threads:
            torch.set_num_threads(threads)
        self.model = model
        self.pipe = load_quietly(model, device) if pipe is None else pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.worker = f"{socket.gethostname()}/{os.getpid()}"
        self.built = {}

    def native_size(self) -> tuple[int, int]:
        side = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return side, side

    def plugin(self, what: tuple):
        """The plugin of ``(kind, spec)``, ``("adapter", path, multiplier)`` or ``("watermark", key text)``, built
        on its first use."""
        if what not in self.built:
            self.built[what] = _build(what)
        return self.built[what]

    def plugins(self, row: Row) -> list:
        """`row`'s plugins in `generate`'s order: accelerations, guards, adapters, the watermark; then the sampler."""
        wanted = [(kind, s) for kind in PLUGIN_KINDS for s in row.plugins if plugin_kind(s) == kind]
        wanted += [("adapter", path, row.spm_multiplier) for path in row.adapters]
        wanted += [("watermark", row.watermark)] if row.watermark is not None else []
        wanted += [("scheduler", row.scheduler)] if row.scheduler is not None else []
        return [self.plugin(w) for w in wanted]

    def __call__(self, row: Row) -> dict:
        return self.render([row])[0]

    def render(self, rows: list[Row]) -> list[dict]:
        """The results of a unit of rows (equal :meth:`Row.batch_key`), generated as one batch."""
        start = time.perf_counter()
        row = rows[0]
        width, height = row.size or self.native_size()
        with use(self.pipe, *self.plugins(row)):
            rescale = guidance_rescale(self.pipe) if row.guidance_rescale is None else row.guidance_rescale
            images = self.pipe(
                [r.prompt for r in rows],
                height=height,
                width=width,
                negative_prompt=None if row.negative is None else [row.negative] * len(rows),
                num_inference_steps=row.steps,
                guidance_scale=row.guidance,
                guidance_rescale=rescale,
                generator=[torch.Generator("cpu").manual_seed(r.seed) for r in rows],
            ).images
            settings = dict(
                negative=row.negative,
                steps=row.steps,
                guidance=row.guidance,
                guidance_rescale=rescale,
                size=(width, height),
                scheduler=row.scheduler,
                model=self.model,
                specs=row_specs(row),
            )
            metas = [generation_metadata(self.pipe, r.prompt, r.seed, **settings) for r in rows]
        seconds = (time.perf_counter() - start) / len(rows)
        extra = {"size": [width, height], "guidance_rescale": rescale}
        return [self.result(r, im, meta, extra, seconds) for r, im, meta in zip(rows, images, metas, strict=True)]

    def result(self, row: Row, image, meta: dict, extra: dict, seconds: float) -> dict:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=png_info(meta))
        png = buffer.getvalue()
        record = {
            "id": row.id,
            "hash": row.digest(self.model),
            "params": row.params() | extra,
            "seed": row.seed,
            "image": f"images/{row.id}.png",
            "sha256": hashlib.sha256(png).hexdigest(),
            "worker": self.worker,
            "seconds": round(seconds, 4),
        }
        return {"id": row.id, "png": png, "record": record}


def _build(what: tuple):
    from ..provenance import Key, watermark
    from ..registry import load_adapter

    kind, spec = what[0], what[1]
    if kind == "adapter":
        return load_adapter(spec, what[2])
    if kind == "watermark":
        return watermark(Key.from_data(json.loads(spec)))
    if kind == "scheduler":
        return scheduler_plugin(spec)
    return build(spec, CATALOGUE[kind], kind)
