"""Prompt-to-prompt attention control: "Prompt-to-Prompt Image Editing with Cross Attention Control"
(Hertz et al., 2022).

Two branches are denoised together, the source prompt's and the target prompt's. In the conditional
half of every model call the target's attention probabilities are replaced by the source's:

* **cross-attention** for the first ``cross_replace_steps`` of the steps: target token ``j`` takes the
  source's map of token ``index[j]`` where ``alpha[j]`` is 1 and keeps its own where it is 0
  (:func:`token_map`: *replace* pairs tokens position by position, *refine* aligns the two token
  sequences so added words keep their own maps); **re-weighting** then scales the maps of chosen
  target tokens (``weights``);
* **self-attention** for the first ``self_replace_steps``, in layers of at most 16x16 = 256 queries;
* **local blend** (``blend`` words): after each step, the target latents outside a mask are set to
  the source's. The mask: the cross-attention maps of the words (source words in the source branch,
  target words in the target's), summed over steps so far and averaged over layers and heads, 3x3
  max-pooled, resized to the latents, normalised by their maximum, above ``threshold``, united
  over the two branches.

Use it with :func:`stablekit.edit.edit` (``controller=PromptToPrompt(...)``) for real images, or
attached to a pipeline called with ``[source, target]`` prompts and shared initial latents.
Model batches are ``[uncond_src, uncond_tgt, cond_src, cond_tgt]`` (or the cond half alone without
guidance), several images per prompt allowed; several prompt pairs too, branch-major
(``[src_1 .. src_n, tgt_1 .. tgt_n]``, as :func:`stablekit.edit.edit` makes them for a batch of
images), each pair with its own token maps. The plugin swaps the UNet's attention processors
(``unet.set_attn_processor``) and restores the original objects on removal. Layers and steps it does
not control run their original processor; controlled ones run diffusers' ``AttnProcessor`` with
the probabilities passed through :meth:`PromptToPrompt.control`.

Paper (code) defaults, kept: cross_replace_steps 0.8, self_replace_steps 0.4, self-attention
replaced only at <= 256 queries, the unconditional half untouched, re-weighting applied to the
replaced maps (so only during the cross-replace steps), blend threshold 0.3 on 16x16 maps.
Deviations: *replace* needs prompts of equal token counts (the code spreads a multi-token word's
map over its tokens); per-word replace fractions are not offered; the refinement alignment is a
longest common subsequence of the token ids (the code's global alignment with gap 0, match 1,
mismatch -1 maximises exactly that; ties may resolve differently); models without 16x16
cross-attention blend the maps of their largest layers under 256 queries (the smallest if none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor

from ..errors import StablekitError
from ..plugins import Plugin, settle

MODES = ("replace", "refine")
MAX_TOKENS = 16 * 16  # the code's attention resolution for self-attention replacement and blending


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids


def _lcs(x: list[int], y: list[int]) -> list[tuple[int, int]]:
    """Index pairs (i, j) of a longest common subsequence of `x` and `y`."""
    n = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in reversed(range(len(x))):
        for j in reversed(range(len(y))):
            n[i][j] = n[i + 1][j + 1] + 1 if x[i] == y[j] else max(n[i + 1][j], n[i][j + 1])
    pairs, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        if x[i] == y[j]:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif n[i + 1][j] >= n[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def token_map(tokenizer, source: str, target: str, mode: str = "replace") -> tuple[torch.Tensor, torch.Tensor]:
    """(index, alpha), one entry per token position (``tokenizer.model_max_length``): target token ``j``
    takes the source's attention map of token ``index[j]`` where ``alpha[j]`` is 1. Padding positions
    map to themselves. *replace* pairs positions one to one and needs equal token counts."""
    x, y, n = _ids(tokenizer, source), _ids(tokenizer, target), tokenizer.model_max_length
    index, alpha = torch.arange(n), torch.ones(n)
    if mode == "replace":
        if len(x) != len(y):
            raise StablekitError(
                f"target prompt's words cannot be aligned for a replace edit; use refine "
                f"(the source has {len(x)} tokens, the target {len(y)})"
            )
        return index, alpha
    alpha[: len(y)] = 0
    for i, j in _lcs(x, y):
        index[j], alpha[j] = i, 1
    return index, alpha


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Token positions of every occurrence of `word` (one or more tokens) in `prompt`."""
    ids, w = _ids(tokenizer, prompt), tokenizer(word, add_special_tokens=False).input_ids
    return [i + k for i in range(len(ids) - len(w) + 1) if w and ids[i : i + len(w)] == w for k in range(len(w))]


