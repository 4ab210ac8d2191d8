"""The local executor: the work function in this process (one worker) or in a pool of processes (several), each
process with its own pipeline. Results come back as they are done, in any order."""

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


def _render(text: str) -> dict:
    return _renderer(Row.from_json(text))


def run_local(rows: list[Row], model, device, workers: int, threads: int | None) -> Iterator[dict]:
    """The work function's result for every row: in this process for one worker, else in `workers` processes
    (started with spawn, as forked torch is unsafe), at most two rows queued per process."""
    if workers == 1:
        before = torch.get_num_threads()
        try:
            yield from map(Renderer(model, device, threads), rows)
        finally:
            torch.set_num_threads(before)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, _start, (model, device, threads)) as pool:
        queue = iter(rows)
        running = set()
        while True:
            running |= {pool.submit(_render, row.to_json()) for row in _take(queue, 2 * workers - len(running))}
            if not running:
                return
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()


def _take(items: Iterator, n: int) -> list:
    return [item for _, item in zip(range(n), items, strict=False)]
