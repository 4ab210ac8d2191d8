"""The UNet's own representation of an input: its down path and middle block run alone, the middle block's output
averaged over space. The contrastive recipe trains it; linear probes and certified classifiers read it."""

from __future__ import annotations

import torch


def encoder_features(unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """(B, C): `unet`'s middle block output on latents `x` at timesteps `t` (one per row, or a scalar) under text
    `cond`, averaged over space; the same tensor the full forward computes there."""
    t = torch.as_tensor(t, device=x.device).expand(len(x))
    emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))
    h = unet.conv_in(x)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=cond)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    h = unet.mid_block(h, emb, encoder_hidden_states=cond)
    return h.mean(dim=(2, 3))
