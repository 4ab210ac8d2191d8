"""Inversion and real-image editing: EDICT (2023), null-text inversion (2023), Direct
Inversion (2024) and the DDIM baseline, behind one interface; prompt-to-prompt attention control
(Hertz et al.) as the editing controller; InfEdit (2024), editing without inversion, with its unified
attention control.

    inv = stablekit.edit.invert(pipe, image, "a red star", method="edict")
    latents = stablekit.edit.reconstruct(pipe, inv)[-1]
    image = stablekit.edit.edit(pipe, image, "a red star", "a blue star", method="direct")
    image = stablekit.edit.edit(pipe, image, "a red star", "a blue star", controller=PromptToPrompt("replace"))
    image = stablekit.edit.edit(pipe, image, "a red star", "a blue star", method="infedit",
                                controller=UnifiedAttentionControl("replace"))
"""

from ..latents import decode, load_image
from .editing import EDIT_GUIDANCE, EDIT_METHODS, EDIT_STEPS, edit
from .infedit import UnifiedAttentionControl
from .inversion import GUIDANCE, METHODS, Inversion, invert, reconstruct, reconstruct_image
from .prompt_to_prompt import PromptToPrompt

__all__ = [
    "invert",
    "reconstruct",
    "reconstruct_image",
    "edit",
    "decode",
    "load_image",
    "Inversion",
    "METHODS",
    "GUIDANCE",
    "EDIT_METHODS",
    "EDIT_STEPS",
    "EDIT_GUIDANCE",
    "PromptToPrompt",
    "UnifiedAttentionControl",
]
