"""SAFREE: a training-free guard that steers prompt embeddings away from a concept subspace.

"SAFREE: Training-Free and Adaptive Guard for Safe Text-to-Image And Video Generation" (2025; reference code
jaehong31/SAFREE).

    with stablekit.use(pipe, SAFREE(concepts=["star", "five-pointed star"])):
        image = pipe("a red star on a gray background").images[0]

Implemented, each component behind its own flag:

* concept subspace: the span of the concept keywords' sentence embeddings from the pipeline's own text
  encoder (the end token's embedding; for CLIP this is its pooled output), ``space="sentence"``;
* trigger detection (``detect``): leaving token ``i`` out of the prompt gives a sentence embedding at
  distance ``d_i`` from the concept subspace; token ``i`` is a trigger when ``d_i >= (1 + alpha) *
  mean(d_j, j != i)`` (removing it moves the prompt away from the concept). With ``detect=False`` every
  token is projected;
* projection (``project``): flagged tokens are replaced by ``(I - P_concept) P_input e``, their projection
  onto the input space (the span of the leave-one-out embeddings) and then onto the orthogonal complement
  of the concept subspace. Only the conditional half of guidance is touched;
* self-validating filter (``self_validation``): with ``beta = 1 - mean cos(e, (I - P_concept) P_input e)``
  over the prompt's tokens (start and end tokens included), the first ``round(upper * num_steps *
  sigmoid(gain * (beta - center)))`` steps use the filtered embeddings, the rest the original ones;
* latent re-attention (``re_attention``): while the filtered embeddings are in use, the UNet also runs the
  original ones as an extra batch branch; in the skip features entering up block ``k``, each Fourier
  coefficient of the filtered branch with ``|k_h|, |k_w| <= radius`` whose magnitude exceeds the original
  branch's is multiplied by ``scales[k]`` (a module hook on each up block);
* the concept keywords as negative prompt (``negative_prompt``, off by default; SD 1.x/2.x only), on the rows
  and steps that use the filtered embeddings (every step without self-validation or re-attention).

Token space (``space="tokens"``, our addition; ``"auto"``, the default, picks it for every text encoder that
is not CLIP): in a bidirectional encoder such as the default model's MiniLM the end token is no sentence
embedding, and the concept spreads over every position of the prompt. The concept subspace is then the top
``rank`` principal directions (per keyword) of the keyword's own token embeddings in the generic
:data:`~.text.TEMPLATES` ("a photo of a {}", ...), and every position of the conditional embeddings, padding
included, is projected onto its orthogonal complement (trigger detection and the input-space projection do
not apply: ``detect`` is ignored). Self-validation, re-attention and the negative prompt work as above; the
filter's constants are recalibrated (:data:`FILTER`): beta is 1 - cos of a token and its projection, which
the token space makes small (on MiniLM about ten times smaller for prompts without the concept than for
prompts with it), so ``center=0.05, gain=100``, and ``upper=1``: a prompt
with the concept is filtered for (nearly) the whole run, one without it for none or one step (filtering
only the first 20% of the steps is not enough). Why: in the sentence space the star rate stays high on MiniLM
even with every token projected at every step, at a cost in attribute accuracy, while the token space lowers
it at no cost in preservation; ``rank=3`` by default. The projection also moves what a filtered prompt says
besides the concept (``stablekit bench safety``'s ``others_kept``), which the preservation score, on prompts
without the concept, does not see. Measured numbers: benchmarks/RESULTS.md, "Safety".

After a call, ``plugin.decisions`` holds one :class:`Decision` per prompt (its tokens, which were flagged,
beta); ``plugin.steps_filtered(beta, num_steps)`` is the filter's step count.

Defaults are the reference code's (jaehong31/SAFREE, ``generate_safree.py``): ``alpha=0.01``; the filter's
upper bound 10 of 50 steps (``upper=0.2``) with its sigmoid ``sigmoid(2 * 2.5 * (10 * beta - 5.333))``,
i.e. ``gain=50, center=0.5333`` (its artist setting is ``gain=70, center=0.55``); FreeU's skip scales
``s1=0.9, s2=0.2`` at threshold 1 (``scales=(0.9, 0.2), radius=1``).

Deviations from the reference code:

* leave-one-out deletes the token (the reference overwrites it with token id 0, which is "!" for the
  SD 1.x tokenizer and [PAD] for BERT) and reads the end token's embedding of the shorter sequence;
* the filter uses the filtered embeddings for steps ``0 .. n-1`` (``n`` as above); the reference's
  ``step <= n`` also filters step 0 when ``n = 0``. ``upper`` is a fraction of the run, not 10 steps;
* latent re-attention runs: the reference registers FreeU blocks with mode ``None``, which filters
  nothing, and its filter would replace coefficients by the number ``s`` (not scale them), compare real
  parts (not magnitudes), and use FreeU's asymmetric ``[c - 1, c + 1)`` window; ours is the symmetric
  band ``|k| <= radius`` so the filtered features stay real. Backbone scaling (FreeU's ``b``) is 1 as
  in the reference;
* the negative prompt follows the self-validating filter; the reference's runs use it for every prompt at every
  step, which on the default model costs 31-34 points of attribute accuracy on prompts without the concept (the
  benchmark's ``negative`` baseline);
* SDXL: the subspace lives in the concatenated embeddings of both encoders (the reference uses the second
  encoder's projected pooled output and filters only its half); the pooled embeddings are not filtered;
* several prompts per call and ``num_images_per_prompt`` are handled row by row; ``prompt_2`` is ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from ..errors import StablekitError
from ..plugins import Plugin, extend_batch, settle, unet_kwargs
from ..registry import register
from ..text import encode_ids, is_clip, token_ids, tokenizer
from .templates import TEMPLATES

SPACES = ("auto", "sentence", "tokens")
FILTER = {"sentence": dict(upper=0.2, gain=50.0, center=0.5333), "tokens": dict(upper=1.0, gain=100.0, center=0.05)}


def basis(vectors: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """``(dim, rank)`` orthonormal basis of the span of the rows of `vectors`."""
    u, s, _ = torch.linalg.svd(vectors.T.float(), full_matrices=False)
    return u[:, s > rtol * s.max()]


def remove(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`x` (rows) projected onto the orthogonal complement of the span of `b`."""
    return x - (x @ b) @ b.T


