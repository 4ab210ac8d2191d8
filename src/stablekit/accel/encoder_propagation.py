"""Encoder propagation (PAPERS.md #8, Faster Diffusion): skip the UNet encoder at non-key steps.

Encoder features change gently between steps while decoder features do not. At a key step the whole UNet
runs and the encoder's outputs are stored; at the other steps the encoder (``conv_in``, the down blocks and
the mid block) returns them without running, and only the decoder (up blocks and output layers) runs, with
the current step's time embedding.

Implemented: encoder propagation with the paper's non-uniform key steps, ``0, 1, 2, 3, 5, 10, 15, 25, 35`` of
50 DDIM steps (the default), the uniform 1:N variant (``interval=N``), or any key steps you give.
Not implemented yet: the parallel decoder (batching the decoders of the steps between two key steps) and
prior noise injection; so the speedup is the skipped encoder work only.

Deviations from the paper and its code:

* for a run of other than 50 steps the paper's key steps are scaled: step ``k`` becomes ``k * n // 50``
  (the code hard-codes the 50-step list, with separate hand-made rules for 75 and 100 steps);
* ControlNet: the code skips the ControlNet at non-key steps too and reuses residuals baked into the stored
  features; here the pipeline still runs the ControlNet every step and its fresh residuals are added to the
  propagated features, so the control acts at every step (and the ControlNet costs what it did).
"""
from __future__ import annotations

from .caching import StepCache

PAPER_KEY_STEPS = (0, 1, 2, 3, 5, 10, 15, 25, 35)  # of 50 steps


class EncoderPropagation(StepCache):
    """``EncoderPropagation()`` (the paper's key steps), ``EncoderPropagation(interval=4)`` (uniform 1:4), or
    ``EncoderPropagation(key_steps=[...], reference_steps=n)`` (your key steps, written for `n` steps)."""

    name = "encoder-propagation"

    def __init__(self, interval: int | None = None, key_steps=PAPER_KEY_STEPS, reference_steps: int = 50):
        if interval is None:
            super().__init__(schedule=key_steps, reference_steps=reference_steps)
        else:
            super().__init__(interval)

    def skipped_modules(self, unet):
        encoder = {"conv_in": unet.conv_in}
        encoder.update({f"down_blocks.{i}": block for i, block in enumerate(unet.down_blocks)})
        if unet.mid_block is not None:
            encoder["mid_block"] = unet.mid_block
        return encoder

    def __repr__(self):
        what = f"interval={self.interval}" if isinstance(self.schedule, str) else f"key_steps={list(self.schedule)}"
        return f"EncoderPropagation({what})"
