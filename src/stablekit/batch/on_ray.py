"""The Ray executor: the same work function on Ray Data, ``map_batches`` over a fixed pool of actors, one pipeline
per actor and one unit of rows per call, with one GPU per actor where the cluster has GPUs. A killed actor is restarted
and its rows retried (Ray Data's defaults for actor pools); the driver stores each id once whatever comes back
twice. Usage statistics and the dashboard are off."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from ..errors import StablekitError
from .jobs import Row
from .work import Renderer


class RayRenderer:
    """The work function as a Ray Data callable class: batches of ``{"rows": [json list of a unit's rows]}`` ->
    one result per row."""

    def __init__(self, model, device, threads):
        self.renderer = Renderer(model, device, threads)

    def __call__(self, batch: dict) -> dict:
        results = []
        for text in batch["rows"]:
            results += self.renderer.render([Row.from_json(row) for row in json.loads(str(text))])
        return {
            "id": [r["id"] for r in results],
            "png": [r["png"] for r in results],
            "record": [json.dumps(r["record"]) for r in results],  # text: one Arrow type whatever the fields hold
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


def run_ray(units: list[list[Row]], model, device, workers: int | None, threads: int | None) -> Iterator[dict]:
    """The work function's result for every row of every unit, from a pool of `workers` actors on the connected
    cluster."""
    import ray

    workers = workers or default_workers()
    gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller draws one bar for every executor
    items = [{"rows": json.dumps([row.to_json() for row in unit])} for unit in units]
    data = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        RayRenderer,
        fn_constructor_kwargs=dict(model=model, device=device, threads=threads),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=threads or 1,
        num_gpus=gpus,
    )
    for result in data.iter_rows():
        yield {"id": result["id"], "png": bytes(result["png"]), "record": json.loads(result["record"])}
