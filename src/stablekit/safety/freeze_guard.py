"""FreezeAsGuard: "FreezeAsGuard: Mitigating Illegal Adaptation of Diffusion Models via Selective Tensor
Freezing" (Huang et al., 2024; reference code pittisl/FreezeAsGuard). The model publisher picks the UNet tensors
that stay frozen whenever a user fine-tunes (``stablekit finetune --freeze-guard MASK``), so that adapting the
model to a forbidden domain fails while adapting it to legal domains still works.

    mask = FreezeMask.learn(pipe, forbidden=(images, captions), legal=(images, captions), ratio=0.5)
    mask.save("guard.json")
    unet = finetune(pipe, data, FinetuneConfig(mode="full"), frozen=mask.frozen)

Implemented: the paper's bilevel objective (after fine-tuning with the unfrozen tensors, the forbidden domain's
loss should stay high and the legal domains' low, with a fixed share of tensors frozen), solved to first order
along a simulated fine-tuning trajectory: the UNet is fine-tuned on both domains for `steps` steps (the shared
loop's step, as a user would), and at every step each tensor's contribution to the descent of each domain's
loss is accumulated (the first-order loss change of an Adam-like step, ``lr * sum |grad|``); each domain's
contributions are normalised to sum to one, and the `ratio` of tensors with the largest ``forbidden -
legal_weight * legal`` score are frozen.

Paper's defaults: freezing ratios of 30-70% of tensors, a mask trained jointly with simulated fine-tuning on
illegal data and legal data. Deviations:
  1. the binary mask comes from the first-order scores of one simulated trajectory rather than from training a
     relaxed mask through unrolled fine-tuning steps (the outer loop), which costs a multiple of a fine-tune;
  2. the domains are world concepts judged by the attribute classifier (a forbidden object under a new name;
     a legal restyling), not portraits of public figures.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import StablekitError

METHOD = "freezeasguard"


@dataclass(frozen=True)
class FreezeConfig:
    """The share of UNet tensors frozen, the weight of the legal domain's score, and the simulated
    fine-tune: steps, batch, learning rate and seed."""

    ratio: float = 0.5
    legal_weight: float = 1.0
    steps: int = 60
    batch: int = 8
    lr: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise StablekitError(f"ratio={self.ratio}: the frozen share must be between 0 and 1")
        if self.legal_weight < 0 or self.steps < 1 or self.batch < 1 or not self.lr > 0:
            raise StablekitError("need legal_weight >= 0, steps >= 1, batch >= 1 and lr > 0")


@dataclass(frozen=True)
class FreezeMask:
    """The names of the frozen UNet tensors, the learning config, and each tensor's score."""

    frozen: tuple[str, ...]
    config: FreezeConfig
    scores: dict[str, float]

    @classmethod
    def learn(cls, pipe, forbidden: tuple[list, list[str]], legal: tuple[list, list[str]], config=None):
        """The mask for `pipe`'s UNet from a forbidden and a legal set of (images, captions)."""
        from ..train.finetune import encode

        config = config or FreezeConfig()
        bad, good = encode(pipe, *forbidden), encode(pipe, *legal)
        contrib = trajectory_contributions(pipe, bad, good, config)
        scores = {
            n: float(contrib["forbidden"][n] - config.legal_weight * contrib["legal"][n]) for n in contrib["legal"]
        }
        k = round(config.ratio * len(scores))
        frozen = tuple(sorted(sorted(scores, key=scores.get, reverse=True)[:k]))
        return cls(frozen, config, scores)

    def save(self, path: str | Path) -> None:
        doc = {"method": METHOD, "config": asdict(self.config), "frozen": list(self.frozen), "scores": self.scores}
        Path(path).write_text(json.dumps(doc, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> FreezeMask:
        path = Path(path)
        if not path.is_file():
            raise StablekitError(f"freeze mask '{path}' does not exist")
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict) or doc.get("method") != METHOD:
            raise StablekitError(f"'{path}' is not a FreezeAsGuard mask from `stablekit freeze-guard`")
        return cls(tuple(doc["frozen"]), FreezeConfig(**doc["config"]), doc["scores"])


def trajectory_contributions(pipe, bad, good, config: FreezeConfig) -> dict[str, dict[str, float]]:
    """Per domain and UNet tensor: its normalised first-order share of the loss descent, accumulated over a
    simulated full fine-tune on both domains (each step: one batch of each, both gradients, one AdamW step on
    their sum)."""
    from tqdm import tqdm

    from ..train.finetune import step_loss

    torch.manual_seed(config.seed)
    unet = copy.deepcopy(pipe.unet).float().train().requires_grad_(True)
    params = dict(unet.named_parameters())
    losses = {
        d: step_loss(unet, data, pipe.scheduler.config, config.batch, 0.0)
        for d, data in (("forbidden", bad), ("legal", good))
    }
    total = {d: dict.fromkeys(params, 0.0) for d in losses}
    opt = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    for _ in tqdm(range(config.steps), desc="freeze-guard", mininterval=2):
        opt.zero_grad(set_to_none=True)
        for d, loss in losses.items():
            grads = torch.autograd.grad(loss(gen), list(params.values()), allow_unused=True)
            for (n, p), g in zip(params.items(), grads, strict=True):
                if g is not None:
                    total[d][n] += float(g.abs().sum()) * config.lr
                    p.grad = g if p.grad is None else p.grad + g
        opt.step()
    return {d: {n: v / max(sum(t.values()), 1e-30) for n, v in t.items()} for d, t in total.items()}
