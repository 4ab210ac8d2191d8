"""Inversion and real-image editing: EDICT (2023), null-text inversion (2023), Direct
Inversion (2024) and the DDIM baseline, behind one interface; prompt-to-prompt attention control
(Hertz et al.) as the editing controller; InfEdit (2024), editing without inversion, with its unified
attention control; the asymmetric VQGAN decoder (2023), which keeps the unedited pixels.

    inv = stablekit.edit.invert(pipe, image, "a red star", method="edict")
    latents = stablekit.edit.reconstruct(pipe, inv)[-1]
    image = stablekit.edit.edit(pipe, image, "a red star", "a blue star", method="direct")
    image = stablekit.edit.edit(pipe, image, "a red star", "a blue star", controller=PromptToPrompt("replace"))
    image = stablekit.edit.edit(pipe, image, "a red star", "a blue star", method="infedit",
                                controller=UnifiedAttentionControl("replace"))
    image = stablekit.edit.edit(pipe, image, "a red star", "a blue star", decoder="asymmetric", mask=region)
    image = stablekit.edit.decode_keeping(pipe, latents, image, mask)   # the asymmetric decoder (2023)
"""

from ..latents import decode, load_image
from .asymmetric_decoder import DECODERS, AsymmetricDecoder, decode_keeping, load_decoder
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
    "AsymmetricDecoder",
    "DECODERS",
    "decode_keeping",
    "load_decoder",
]
