"""Safe generation: guards on the prompt embeddings and concept erasure in the weights.

    with stablekit.use(pipe, SAFREE(concepts=["star"])):             # guard, nothing trained
        image = pipe("a red star on a gray background").images[0]
    edit = UCE(concepts=["star"], preserve=["circle"])               # closed-form weight edit
    with stablekit.use(pipe, edit):
        ...
    edit.save("no-star.safetensors")                                  # UCE.load(...) refuses other models

Methods: :mod:`.safree` (SAFREE, PAPERS.md #65), :mod:`.uce` (UCE, a baseline). :mod:`.text` computes token
embeddings with the pipeline's own text encoder for both. ``REGISTRY`` maps names to the classes, for
``stablekit.registry.build("safree:concepts=[star]", REGISTRY, "guard")``.
"""
from .safree import SAFREE, Decision
from .uce import UCE

REGISTRY = {cls.name: cls for cls in (SAFREE, UCE)}

__all__ = ["SAFREE", "UCE", "Decision", "REGISTRY"]
