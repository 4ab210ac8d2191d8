"""Safe generation: guards on the prompt embeddings and concept erasure in the weights.

    with stablekit.use(pipe, SAFREE(concepts=["star"])):             # guard, nothing trained
        image = pipe("a red star on a gray background").images[0]
    edit = UCE(concepts=["star"], preserve=["circle"])               # closed-form weight edit
    membrane = SPM.train(pipe, "star")                                # trained rank-1 adapter
    with stablekit.use(pipe, edit):
        ...
    edit.save("no-star.safetensors")                                  # UCE.load(...) refuses other models

Methods: :mod:`.safree` (SAFREE, 2025), :mod:`.spm` (SPM, 2024), :mod:`.advunlearn` (AdvUnlearn, 2024),
:mod:`.doco` (DoCo, concept domain correction, 2025), :mod:`.trce` (TRCE, 2025);
baselines :mod:`.sld` (Safe Latent Diffusion's guidance) and :mod:`.uce` (UCE). :mod:`.text` computes token
embeddings with the pipeline's own text encoder for them. SAFREE, SLD and UCE are the ``guard`` kind of
:data:`stablekit.registry.CATALOGUE`, for ``--guard NAME:k=v`` and
``stablekit.registry.build("safree:concepts=[star]", CATALOGUE["guard"], "guard")``.
"""

from .advunlearn import AdvUnlearn
from .doco import DoCo
from .safree import SAFREE, Decision
from .sld import SLD
from .spm import SPM
from .trce import TRCE
from .uce import UCE

__all__ = ["AdvUnlearn", "DoCo", "SAFREE", "SLD", "SPM", "TRCE", "UCE", "Decision"]
