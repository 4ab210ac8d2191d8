"""Memorization: detect prompts that reproduce training images, locate where the model stores them, remove them.

* :mod:`.noise_magnitude`: the text-conditional noise magnitude detector and its prompt-embedding mitigation
  (Wen et al., ICLR 2024);
* :mod:`.subspace`: the shared feed-forward subspace of memorized prompts, located and pruned
  ("Memorized Images in Diffusion Models share a Subspace that can be Located and Deleted", 2024);
* :mod:`.nemo`: memorization neurons in the cross-attention value layers (NeMo, NeurIPS 2024), a localisation
  baseline;
* :mod:`.pruning`: the adapter both localisations write (reversible, safetensors, refused by other models).
"""

from . import ground_truth
from .nemo import localize
from .noise_magnitude import Detection, MagnitudeRecorder, PromptAdjustment, detect, noise_magnitude, shipped_threshold
from .pruning import METHODS, NeuronPruning
from .subspace import SubspaceConfig, prune

__all__ = [
    "METHODS",
    "Detection",
    "MagnitudeRecorder",
    "NeuronPruning",
    "PromptAdjustment",
    "SubspaceConfig",
    "detect",
    "ground_truth",
    "localize",
    "noise_magnitude",
    "prune",
    "shipped_threshold",
]
