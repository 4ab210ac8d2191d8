"""Memorization: detect prompts that reproduce training images, locate where the model stores them, remove them.

* :mod:`.noise_magnitude`: the text-conditional noise magnitude detector and its prompt-embedding mitigation
  (Wen et al., ICLR 2024);
* :mod:`.subspace`: the shared feed-forward subspace of memorized prompts, located and pruned
  ("Memorized Images in Diffusion Models share a Subspace that can be Located and Deleted", 2024);
* :mod:`.nemo`: memorization neurons in the cross-attention value layers (NeMo, NeurIPS 2024), a localisation
  baseline;
* :mod:`.memcontrol`: MemControl's search for the parameters to fine-tune, and the fine-tune (2024);
* :mod:`.pruning`: the adapters they write (reversible, safetensors, refused by other models);
* :mod:`.benchmark_model`: a copy of the embedded model fine-tuned to memorize 50 scenes nearly exactly.
"""

from . import ground_truth
from .memcontrol import MemControlConfig, memcontrol
from .nemo import localize
from .noise_magnitude import (
    Detection,
    MagnitudeRecorder,
    PromptAdjustment,
    detect,
    informative_start,
    noise_magnitude,
    shipped_threshold,
)
from .pruning import METHODS, MemorizationAdapter, NeuronPruning
from .subspace import SubspaceConfig, prune

__all__ = [
    "METHODS",
    "Detection",
    "MagnitudeRecorder",
    "MemControlConfig",
    "MemorizationAdapter",
    "NeuronPruning",
    "PromptAdjustment",
    "SubspaceConfig",
    "detect",
    "ground_truth",
    "informative_start",
    "localize",
    "memcontrol",
    "noise_magnitude",
    "prune",
    "shipped_threshold",
]
