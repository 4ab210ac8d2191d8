"""The Ray executor: the same tasks as the local executor (:mod:`.local`) on Ray Data, ``map_batches`` over a fixed
pool of actors, one worker (one pipeline) per actor and one unit per call, with one GPU per actor where the cluster
has GPUs. A killed actor is restarted and its units retried (Ray Data's defaults for actor pools); the driver
stores each id once whatever comes back twice. Units and results travel pickled (the cluster is trusted, as Ray's
own serialisation requires). Usage statistics and the dashboard are off."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator

from ..errors import StablekitError


class RayWorker:
    """A task's worker as a Ray Data callable class: batches of ``{"index", "unit": pickled unit}`` ->
    ``{"index", "results": pickled list of the unit's results}``."""

    def __init__(self, task):
        self.worker = task()

    def __call__(self, batch: dict) -> dict:
        units = [pickle.loads(bytes(unit)) for unit in batch["unit"]]
        return {
            "index": list(batch["index"]),
            "results": [pickle.dumps(self.worker.render(unit)) for unit in units],
        }


def connect(address: str | None) -> bool:
    """Connect to the cluster at `address` (None or ``local``: start a local Ray instance); True if this call
    started Ray in this process (the caller shuts it down)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise StablekitError("--ray needs Ray: pip install 'stablekit[batch]'") from None
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
    except (ConnectionError, ValueError) as e:
        raise StablekitError(f"cannot reach the Ray cluster at '{address}': {e}") from None
    return True


def default_workers() -> int:
    """Actors when --workers is not given: one per GPU of the cluster, else one per node."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    return gpus or len([n for n in ray.nodes() if n["Alive"]])


def run_ray(units: list, task, workers: int | None, threads: int | None) -> Iterator[tuple[int, list]]:
    """``(index, results)`` of every unit, from a pool of `workers` workers of `task` (Ray actors, `threads` CPUs
    each, one GPU each where the cluster has GPUs) on the connected cluster."""
    import ray

    workers = workers or default_workers()
    gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller draws one bar for every executor
    items = [{"index": i, "unit": pickle.dumps(unit)} for i, unit in enumerate(units)]
    data = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        RayWorker,
        fn_constructor_kwargs=dict(task=task),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=threads or 1,
        num_gpus=gpus,
    )
    for result in data.iter_rows():
        yield int(result["index"]), pickle.loads(bytes(result["results"]))
