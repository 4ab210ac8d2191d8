"""The work function every executor runs: one pipeline per worker, one row in, one PNG (as bytes) and its
manifest record out. The worker writes nothing: the driver stores each result, so a row computed twice (a
retried task) is still written once, and a cluster needs no shared file system."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import time

import torch

from ..output import generation_metadata, load_quietly, png_info
from ..pipeline import guidance_rescale, scheduler_plugin
from ..plugins import use
from ..registry import CATALOGUE, build
from .jobs import PLUGIN_KINDS, Row, plugin_kind


def row_plugins(row: Row) -> tuple[list, dict[str, list[str]]]:
    """(new plugin objects for `row`, ``{kind: [spec, ...]}`` for the PNG metadata)."""
    specs = {kind: [s for s in row.plugins if plugin_kind(s) == kind] for kind in PLUGIN_KINDS}
    plugins = [build(s, CATALOGUE[kind], kind) for kind in PLUGIN_KINDS for s in specs[kind]]
    if row.scheduler is not None:
        plugins.append(scheduler_plugin(row.scheduler))
    return plugins, specs


class Renderer:
    """Loads the pipeline once; ``renderer(row)`` -> ``{"id", "png": bytes, "record": dict}``."""

    def __init__(self, model: str | None = None, device: str | None = None, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.model = model
        self.pipe = load_quietly(model, device)
        self.pipe.set_progress_bar_config(disable=True)
        self.worker = f"{socket.gethostname()}/{os.getpid()}"

    def native_size(self) -> tuple[int, int]:
        side = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return side, side

    def __call__(self, row: Row) -> dict:
        start = time.perf_counter()
        plugins, specs = row_plugins(row)
        width, height = row.size or self.native_size()
        with use(self.pipe, *plugins):
            rescale = guidance_rescale(self.pipe) if row.guidance_rescale is None else row.guidance_rescale
            image = self.pipe(
                row.prompt,
                height=height,
                width=width,
                negative_prompt=row.negative,
                num_inference_steps=row.steps,
                guidance_scale=row.guidance,
                guidance_rescale=rescale,
                generator=torch.Generator("cpu").manual_seed(row.seed),
            ).images[0]
            meta = generation_metadata(
                self.pipe,
                row.prompt,
                row.seed,
                negative=row.negative,
                steps=row.steps,
                guidance=row.guidance,
                guidance_rescale=rescale,
                size=(width, height),
                scheduler=row.scheduler,
                model=self.model,
                specs=specs,
            )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=png_info(meta))
        png = buffer.getvalue()
        record = {
            "id": row.id,
            "hash": row.digest(self.model),
            "params": row.params() | {"size": [width, height], "guidance_rescale": rescale},
            "seed": row.seed,
            "image": f"images/{row.id}.png",
            "sha256": hashlib.sha256(png).hexdigest(),
            "worker": self.worker,
            "seconds": round(time.perf_counter() - start, 4),
        }
        return {"id": row.id, "png": png, "record": record}
