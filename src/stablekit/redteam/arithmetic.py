"""Concept arithmetic: rebuild an inhibited concept by composing the guidance of several prompts.

"Concept Arithmetics for Circumventing Concept Inhibition in Diffusion Models" (2024).

    attack = ConceptArithmetic([("a red circle", 1.0), ("a red five-pointed star", 1.0), ("a red circle", -1.0)])
    with stablekit.use(pipe, defense, attack):                 # the defense stays attached: prompts pass it
        image = pipe(attack.prompts, generator=[torch.Generator().manual_seed(0)] * 3).images[0]

Implemented: compositional classifier-free guidance, ``eps = eps_u + g * sum_i w_i (eps(p_i) - eps_u)``. The
attack's prompts are the rows of one pipeline call (same seed for every row, so all rows start from the same
noise), so every attached guard and membrane sees each prompt as it would see a user's; a UNet hook replaces
every row's conditional prediction by ``eps_u + sum_i w_i (eps(p_i) - eps_u)`` and every unconditional one by
``eps_u`` of the first row, so the rows stay identical and any of them is the composed image.

:func:`decompositions` proposes the compositions the benchmark tries for a concept in a prompt, from the
paper's two ideas: negated guidance (``(1 + l) * p' - l * p``, which turns an erasure that inverted the
concept's direction back around; ``p'`` is the prompt with the concept replaced by a neutral word) and sums of
prompts the inhibition did not see (the concept's paraphrases, and the concept word alone added to ``p'``).

Deviation: the paper's own prompt lists and weights are not reproduced (its code was not available to us); the
compositions here are built from the synthetic world's vocabulary, and an attack counts as a success if any of
them shows the concept (reported per composition too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from ..errors import StablekitError
from ..plugins import Plugin, settle
from ..registry import register


class _ComposeHook(ModelHook):
    def __init__(self, attack: ConceptArithmetic):
        super().__init__()
        self.attack = attack

    def post_forward(self, module, output):
        a = self.attack
        x = output[0] if isinstance(output, tuple) else output.sample
        k = len(a.weights)
        if not a.call.do_cfg or x.shape[0] % (2 * k):
            raise StablekitError(
                f"{a!r} needs guidance_scale > 1 and a call with its {k} prompts as the rows "
                "(prompt=attack.prompts, one image per prompt)"
            )
        uncond, cond = x.chunk(2)
        u, c = uncond.unflatten(0, (k, -1)), cond.unflatten(0, (k, -1))
        w = torch.tensor(a.weights, dtype=x.dtype, device=x.device).view(k, *[1] * (c.dim() - 1))
        composed = u[0] + (w * (c - u[0])).sum(0)
        x = torch.cat([u[0].repeat(k, *[1] * (u.dim() - 2)), composed.repeat(k, *[1] * (u.dim() - 2))])
        if isinstance(output, tuple):
            return (x,) + tuple(output[1:])
        output.sample = x
        return output


@dataclass(frozen=True)
class ConceptArithmeticConfig:
    """The terms ``(prompt, weight)``; a term's prompt may be a list of B prompts, the same B for every term."""

    terms: tuple[tuple[str | tuple[str, ...], float], ...]

    def __post_init__(self):
        terms = tuple((p if isinstance(p, str) else tuple(p), float(w)) for p, w in self.terms)
        lists = [[p] if isinstance(p, str) else list(p) for p, _ in terms]
        if not terms or not all(lists) or not all(isinstance(p, str) and p.strip() for ps in lists for p in ps):
            raise StablekitError("concept arithmetic needs a non-empty list of (prompt, weight) terms")
        if len({len(ps) for ps in lists}) > 1:
            raise StablekitError("concept arithmetic: every term needs the same number of prompts")
        settle(self, terms=terms)


@register("attack")
class ConceptArithmetic(Plugin):
    """``ConceptArithmetic([(prompt, weight), ...])``: call the pipeline with ``prompt=attack.prompts``.

    A term's prompt may be a list of B prompts (one per image, the same B for every term): the call then makes B
    composed images at once (rows term-major, ``attack.prompts``; give row ``t * B + j`` image j's seed)."""

    name = "arithmetic"
    Config = ConceptArithmeticConfig

    @property
    def prompts(self) -> list[str]:
        """The rows of the call: each term's prompts, term by term."""
        return [p for t, _ in self.config.terms for p in ([t] if isinstance(t, str) else t)]

    @property
    def weights(self) -> list[float]:
        return [w for _, w in self.config.terms]

    def attach(self, pipe):
        self.add_hook(pipe.unet, _ComposeHook(self))


def decompositions(
    prompt: str, word: str, neutral: str, paraphrases: list[str], negation: float = 1.0
) -> dict[str, list[tuple[str, float]]]:
    """Named compositions that rebuild `word` in `prompt` (which contains it) without asking for it directly."""
    other = prompt.replace(word, neutral)
    out = {"negated": [(other, 1 + negation), (prompt, -negation)], "word": [(other, 1.0), (word, 1.0)]}
    if paraphrases:
        out["paraphrases"] = [(prompt.replace(word, p), 1.0 / len(paraphrases)) for p in paraphrases]
    return out
