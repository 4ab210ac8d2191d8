"""UCE, unified concept editing (Gandikota et al., WACV 2024; a safety benchmark baseline): a closed-form edit
of the UNet's cross-attention key and value projections that erases concepts.

    edit = UCE(concepts=["star"], preserve=["circle", "square"])
    with stablekit.use(pipe, edit):                 # computed on attach, for this pipeline
        image = pipe("a red star on a gray background").images[0]
    edit.save("no-star.safetensors"); UCE.load("no-star.safetensors")   # refused by another model

Implemented: for every cross-attention ``to_k`` and ``to_v`` weight ``W`` (UNet ``Attention`` modules with
``is_cross_attention``), the minimiser of ``erase_scale * sum_i |W' c_i - W g_i|^2 + preserve_scale *
sum_j |W' p_j - W p_j|^2 + lamb * |W' - W|_F^2``,

    W' = (lamb W + erase_scale sum_i W g_i c_i^T + preserve_scale sum_j W p_j p_j^T)
         (lamb I + erase_scale sum_i c_i c_i^T + preserve_scale sum_j p_j p_j^T)^-1,

so the keys and values of each erased concept become (up to the ``lamb`` term) those of its guide, and
those of preserved concepts stay. ``c_i``, ``g_i``, ``p_j`` are the embeddings, from the pipeline's own text
encoder, of the last token of the concept, guide and preserved prompts (the start token for the empty
guide ""). The edit is a :class:`~stablekit.plugins.WeightEdit` (``W' - W`` per weight) and saves as
safetensors with its parameters and the norms of the weights it was made from; attaching it to a model whose
weights differ is refused.

Defaults are the reference code's (rohitgandikota/unified-concept-editing, ``trainscripts/uce_sd_erase.py``):
guide "" (the empty prompt) for every concept, ``erase_scale=1``, ``preserve_scale=1``, ``lamb=0.5``.
Deviations: the solve is in float64 (the reference inverts in float32); targets are ``W g`` rather than the
module's output, so a bias, if a model has one, is the same on both sides; the reference's prompt expansion
(``"image of {concept}"`` ...) is left to the caller, who lists such phrasings as concepts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention

from ..errors import StablekitError
from ..plugins import WeightEdit, settle, weight_norms
from ..registry import register
from ..text import encode_ids, token_ids
from .safree import concept_words


def cross_attention_weights(unet) -> dict[str, torch.nn.Parameter]:
    """``{"unet.<module>.to_k.weight": weight, ...}``: the key/value projections of text cross-attention."""
    return {
        f"unet.{name}.{proj}.weight": getattr(m, proj).weight
        for name, m in unet.named_modules()
        if isinstance(m, Attention) and m.is_cross_attention
        for proj in ("to_k", "to_v")
    }


def closed_form(w, erase, guide, preserve, erase_scale: float, preserve_scale: float, lamb: float):
    """UCE's edited weight for `w` ``(out, in)`` and embedding rows `erase`, `guide`, `preserve` ``(k, in)``."""
    w = w.double()
    c, g, p = (x.to(w.device, torch.float64) for x in (erase, guide, preserve))
    lhs = lamb * w + erase_scale * (g @ w.T).T @ c + preserve_scale * (p @ w.T).T @ p
    rhs = (
        lamb * torch.eye(w.shape[1], dtype=w.dtype, device=w.device) + erase_scale * c.T @ c + preserve_scale * p.T @ p
    )
    return torch.linalg.solve(rhs, lhs.T).T  # rhs is symmetric


@dataclass(frozen=True)
class UCEConfig:
    """The parameters of :class:`UCE`: the concepts erased towards their guides (one for all, or one per concept;
    none is the empty prompt), the concepts preserved, the scales of both, and the regularizer `lamb`."""

    concepts: tuple[str, ...] = ()
    guides: tuple[str, ...] = ("",)
    preserve: tuple[str, ...] = ()
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    lamb: float = 0.5

    def __post_init__(self):
        concepts, guides = concept_words(self.concepts, "UCE"), tuple(self.guides) or ("",)
        guides = guides * len(concepts) if len(guides) == 1 else guides
        if len(guides) != len(concepts):
            raise StablekitError(
                f"UCE: give one guide for all concepts or one per concept; got {len(guides)} "
                f"guides for {len(concepts)} concepts"
            )
        if self.lamb <= 0 or self.erase_scale < 0 or self.preserve_scale < 0:
            raise StablekitError("UCE: lamb must be > 0 and the scales >= 0")
        settle(self, concepts=concepts, guides=guides, preserve=tuple(self.preserve))


@register("guard")
class UCE(WeightEdit):
    """``UCE(concepts, guides=[""], preserve=[], erase_scale=1.0, preserve_scale=1.0, lamb=0.5)``, or
    ``UCE(UCEConfig(...))``."""

    name = "uce"
    Config = UCEConfig

    def __init__(self, *args, **params):
        super().__init__({}, None, *args, **params)
        self.meta = {"method": "uce", "params": json.dumps(dataclasses.asdict(self.config))}

    @torch.no_grad()
    def fit(self, pipe) -> UCE:
        """Compute the edit for `pipe` (done on the first attach if not before)."""
        prm = self.config
        texts = [*prm.concepts, *prm.guides, *prm.preserve]
        rows = [token_ids(pipe, t) for t in texts]
        emb = encode_ids(pipe, rows)[torch.arange(len(rows)), torch.tensor([max(len(r) - 2, 0) for r in rows])]
        k = len(prm.concepts)
        c, g, p = emb[:k], emb[k : 2 * k], emb[2 * k :]
        weights = cross_attention_weights(pipe.unet)
        self.deltas = {
            n: (closed_form(w, c, g, p, prm.erase_scale, prm.preserve_scale, prm.lamb) - w.double()).float().cpu()
            for n, w in weights.items()
        }
        self.meta["base_norms"] = json.dumps(weight_norms(pipe, weights))
        return self

    def attach(self, pipe):
        if not self.deltas:
            self.fit(pipe)
        super().attach(pipe)

    def save(self, path) -> None:
        if not self.deltas:
            raise StablekitError("UCE edit not computed yet: attach it to a pipeline or call fit(pipe) first")
        super().save(path)

    @classmethod
    def load(cls, path) -> UCE:
        edit = WeightEdit.load(path)
        if edit.meta.get("method") != "uce" or "base_norms" not in edit.meta:
            raise StablekitError(f"'{path}' is not a UCE edit")
        uce = cls(**json.loads(edit.meta["params"]))
        uce.deltas, uce.meta = edit.deltas, edit.meta
        return uce
