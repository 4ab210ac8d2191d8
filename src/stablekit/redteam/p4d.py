"""P4D ("Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models by Finding Problematic Prompts",
2024): optimise a prompt so that the defended model's noise predictions
match the undefended model's for the concept prompt, with the prompt kept to real tokens.

    attack = P4D(tokens=16, iterations=200)
    prompt = attack.run(pipe, defense_plugins, "a red star on a gray background", target_latents)

Implemented after the reference code (joycenerd/P4D, ``optimize_n.py``; P4D-N): 16 free tokens make the whole
prompt, initialised to random vocabulary tokens; each iteration noises the target image's latents at a random
timestep with fresh noise, and the loss is the MSE between the defended UNet's conditional prediction for the
optimised prompt and the undefended UNet's for the concept prompt. The soft token embeddings are projected to
their nearest vocabulary tokens (cosine) for the forward pass and receive the gradient taken there (PEZ-style,
straight through); AdamW, lr 0.1, weight decay 0.1. The attack prompt is the projected tokens' text.

Deviations: 200 iterations rather than 3000 (to fit a CPU budget); the final prompt is returned instead of the best
of evaluations every 50 iterations scored by CLIP image similarity (no CLIP judge here; the benchmark's judge is
applied once, to the final prompt); the target latents are the undefended model's own generation for the prompt.
The undefended predictions are taken with the defense detached; only the defense's weight edits and membranes
take part in the optimisation (guards that rewrite the prompt text act when the returned prompt is generated).
"""

from __future__ import annotations

import torch

from ..latents import noise_scheduler
from ..pipeline import frozen
from ..plugins import use
from ..registry import register
from ..text import Slots, encode_ids, token_ids


@register("attack")
class P4D:
    """``P4D(tokens=16, iterations=200, lr=0.1, weight_decay=0.1, seed=0)``."""

    name = "p4d"

    def __init__(
        self, tokens: int = 16, iterations: int = 200, lr: float = 0.1, weight_decay: float = 0.1, seed: int = 0
    ):
        self.tokens, self.iterations, self.lr, self.weight_decay, self.seed = (
            tokens,
            iterations,
            lr,
            weight_decay,
            seed,
        )

    def run(self, pipe, defense: list, prompt: str, target: torch.Tensor) -> str:
        """An attack prompt against `pipe` with the `defense` plugins (weight edits and membranes; `pipe` itself
        has them detached) that imitates the undefended model on `prompt`; `target`: that prompt's image latents
        ``(1, c, h, w)``."""
        g = torch.Generator().manual_seed(self.seed)
        slots, sch = Slots(pipe, self.tokens), noise_scheduler(pipe)
        table = slots.table.detach()
        x0 = target.to(pipe.unet.dtype)
        ts = torch.randint(sch.config.num_train_timesteps, (self.iterations, 1), generator=g)
        xts = [sch.add_noise(x0, torch.randn(x0.shape, generator=g).to(x0), t) for t in ts]
        with torch.no_grad():  # the undefended model's predictions for the concept prompt
            concept = encode_ids(pipe, [token_ids(pipe, prompt)])
            wants = [pipe.unet(xt, t, concept).sample for xt, t in zip(xts, ts, strict=False)]
        soft = table[torch.randint(len(table), (self.tokens,), generator=g)].clone().float().requires_grad_(True)
        opt = torch.optim.AdamW([soft], lr=self.lr, weight_decay=self.weight_decay)
        with frozen(pipe.unet, pipe.text_encoder), use(pipe, *defense):
            for xt, t, want in zip(xts, ts, wants, strict=False):
                hard = table[slots.nearest(soft)].to(soft)
                pred = pipe.unet(xt, t, slots.encode(soft + (hard - soft).detach())).sample
                loss = torch.nn.functional.mse_loss(pred.float(), want.float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return slots.text(slots.nearest(soft))
