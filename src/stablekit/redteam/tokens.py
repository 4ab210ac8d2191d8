"""What the prompt-optimising attacks share: token slots whose input embeddings are optimised, the defended
UNet's conditional prediction for them, and the diffusion training target at a timestep.

:class:`Slots` hooks the first text encoder's input-embedding table so that chosen positions of a token-id row
take given embeddings (any encoder: CLIP, BERT...), and decodes the tokens nearest to them back to text, which
is what the attack finally hands to the full defended pipeline (guards included).
"""

from __future__ import annotations

import torch

from ..text import encode_ids, token_ids, tokenizer


class Slots:
    """Token-id row ``[start] + k slots + prompt tokens + [end]`` (or the slots at `positions` of a given row)."""

    def __init__(self, pipe, k: int, prompt: str = ""):
        self.pipe, self.tok = pipe, tokenizer(pipe)
        ids = token_ids(pipe, prompt)
        filler = self.tok.unk_token_id if self.tok.unk_token_id is not None else ids[-1]
        self.row = ids[:1] + [filler] * k + ids[1:]
        self.positions = list(range(1, k + 1))
        self.table = pipe.text_encoder.get_input_embeddings().weight  # (vocab, dim)
        self.embeds = None

    def _hook(self, module, inputs, output):
        if self.embeds is None:
            return output
        out = output.clone()
        out[:, self.positions] = self.embeds.to(out.dtype)
        return out

    def encode(self, embeds: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings ``(1, length, dim)`` with the slots' input embeddings `embeds` ``(k, dim)``
        (differentiable)."""
        handle = self.pipe.text_encoder.get_input_embeddings().register_forward_hook(self._hook)
        self.embeds = embeds
        try:
            return encode_ids(self.pipe, [self.row], getattr(self.pipe, "clip_skip", None), grad=True)
        finally:
            self.embeds = None
            handle.remove()

    def nearest(self, embeds: torch.Tensor) -> torch.Tensor:
        """The vocabulary ids nearest (cosine) to `embeds` ``(k, dim)``, special tokens excluded."""
        table = torch.nn.functional.normalize(self.table.detach().float(), dim=-1)
        sim = torch.nn.functional.normalize(embeds.detach().float(), dim=-1) @ table.T
        sim[:, self.tok.all_special_ids] = -2
        return sim.argmax(dim=-1)

    def text(self, ids: torch.Tensor) -> str:
        """The prompt with the slots filled by token `ids`, as text."""
        row = list(self.row)
        for p, i in zip(self.positions, ids.tolist(), strict=False):
            row[p] = i
        return self.tok.decode(row[1:-1], skip_special_tokens=True)


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict at `t` for `x0` noised with `noise` (noise, or v, or x0)."""
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0 if kind == "sample" else noise


def noise_scheduler(pipe):
    """A DDPM scheduler with `pipe`'s training schedule: noising and targets at any timestep."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)
