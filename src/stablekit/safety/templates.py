"""Prompt templates of the safety methods."""

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
