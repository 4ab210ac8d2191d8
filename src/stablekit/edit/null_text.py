"""Null-text inversion (Mokady et al., "Null-text Inversion for Editing Real Images using Guided Diffusion
Models", 2023; reference code google/prompt-to-prompt).

1. Pivot: DDIM inversion at guidance 1 (conditional prediction only), giving ``z*[0..T]``.
2. For each denoising step ``i``, starting from ``z = z*[0]`` and the embedding of the empty prompt,
   optimise the unconditional embedding so that the guided DDIM step from ``z`` lands on the pivot:
   ``min_u || step_i(z, u + w (c - u)) - z*[i + 1] ||^2`` with the conditional prediction ``c`` fixed;
   then take that step with the optimised embedding (each step warm-starts from the previous one).
   Editing and reconstruction reuse the per-step embeddings in place of the empty prompt's.

Paper defaults, kept: guidance w = 7.5, Adam, up to 10 inner steps, early stop when the loss is below
``1e-5 + 2e-5 * i``. Deviation: the learning rate ``1e-2 * (1 - i / 100)``, written for 50 steps, is
``1e-2 * (1 - i / (2 * steps))`` here (identical at 50 steps, never negative at more). Only the
token embeddings are optimised; SDXL's pooled unconditional embedding stays fixed. Several images
are optimised together, each its own embedding and loss (Adam's updates are per element, so the
images do not mix), and the inner loop stops early when every image's loss is below the threshold:
an image that got there sooner takes the extra steps a lone run would have skipped.
"""

from __future__ import annotations

import torch

from ..latents import Schedule, eps


def optimise(
    pipe, sched: Schedule, pivot: torch.Tensor, text, guidance: float, inner_steps: int = 10, early_stop: float = 1e-5
) -> torch.Tensor:
    """Per-step unconditional embeddings (steps, images, L, D) that make guided DDIM follow `pivot`."""
    uncond, cond = text
    emb = uncond["encoder_hidden_states"].detach().float()
    z, out, n = pivot[0], [], len(sched)
    for i in range(n):
        with torch.no_grad():
            c = eps(pipe, sched, z, i, cond)
        emb = emb.clone().requires_grad_(True)
        opt = torch.optim.Adam([emb], lr=1e-2 * (1 - i / (2 * n)))
        for _ in range(inner_steps):
            u = eps(pipe, sched, z, i, {**uncond, "encoder_hidden_states": emb})
            loss = (sched.step(i, z, u + guidance * (c - u)) - pivot[i + 1]).pow(2).flatten(1).mean(1)
            opt.zero_grad()
            loss.sum().backward(inputs=[emb])
            opt.step()
            if loss.max().item() < early_stop + 2e-5 * i:
                break
        emb = emb.detach()
        out.append(emb)
        with torch.no_grad():
            z = sched.step(i, z, eps(pipe, sched, z, i, cond, {**uncond, "encoder_hidden_states": emb}, guidance))
    return torch.stack(out)
