"""QuEST: a time-aware activation quantizer and selective fine-tuning of the layers that carry the time
embedding and of those most sensitive to low bits.

"QuEST: Low-bit Diffusion Model Quantization via Efficient Selective Finetuning" (Wang et al., 2024; reference
code hatchetProject/QuEST).

Implemented:

* time-aware activation quantization: every layer input keeps one range per tenth of the training timesteps
  (searched for the least squared error on the calibration inputs of that tenth), chosen at run time from the
  timestep of the UNet call;
* selective fine-tuning: the time-embedding layers (the embedding MLP and every resnet's projection of it)
  and the `sensitive` layers whose quantized output differs most from the full-precision one on calibration
  inputs are fine-tuned, their full-precision weights optimized through the quantizer (straight-through
  rounding) together with their activation ranges, so that the quantized UNet's noise prediction matches the
  full-precision one on the calibration calls; every other layer stays as calibrated;
* the calibration set and split skip quantizers of Q-Diffusion, which QuEST builds on.

Defaults: W4A8 and W4A4 (the paper's low-bit settings), 8 sensitive layers, 100 fine-tuning iterations, learning
rate 1e-5 for weights and 1e-3 for activation ranges.

Deviations from the paper and its reference code:

1. the paper selects the attention-related activations (post-softmax and the query/key products) as the
   sensitive ones; here attention's matrix products are not quantized, so sensitivity is measured on the
   linear and convolution layers, by their relative output error;
2. fine-tuning runs 100 iterations on the calibration calls (a reduced count for a CPU), with a plain mean
   squared error to the full-precision prediction;
3. the paper starts from Q-Diffusion's reconstructed model; here it starts from round-to-nearest weights
   with searched ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import StablekitError
from ..pipeline import frozen
from ..plugins import use
from ..registry import register
from .calibration import capture
from .core import fake_weight, weight_codes
from .method import QuantConfig, QuantMethod


@dataclass(frozen=True)
class QuESTConfig(QuantConfig):
    """Fine-tune the time-embedding layers and the `sensitive` most sensitive layers for `iters` iterations."""

    bits: str = "w4a8"
    sensitive: int = 8
    iters: int = 100
    lr: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        if self.sensitive < 0 or self.iters < 0 or not self.lr > 0:
            raise StablekitError("QuEST needs sensitive >= 0, iters >= 0 and lr > 0")


def time_layers(names) -> list[str]:
    return [n for n in names if n.startswith("time_embedding.") or n.endswith("time_emb_proj")]


def sensitivity(unet, q, calls) -> dict[str, float]:
    """{layer: relative squared output error of its quantized version} on the inputs of `calls`."""
    layers = {n: unet.get_submodule(n) for n in q.layers}
    seen = capture(unet, layers, calls)
    out = {}
    with torch.no_grad():
        for n, rows in seen.items():
            err = sum(float((q.layers[n](a[0]) - y).pow(2).sum()) for a, _, y in rows)
            out[n] = err / max(1e-12, sum(float(y.pow(2).sum()) for _, _, y in rows))
    return out


@register("quant")
class QuEST(QuantMethod):
    name = "quest"
    Config = QuESTConfig
    time_aware = True
    split_skips = True

    def selected(self, pipe, q, calls) -> list[str]:
        sens = sensitivity(pipe.unet, q, calls[:2])
        chosen = time_layers(q.layers)
        ranked = [n for n in sorted(sens, key=sens.get, reverse=True) if n not in chosen]
        return chosen + ranked[: self.config.sensitive]

    def refine(self, pipe, q, calls):
        if not self.config.iters:
            return
        names = self.selected(pipe, q, calls)
        weights = {n: torch.nn.Parameter(pipe.unet.get_submodule(n).weight.detach().float().clone()) for n in names}
        with torch.no_grad():
            targets = [pipe.unet(**c.kwargs)[0] for c in calls]
        with use(pipe, q), frozen(pipe.unet), torch.enable_grad():
            ranges = []
            for n, w in weights.items():
                layer = q.layers[n]
                layer.soft_weight = lambda layer=layer, w=w: fake_weight(w, layer.scale, layer.wbits)
                ranges += [layer.act.lo.requires_grad_(True), layer.act.hi.requires_grad_(True)]
            groups = [{"params": list(weights.values())}, {"params": ranges, "lr": 1e-3}]
            opt = torch.optim.Adam(groups, lr=self.config.lr)
            self._finetune(pipe.unet, opt, calls, targets)
        for n, w in weights.items():
            layer = q.layers[n]
            layer.soft_weight = None
            layer.act.lo.requires_grad_(False)
            layer.act.hi.requires_grad_(False)
            layer.set_codes(weight_codes(w.detach(), layer.scale, layer.wbits))

    def _finetune(self, unet, opt, calls, targets) -> None:
        gen = torch.Generator().manual_seed(self.config.seed)
        for _ in tqdm(range(self.config.iters), desc="selective fine-tuning", unit="iter"):
            i = int(torch.randint(len(calls), (1,), generator=gen))
            loss = (unet(**calls[i].kwargs)[0] - targets[i]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
