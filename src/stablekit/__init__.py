"""stablekit: methods from recent diffusion research as plugins on standard diffusers pipelines.

pipe = stablekit.load()                       # the embedded default model, offline
with stablekit.use(pipe, SomePlugin(...)):
    image = pipe("a red star on a gray background").images[0]

Importing stablekit imports every method package, which files its plugin classes in
:data:`stablekit.registry.CATALOGUE` (``CATALOGUE["accel"]["deepcache"]`` ...).
"""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# importing the method packages (accel ... sampling) files their classes in the catalogue
from . import accel, edit, protect, provenance, quant, redteam, safety, sampling  # noqa: E402
from .errors import StablekitError  # noqa: E402
from .pipeline import load, set_scheduler  # noqa: E402
from .plugins import CallState, Plugin, SchedulerPlugin, WeightEdit, attached, use  # noqa: E402
from .registry import CATALOGUE, register  # noqa: E402

__all__ = [
    "load",
    "use",
    "attached",
    "set_scheduler",
    "Plugin",
    "SchedulerPlugin",
    "WeightEdit",
    "CallState",
    "StablekitError",
    "CATALOGUE",
    "register",
    "accel",
    "edit",
    "protect",
    "provenance",
    "quant",
    "redteam",
    "safety",
    "sampling",
]
__version__ = "0.1.0"