class _Scores:
    """Stands in for an ``Attention`` module inside ``AttnProcessor``; its attention probabilities pass
    through `fn`."""

    def __init__(self, attn, fn):
        self._attn, self._fn = attn, fn

    def __getattr__(self, name):
        return getattr(self._attn, name)

    def get_attention_scores(self, query, key, attention_mask=None):
        return self._fn(self._attn.get_attention_scores(query, key, attention_mask))


class _Processor:
    def __init__(self, plugin: PromptToPrompt, original):
        self.plugin, self.original = plugin, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        cross = encoder_hidden_states is not None
        queries = math.prod(hidden_states.shape[2:]) if hidden_states.ndim == 4 else hidden_states.shape[1]
        if not self.plugin._touches(queries, cross):
            return self.original(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        stand_in = self.plugin._stand_in(attn, cross)
        return AttnProcessor()(stand_in, hidden_states, encoder_hidden_states, *args, **kwargs)


@dataclass(frozen=True)
class PromptToPromptConfig:
    """`mode`: "replace" (word swap) or "refine" (added words); `cross_replace_steps` and `self_replace_steps`:
    fractions of the steps from the start; `weights`: target word -> attention scale; `blend`: words whose
    attention maps make the local-blend mask; `threshold`: its cut-off."""

    mode: str = "replace"
    cross_replace_steps: float = 0.8
    self_replace_steps: float = 0.4
    weights: dict[str, float] = field(default_factory=dict)
    blend: tuple[str, ...] = ()
    threshold: float = 0.3

    def __post_init__(self):
        if self.mode not in MODES:
            raise StablekitError(f"unknown prompt-to-prompt mode '{self.mode}'; choose one of: {', '.join(MODES)}")
        if not (0 <= self.cross_replace_steps <= 1 and 0 <= self.self_replace_steps <= 1 and 0 <= self.threshold < 1):
            raise StablekitError(
                f"cross_replace_steps ({self.cross_replace_steps}) and self_replace_steps "
                f"({self.self_replace_steps}) are fractions in [0, 1], the threshold ({self.threshold}) "
                "lies in [0, 1)"
            )
        weights = dict(self.weights or {})
        if any(not math.isfinite(s) or s < 0 for s in weights.values()):
            raise StablekitError(f"attention weights must be finite and >= 0, got {weights}")
        settle(self, weights=weights, blend=(self.blend,) if isinstance(self.blend, str) else tuple(self.blend))


class PromptToPrompt(Plugin):
    """Prompt-to-prompt attention control (see the module docstring), with the parameters of
    :class:`PromptToPromptConfig`. With `blend`, ``mask`` holds the latest mask (images per prompt, 1, h, w)
    after each step.
    """

    name = "prompt-to-prompt"
    exclusive = ("attention processors",)
    branches = 2  # model batches per half: [source, target]; subclasses put their reference branch before the target
    usage = (
        "prompt-to-prompt edits pairs of prompts: call the pipeline with [source, target] or use stablekit.edit.edit"
    )

    Config = PromptToPromptConfig

    def __init__(self, *args, **params):
        super().__init__(*args, **params)
        self._saved, self.mask = None, None

    def attach(self, pipe):
        self._tokenizer, self._saved = pipe.tokenizer, pipe.unet.attn_processors
        pipe.unet.set_attn_processor({name: _Processor(self, p) for name, p in self._saved.items()})

    def detach(self, pipe):
        pipe.unet.set_attn_processor(self._saved)
        self._saved = None

    def reset(self, call):
        super().reset(call)
        self.prepare(self._tokenizer, *self._pairs(call.prompt))
        self._maps, self.mask = {}, None

    def _branches(self, prompts) -> list[list[str]]:
        """The call's prompts, branch-major, as one list per branch."""
        if not (
            isinstance(prompts, (list, tuple))
            and prompts
            and len(prompts) % self.branches == 0
            and all(isinstance(p, str) for p in prompts)
        ):
            raise StablekitError(self.usage)
        n = len(prompts) // self.branches
        return [list(prompts[k * n : (k + 1) * n]) for k in range(self.branches)]

    def _pairs(self, prompts) -> tuple[list[str], list[str]]:
        """(sources, targets) of the call's prompts: the first and last branch."""
        branches = self._branches(prompts)
        return branches[0], branches[-1]

    def prepare(self, tokenizer, sources: str | list[str], targets: str | list[str]) -> None:
        """Token maps, weights and blend words for these prompt pairs (done at every reset; call it
        early to have a replace edit that cannot be aligned, or a missing word, fail before an inversion)."""
        sources, targets = ([sources], [targets]) if isinstance(sources, str) else (sources, targets)
        n = tokenizer.model_max_length
        self._index, self._alpha = (
            torch.stack(t)
            for t in zip(
                *(token_map(tokenizer, s, t, self.config.mode) for s, t in zip(sources, targets, strict=False)),
                strict=False,
            )
        )
        self._scale = torch.ones(len(targets), n)
        self._words = torch.zeros(self.branches, len(targets), n)  # blend words: source and target branches
        for k, (source, target) in enumerate(zip(sources, targets, strict=False)):
            for word, s in self.config.weights.items():
                pos = word_positions(tokenizer, target, word)
                if not pos:
                    raise StablekitError(f"word '{word}' is not in the target prompt '{target}'")
                self._scale[k, pos] = s
            for word in self.config.blend:
                src, tgt = word_positions(tokenizer, source, word), word_positions(tokenizer, target, word)
                if not src and not tgt:
                    raise StablekitError(f"blend word '{word}' is in neither prompt ('{source}', '{target}')")
                self._words[0, k, src], self._words[-1, k, tgt] = 1, 1

    def _per_row(self, x: torch.Tensor, rows: int, dim: int = 0) -> torch.Tensor:
        """`x`, one entry per prompt pair along `dim`, as one per model row of a branch (images of a pair adjacent)."""
        return x.repeat_interleave(rows // x.shape[dim], dim)

    def _until(self, fraction: float) -> bool:
        return self.call.step < int(fraction * self.call.num_steps)

    def _touches(self, queries: int, cross: bool) -> bool:
        if cross:
            return bool(self.config.blend) or self._until(self.config.cross_replace_steps)
        return queries <= MAX_TOKENS and self._until(self.config.self_replace_steps)

    def _stand_in(self, attn, cross: bool) -> _Scores:
        """What a controlled layer's ``AttnProcessor`` runs in place of the ``Attention`` module `attn`."""
        return _Scores(attn, lambda p: self.control(p, attn.heads, cross))

    def control(self, probs: torch.Tensor, heads: int, cross: bool) -> torch.Tensor:
        """One layer's attention probabilities (batch * heads, queries, keys), controlled."""
        p = probs.view(-1, heads, *probs.shape[1:])
        cond = p[len(p) // 2 :] if self.call.do_cfg else p
        ref, tgt = cond.chunk(self.branches)[-2:]  # ref: the source branch here
        if cross and self.config.blend:
            self._maps[p.shape[2]] = self._maps.get(p.shape[2], 0) + cond.mean(1)
        if cross and self._until(self.config.cross_replace_steps):
            if p.shape[-1] != self._index.shape[-1]:
                raise StablekitError(
                    f"prompt embeddings have {p.shape[-1]} tokens but the tokenizer pads to "
                    f"{self._index.shape[-1]}; prompt-to-prompt needs the pipeline's own tokenizer"
                )
            rows = len(tgt)
            index = self._per_row(self._index, rows).to(probs.device)[:, None, None].expand_as(ref)
            alpha, scale = (self._per_row(x, rows).to(probs)[:, None, None] for x in (self._alpha, self._scale))
            new = (ref.gather(-1, index) * alpha + tgt * (1 - alpha)) * scale
        elif not cross and p.shape[2] <= MAX_TOKENS and self._until(self.config.self_replace_steps):
            new = ref
        else:
            return probs
        out = p.clone()
        out[len(p) - len(tgt) :] = new
        return out.view_as(probs)

    def on_step_end(self, call, step, timestep, latents):
        if not self.config.blend:
            return latents
        *rest, ref, tgt = latents.chunk(self.branches)
        queries = max((q for q in self._maps if q <= MAX_TOKENS), default=min(self._maps))
        words = self._per_row(self._words.to(latents), len(tgt), 1).flatten(0, 1)
        maps = (self._maps[queries].to(latents) * words[:, None]).sum(-1)
        (h, w), f = latents.shape[-2:], round(math.sqrt(latents.shape[-2] * latents.shape[-1] / queries))
        maps = F.max_pool2d(maps.view(len(maps), 1, h // f, w // f), 3, 1, 1)
        maps = F.interpolate(maps, size=(h, w))
        maps = maps / maps.amax((2, 3), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
        self.mask = (maps > self.config.threshold).view(self.branches, len(tgt), 1, h, w).any(0).to(latents.dtype)
        return torch.cat([*rest, ref, ref + self.mask * (tgt - ref)])
