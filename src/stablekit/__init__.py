"""stablekit: methods from recent diffusion research as plugins on standard diffusers pipelines.

pipe = stablekit.load()                       # the embedded default model, offline
with stablekit.use(pipe, SomePlugin(...)):
    image = pipe("a red star on a gray background").images[0]

Importing stablekit imports nothing heavy: the names below (and the method packages, ``stablekit.accel`` ...)
are imported on first use. :data:`stablekit.registry.CATALOGUE` knows every plugin's name from its index and
imports a class when it is looked up (``CATALOGUE["accel"]["deepcache"]`` ...).
"""

import importlib
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .errors import StablekitError  # noqa: E402
from .registry import CATALOGUE, register  # noqa: E402

# public name -> the module that defines it, imported on first access (PEP 562)
LAZY = {
    "load": "pipeline",
    "set_scheduler": "pipeline",
    "use": "plugins",
    "attached": "plugins",
    "Plugin": "plugins",
    "SchedulerPlugin": "plugins",
    "WeightEdit": "plugins",
    "CallState": "plugins",
}
PACKAGES = ("accel", "edit", "protect", "provenance", "quant", "redteam", "safety", "sampling")

__all__ = [*LAZY, "StablekitError", "CATALOGUE", "register", *PACKAGES]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in LAZY:
        value = getattr(importlib.import_module(f".{LAZY[name]}", __name__), name)
    elif name in PACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'stablekit' has no attribute '{name}'")
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *__all__})
