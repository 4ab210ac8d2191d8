"""The local executor: the work function in this process (one worker) or in a pool of processes (several), each
process with its own pipeline. Work comes in units (lists of rows, see :meth:`.work.Renderer.render`); results
come back as they are done, in any order."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import torch

from .jobs import Row
from .work import Renderer

_renderer: Renderer | None = None  # the pool process's own


def _start(model, device, threads) -> None:
    global _renderer
    _renderer = Renderer(model, device, threads)


def _render(texts: list[str]) -> list[dict]:
    return _renderer.render([Row.from_json(t) for t in texts])


def run_local(units: list[list[Row]], model, device, workers: int, threads: int | None, pipe=None) -> Iterator[dict]:
    """The work function's result for every row of every unit: in this process for one worker (on `pipe` if
    given, else a pipeline loaded here), else in `workers` processes (started with spawn, as forked torch is
    unsafe), at most two units queued per process."""
    if workers == 1:
        before = torch.get_num_threads()
        try:
            renderer = Renderer(model, device, threads, pipe)
            for unit in units:
                yield from renderer.render(unit)
        finally:
            torch.set_num_threads(before)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, _start, (model, device, threads)) as pool:
        queue = ([row.to_json() for row in unit] for unit in units)
        running = set()
        while True:
            running |= {pool.submit(_render, unit) for unit in _take(queue, 2 * workers - len(running))}
            if not running:
                return
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield from future.result()


def _take(items: Iterator, n: int) -> list:
    return [item for _, item in zip(range(n), items, strict=False)]
