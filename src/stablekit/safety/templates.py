"""Prompt templates of the safety methods."""

import re

from ..errors import StablekitError

# generic contexts of a concept word, for encoders that spread a word over the whole prompt (SAFREE's token space,
# SPM's training prompts)
TEMPLATES = (
    "{}",
    "a {}",
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a drawing of a {}",
    "a close-up photo of a {}",
)


def training_prompts(prompts, concept: str, method: str) -> list[str]:
    """`prompts` (default: :data:`TEMPLATES` of `concept`), refused unless each holds `concept` as a whole word."""
    prompts = list(prompts or [t.format(concept) for t in TEMPLATES])
    if not all(re.search(rf"\b{re.escape(concept)}\b", p, re.IGNORECASE) for p in prompts):
        raise StablekitError(f"{method}'s training prompts must each contain the concept '{concept}'")
    return prompts
