"""stablekit: methods from recent diffusion research as plugins on standard diffusers pipelines.

pipe = stablekit.load()                       # the embedded default model, offline
with stablekit.use(pipe, SomePlugin(...)):
    image = pipe("a red star on a gray background").images[0]
"""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from . import protect  # noqa: E402  (callable: stablekit.protect(image, pipe, method=...))
from .errors import StablekitError  # noqa: E402
from .pipeline import SCHEDULERS, load, set_scheduler  # noqa: E402
from .plugins import CallState, Plugin, SchedulerPlugin, WeightEdit, attached, use  # noqa: E402

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
    "SCHEDULERS",
    "protect",
]
__version__ = "0.1.0"
