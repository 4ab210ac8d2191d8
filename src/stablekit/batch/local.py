"""The local executor: a task's worker in this process (one worker) or in a pool of processes (several), each
process with its own worker (its own pipeline). A task is a picklable factory of workers (``task(pipe=None)``),
and a worker's ``render(unit)`` turns one unit of work into a list of results (:class:`.work.Renderer`: a unit of
rows into their images). Results come back per unit, as ``(index of the unit, its results)``, in any order."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import torch

_worker = None  # the pool process's own


def _start(task) -> None:
    global _worker
    _worker = task()


def _render(index: int, unit) -> tuple[int, list]:
    return index, _worker.render(unit)


def run_local(units: list, task, workers: int, pipe=None) -> Iterator[tuple[int, list]]:
    """``(index, results)`` of every unit: in this process for one worker (``task(pipe=pipe)``: on `pipe` if given),
    else in `workers` processes (started with spawn, as forked torch is unsafe), at most two units queued per
    process."""
    if workers == 1:
        before = torch.get_num_threads()
        try:
            worker = task(pipe=pipe)
            for index, unit in enumerate(units):
                yield index, worker.render(unit)
        finally:
            torch.set_num_threads(before)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, _start, (task,)) as pool:
        queue = enumerate(units)
        running = set()
        while True:
            running |= {pool.submit(_render, *item) for item in _take(queue, 2 * workers - len(running))}
            if not running:
                return
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()


def _take(items: Iterator, n: int) -> list:
    return [item for _, item in zip(range(n), items, strict=False)]
