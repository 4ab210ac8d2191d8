"""Safe generation: guards on the prompt embeddings and concept erasure in the weights.

    with stablekit.use(pipe, SAFREE(concepts=["star"])):             # guard, nothing trained
        image = pipe("a red star on a gray background").images[0]
    edit = UCE(concepts=["star"], preserve=["circle"])               # closed-form weight edit
    membrane = SPM.train(pipe, "star")                                # trained rank-1 adapter
    with stablekit.use(pipe, edit):
        ...
    edit.save("no-star.safetensors")                                  # UCE.load(...) refuses other models

Methods: :mod:`.safree` (SAFREE, 2025), :mod:`.spm` (SPM, 2024), :mod:`.advunlearn` (AdvUnlearn, 2024);
baselines :mod:`.sld` (Safe Latent Diffusion's guidance) and :mod:`.uce` (UCE). :mod:`.text` computes token
embeddings with the pipeline's own text encoder for them. SAFREE, SLD and UCE are the ``guard`` kind of
:data:`stablekit.registry.CATALOGUE`, for ``--guard NAME:k=v`` and
``stablekit.registry.build("safree:concepts=[star]", CATALOGUE["guard"], "guard")``.
"""

from pathlib import Path

from ..errors import StablekitError
from .advunlearn import AdvUnlearn
from .safree import SAFREE, Decision
from .sld import SLD
from .spm import SPM
from .uce import UCE

__all__ = ["AdvUnlearn", "SAFREE", "SLD", "SPM", "UCE", "load_adapter", "Decision"]

LOADERS = {"uce": UCE.load, "spm": SPM.load, "advunlearn": AdvUnlearn.load}  # by the file's "method" metadata


def load_adapter(path, spm_multiplier: float = 1.0) -> UCE | SPM | AdvUnlearn:
    """A concept-erasure file from ``stablekit erase``, by its metadata: a UCE edit, an SPM membrane (its transport
    strength times `spm_multiplier`) or an AdvUnlearn text-encoder adapter."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise StablekitError(f"adapter file '{path}' does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            method = (f.metadata() or {}).get("method")
    except (SafetensorError, OSError) as e:
        raise StablekitError(f"'{path}' is not a readable safetensors file ({e})") from None
    if method not in LOADERS:
        raise StablekitError(f"'{path}' is not a concept-erasure file from `stablekit erase` ({', '.join(LOADERS)})")
    return SPM.load(path, spm_multiplier) if method == "spm" else LOADERS[method](path)
