"""A trained concept erasure kept as a weight edit: its concepts and parameters ride in the file's metadata."""

from __future__ import annotations

import dataclasses
import json

from ..errors import StablekitError
from ..plugins import WeightEdit


class ConceptEdit(WeightEdit):
    """``Sub(concepts, deltas, meta=None, **params)``: `deltas` ``{"unet.<layer>.weight": tensor}``; a subclass
    sets ``name`` (the file's method), ``title`` (for messages) and ``Config``."""

    title = "concept erasure"

    def __init__(self, concepts, deltas: dict, meta: dict | None = None, **params):
        super().__init__(dict(deltas), meta, concepts, **params)
        self.meta |= {"method": self.name, "params": json.dumps(dataclasses.asdict(self.config))}

    @classmethod
    def load(cls, path):
        edit = WeightEdit.load(path)
        if edit.meta.get("method") != cls.name or "base_norms" not in edit.meta:
            raise StablekitError(f"'{path}' is not a {cls.title} adapter")
        params = json.loads(edit.meta["params"])
        return cls(params.pop("concepts"), edit.deltas, edit.meta, **params)
