"""Red-team attacks that test guards and concept erasure, and the audit that runs them.

:mod:`.arithmetic` (concept arithmetic, "Concept Arithmetics for Circumventing Concept Inhibition
in Diffusion Models", 2024) composes the guidance of prompts the defense did not
block; :mod:`.p4d` (Prompting4Debugging, 2024) and :mod:`.unlearndiffatk` (UnlearnDiffAtk, 2024) optimise prompt
tokens against the defended model (token slots: :class:`stablekit.text.Slots`); :mod:`.audit` builds the defenses,
prompts and judge of ``stablekit audit`` and ``stablekit bench safety``.

The attacks are the ``attack`` kind of :data:`stablekit.registry.CATALOGUE`.
"""

from .arithmetic import ConceptArithmetic, decompositions
from .p4d import P4D
from .unlearndiffatk import UnlearnDiffAtk

__all__ = ["ConceptArithmetic", "decompositions", "P4D", "UnlearnDiffAtk"]