def triggers(loo: torch.Tensor, concept: torch.Tensor, alpha: float) -> torch.Tensor:
    """Which tokens are triggers, from the leave-one-out sentence embeddings `loo` ``(n, dim)``."""
    d = remove(loo.float(), concept).norm(dim=-1)
    if len(d) < 2:
        return torch.zeros(len(d), dtype=torch.bool, device=d.device)
    others = (d.sum() - d) / (len(d) - 1)
    return d >= (1 + alpha) * others


def project(tokens: torch.Tensor, inputs: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
    """``(I - P_concept) P_input tokens`` for bases `inputs` and `concept`."""
    return remove((tokens.float() @ inputs) @ inputs.T, concept)


def filtered_steps(beta: float, num_steps: int, upper: float, gain: float, center: float) -> int:
    """How many early steps use the filtered embeddings (the self-validating filter)."""
    sigmoid = 0.5 * (1 + math.tanh(gain * (beta - center) / 2))
    return round(upper * num_steps * sigmoid)


def band(h: int, w: int, radius: int, device=None) -> torch.Tensor:
    """``(h, w)`` mask of the unshifted 2-D FFT frequencies with ``|k_h| <= radius`` and ``|k_w| <= radius``."""
    kh = torch.fft.fftfreq(h, 1 / h, device=device).abs() <= radius
    kw = torch.fft.fftfreq(w, 1 / w, device=device).abs() <= radius
    return kh[:, None] & kw[None, :]


def reattend(filtered: torch.Tensor, original: torch.Tensor, radius: int, scale: float) -> torch.Tensor:
    """Scale the in-band Fourier coefficients of `filtered` whose magnitude exceeds `original`'s."""
    ff = torch.fft.fft2(filtered.float())
    damp = band(*ff.shape[-2:], radius, ff.device) & (ff.abs() > torch.fft.fft2(original.float()).abs())
    delta = torch.fft.ifft2(torch.where(damp, ff * (scale - 1), 0)).real
    return filtered + delta.to(filtered.dtype)


def _beta(embeds: torch.Tensor, projected: torch.Tensor, length: int) -> float:
    """The self-validating filter's beta: 1 - mean cosine of the prompt's first `length` token embeddings (start
    and end tokens included) and their projections."""
    return 1 - torch.cosine_similarity(embeds[:length].float(), projected[:length].float(), dim=-1).mean().item()


@dataclass
class Decision:
    """What SAFREE decided for one prompt of a call."""

    tokens: list[str]  # the prompt's tokens, start and end tokens excluded
    flagged: list[bool]  # which of them were projected
    beta: float  # 1 - mean cosine of original and projected token embeddings


@dataclass
class _Rows:
    """Per call, for each conditional row: the original embeddings and the prompt's beta."""

    original: torch.Tensor
    beta: torch.Tensor
    changed: torch.Tensor  # rows with at least one projected token
    negative: torch.Tensor | None  # the concept keywords' embeddings, the unconditional rows' while filtering


class _UNetHook(ModelHook):
    """Chooses each row's embeddings for this step and adds the original branch for re-attention."""

    def __init__(self, plugin: SAFREE):
        super().__init__()
        self.plugin = plugin

    def pre_forward(self, module, *args, **kwargs):
        p = self.plugin
        if p._rows is None:
            return args, kwargs
        return (), p._route(unet_kwargs(module, args, kwargs))

    def post_forward(self, module, output):
        n, self.plugin._split = self.plugin._split, None
        if n is None:
            return output
        if isinstance(output, tuple):
            return (output[0][:n],) + tuple(output[1:])
        output.sample = output.sample[:n]
        return output


class _SkipHook(ModelHook):
    """On an up block: re-attention of the filtered branch's skip features."""

    def __init__(self, plugin: SAFREE, scale: float):
        super().__init__()
        self.plugin, self.scale = plugin, scale

    def pre_forward(self, module, *args, **kwargs):
        n = self.plugin._split
        if n is not None:
            kwargs["res_hidden_states_tuple"] = tuple(self._reattend(x, n) for x in kwargs["res_hidden_states_tuple"])
        return args, kwargs

    def _reattend(self, x, n):
        extra = len(x) - n
        f = reattend(x[n - extra : n], x[n:], self.plugin.config.radius, self.scale)
        return torch.cat([x[: n - extra], f, x[n:]])


def concept_words(concepts, who: str) -> tuple[str, ...]:
    """`concepts` as a tuple of non-empty words, or a one-line error naming `who` needs them."""
    if isinstance(concepts, str) or not concepts or not all(isinstance(c, str) and c.strip() for c in concepts):
        raise StablekitError(f"{who} needs a non-empty list of concept keywords, e.g. concepts=['star']")
    return tuple(concepts)


@dataclass(frozen=True)
class SAFREEConfig:
    """The parameters of :class:`SAFREE` (see the module docstring); ``upper``, ``gain``, ``center`` of None are
    the space's :data:`FILTER` values."""

    concepts: tuple[str, ...] = ()
    alpha: float = 0.01
    detect: bool = True
    project: bool = True
    self_validation: bool = True
    upper: float | None = None
    gain: float | None = None
    center: float | None = None
    re_attention: bool = True
    scales: tuple[float, ...] = (0.9, 0.2)
    radius: int = 1
    negative_prompt: bool = False
    space: str = "auto"
    rank: int = 3

    def __post_init__(self):
        settle(self, concepts=concept_words(self.concepts, "SAFREE"), scales=tuple(self.scales))
        if not 0 <= (self.upper or 0) <= 1 or self.radius < 0 or any(s < 0 for s in self.scales):
            raise StablekitError(
                f"SAFREE: upper must be in [0, 1] (got {self.upper}), radius >= 0 (got {self.radius}) "
                f"and scales >= 0 (got {list(self.scales)})"
            )
        if self.space not in SPACES or int(self.rank) != self.rank or self.rank < 1:
            raise StablekitError(
                f"SAFREE: space is one of {', '.join(SPACES)} (got '{self.space}') and rank a whole "
                f"number >= 1 (got {self.rank})"
            )
        settle(self, rank=int(self.rank))

    def filter(self, space: str) -> dict:
        """The self-validating filter's ``upper``, ``gain``, ``center`` in `space` ("sentence" or "tokens")."""
        given = {"upper": self.upper, "gain": self.gain, "center": self.center}
        return FILTER[space] | {k: v for k, v in given.items() if v is not None}


@register("guard")
class SAFREE(Plugin):
    """``SAFREE(concepts, alpha=0.01, detect=True, project=True, self_validation=True, upper=None, gain=None,
    center=None, re_attention=True, scales=(0.9, 0.2), radius=1, negative_prompt=False, space="auto",
    rank=3)``, or ``SAFREE(SAFREEConfig(...))``; ``upper``, ``gain``, ``center`` default to the space's
    :data:`FILTER`."""

    name = "safree"
    Config = SAFREEConfig

    def __init__(self, *args, **params):
        super().__init__(*args, **params)
        self.pipe = None
        self._space = "tokens" if self.config.space == "tokens" else "sentence"  # "auto" is resolved by attach()
        self._rows, self._split, self.decisions = None, None, []

    def attach(self, pipe):
        if self.config.negative_prompt and hasattr(pipe, "text_encoder_2"):
            raise StablekitError(
                "SAFREE negative_prompt=True works with SD 1.x/2.x pipelines; with SDXL pass "
                "negative_prompt=... to the pipeline yourself"
            )
        self.pipe = pipe
        self._space = self.config.space if self.config.space != "auto" else "sentence" if is_clip(pipe) else "tokens"
        if self._routed():
            self.add_hook(pipe.unet, _UNetHook(self))
        if self.config.project and self.config.re_attention:
            for block, scale in zip(pipe.unet.up_blocks, self.config.scales, strict=False):
                self.add_hook(block, _SkipHook(self, scale))

    def detach(self, pipe):
        self.pipe, self._rows, self._split = None, None, None  # the last call's decisions stay readable

    def reset(self, call):
        super().reset(call)
        self._rows, self._split, self.decisions = None, None, []

    def _routed(self) -> bool:
        """Whether a UNet hook chooses each row's embeddings per step."""
        return self.config.project and (self.config.self_validation or self.config.re_attention)

    # prompt embeddings
    def transform_embeds(self, call, pe, npe):
        negative = None
        if self.config.negative_prompt and call.do_cfg and call.negative_prompt is None:
            negative = self._encode([", ".join(self.config.concepts)])[0].to(npe.dtype).expand_as(npe)
        if not self._routed():  # no per-step choice: the negative prompt, if any, holds for the whole run
            npe = npe if negative is None else negative
        if not self.config.project:
            return pe, npe
        if call.prompt is None:
            raise StablekitError(
                "SAFREE needs the prompt text to find trigger tokens; pass prompt=..., not prompt_embeds"
            )
        prompts = [call.prompt] if isinstance(call.prompt, str) else list(call.prompt)
        per = pe.shape[0] // len(prompts)
        if self._space == "tokens":
            concept, filter_ = self._token_subspace(), self._remove
        else:
            concept, filter_ = (
                basis(self._sentences([token_ids(self.pipe, c) for c in self.config.concepts])),
                self._filter,
            )
        filtered, decisions = zip(*(filter_(p, pe[i * per], concept) for i, p in enumerate(prompts)), strict=False)
        self.decisions = list(decisions)
        beta = torch.tensor([d.beta for d in decisions], device=pe.device).repeat_interleave(per)
        changed = torch.tensor([any(d.flagged) for d in decisions], device=pe.device).repeat_interleave(per)
        self._rows = _Rows(pe, beta, changed, negative)
        return torch.stack(filtered).repeat_interleave(per, 0), npe

    def _encode(self, rows_or_texts):
        rows = [token_ids(self.pipe, t) if isinstance(t, str) else t for t in rows_or_texts]
        return encode_ids(self.pipe, rows, getattr(self.pipe, "clip_skip", None))

    def _sentences(self, rows: list[list[int]]) -> torch.Tensor:
        """The end token's embedding of each token-id row."""
        emb = self._encode(rows)
        return emb[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])]

    def _token_subspace(self) -> torch.Tensor:
        """Token space: per keyword, the top `rank` directions of its token embeddings in the :data:`TEMPLATES`."""
        directions = []
        for c in self.config.concepts:
            word = token_ids(self.pipe, c)[1:-1]
            rows = [token_ids(self.pipe, t.format(c)) for t in TEMPLATES]
            emb = self._encode(rows)
            at = [next((i for i in range(len(r)) if r[i : i + len(word)] == word), None) for r in rows]
            vectors = torch.cat([emb[k, i : i + len(word)] for k, i in enumerate(at) if i is not None]).float()
            directions.append(basis(vectors)[:, : self.config.rank])
        return basis(torch.cat(directions, 1).T)

    def _remove(self, prompt: str, embeds: torch.Tensor, concept: torch.Tensor) -> tuple[torch.Tensor, Decision]:
        """Token space: every position of one prompt's embeddings off the concept subspace, and the decision."""
        ids = token_ids(self.pipe, prompt)
        out = remove(embeds.float(), concept)
        names = tokenizer(self.pipe).convert_ids_to_tokens(ids[1:-1])
        return out.to(embeds.dtype), Decision(names, [True] * len(names), _beta(embeds, out, len(ids)))

    def _filter(self, prompt: str, embeds: torch.Tensor, concept: torch.Tensor) -> tuple[torch.Tensor, Decision]:
        """Filtered embeddings ``(length, dim)`` of one prompt, and the decision."""
        ids = token_ids(self.pipe, prompt)
        n = len(ids) - 2
        names = tokenizer(self.pipe).convert_ids_to_tokens(ids[1:-1])
        if n < 1:
            return embeds, Decision(names, [], 0.0)
        loo = self._sentences([ids[:i] + ids[i + 1 :] for i in range(1, n + 1)])
        flagged = triggers(loo, concept, self.config.alpha) if self.config.detect else torch.ones(n, dtype=torch.bool)
        proj = project(embeds, basis(loo), concept)
        out = embeds.clone()
        rows = torch.arange(1, n + 1, device=embeds.device)[flagged.to(embeds.device)]
        out[rows] = proj[rows].to(embeds.dtype)
        return out, Decision(names, flagged.tolist(), _beta(embeds, proj, n + 2))

    # the UNet call
    def steps_filtered(self, beta: float, num_steps: int) -> int:
        """How many early steps of a `num_steps` run use the filtered embeddings for a prompt with `beta`."""
        if not self.config.self_validation:
            return num_steps
        return filtered_steps(beta, num_steps, **self.config.filter(self._space))

    def _active(self) -> torch.Tensor:
        """Which conditional rows use the filtered embeddings at this step."""
        if not self.config.self_validation or self.call.num_steps is None:
            return torch.ones_like(self._rows.changed)
        steps = [self.steps_filtered(b, self.call.num_steps) for b in self._rows.beta.tolist()]
        return self.call.step < torch.tensor(steps, device=self._rows.beta.device)

    def _route(self, kwargs: dict) -> dict:
        rows, active = self._rows, self._active()
        uncond, cond = self.call.halves(kwargs["encoder_hidden_states"])
        if not active.all():
            cond = torch.where(active[:, None, None], cond, rows.original.to(cond.dtype))
        if rows.negative is not None and uncond is not None:
            uncond = torch.where(active[:, None, None], rows.negative.to(uncond.dtype), uncond)
        if self.config.re_attention and (active & rows.changed).any():
            self._split = n = kwargs["sample"].shape[0]
            idx = torch.arange(n - len(cond), n)
            kwargs = {k: extend_batch(v, n, idx) for k, v in kwargs.items()}
            cond = torch.cat([cond, rows.original.to(cond.dtype)])
        kwargs["encoder_hidden_states"] = cond if uncond is None else torch.cat([uncond, cond])
        return kwargs
