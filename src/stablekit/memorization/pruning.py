"""Memorization adapters (reversible weight edits), and neuron pruning: the localisation methods' output.

A neuron of a linear layer is an input feature (a column of its weight: the feed-forward neurons of
:mod:`.subspace`) or an output feature (a row: the cross-attention value neurons of :mod:`.nemo`). Pruning zeroes
those columns or rows through a :class:`~stablekit.plugins.WeightEdit`, which detach undoes bit for bit. The file
(safetensors) records the method, the neurons, the parameters, the base model's name and the norms of the weights
it was made from: attaching it to another model is refused.
"""

from __future__ import annotations

import json

import torch

from ..errors import StablekitError
from ..plugins import WeightEdit, weight_norms

METHODS = ("subspace", "nemo", "memcontrol")


def contrast(mem: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``(memorized prompts, neurons)`` z-scores of `mem`'s rows against `other`'s per-neuron mean and std."""
    return (mem - other.mean(0)) / (other.std(0) + 1e-6)


def shared_neurons(z: torch.Tensor, threshold: float, share: float, max_fraction: float) -> list[int]:
    """Neurons whose z-score is at least `threshold` for at least a `share` of the memorized prompts (rows of
    `z`), at most `max_fraction` of them (highest median z-score first), sorted."""
    shared = (z >= threshold).float().mean(0) >= share
    order = [int(j) for j in z.median(0).values.argsort(descending=True) if shared[j]]
    return sorted(order[: int(max_fraction * z.shape[1])])


class MemorizationAdapter(WeightEdit):
    """A weight edit of the memorization methods: its metadata names the method and the norms of the base weights
    it edits, so attaching it to another model is refused."""

    name = "memorization-adapter"

    @property
    def method(self) -> str:
        return self.meta["method"]

    def __repr__(self):
        return f"MemorizationAdapter({self.method}, {len(self.deltas)} tensors)"

    @classmethod
    def load(cls, path) -> MemorizationAdapter:
        """The adapter in `path`: a :class:`NeuronPruning` for the pruning methods."""
        edit = WeightEdit.load(path)
        if edit.meta.get("method") not in METHODS or "base_norms" not in edit.meta:
            raise StablekitError(f"'{path}' is not a memorization adapter from `stablekit memorization mitigate`")
        kind = NeuronPruning if "neurons" in edit.meta else MemorizationAdapter
        return kind(edit.deltas, edit.meta)


def base_meta(pipe, method: str, weights: dict) -> dict:
    """The metadata every memorization adapter records: its method, the base model's name and the norms of the
    `weights` it edits."""
    base = str(getattr(pipe, "name_or_path", "") or "")
    return {"method": method, "base": base, "base_norms": json.dumps(weight_norms(pipe, weights))}


class NeuronPruning(MemorizationAdapter):
    """Pruned neurons: ``NeuronPruning.make(pipe, method, {"unet.<layer>.weight": [i, ...]}, axis)``."""

    name = "neuron-pruning"

    @classmethod
    def make(cls, pipe, method: str, neurons: dict[str, list[int]], axis: str, params: dict | None = None):
        """Zero the `neurons` of each named weight: columns (``axis="in"``) or rows (``"out"``)."""
        if axis not in ("in", "out"):
            raise ValueError(f"axis is 'in' or 'out', not {axis!r}")
        deltas, weights = {}, {}
        for name, idx in neurons.items():
            w = cls._param(pipe, name)
            delta = torch.zeros(w.shape, dtype=torch.float32)
            src = w.detach().float().cpu()
            if axis == "in":
                delta[:, idx] = -src[:, idx]
            else:
                delta[idx] = -src[idx]
            deltas[name], weights[name] = delta, w
        meta = base_meta(pipe, method, weights) | {
            "axis": axis,
            "neurons": json.dumps(neurons),
            "params": json.dumps(params or {}),
        }
        return cls(deltas, meta)

    @property
    def neurons(self) -> dict[str, list[int]]:
        return json.loads(self.meta["neurons"])

    def __repr__(self):
        return f"NeuronPruning({self.method}, {sum(map(len, self.neurons.values()))} neurons)"
