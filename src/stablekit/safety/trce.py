"""TRCE ("TRCE: Towards Reliable Malicious Concept Erasure in Text-to-Image Diffusion Models", 2025; reference code
ddgoodgood/TRCE): a closed-form cross-attention edit that maps the trigger embeddings of malicious prompts to those
of contextually similar safe prompts, then contrastive steering of the early denoising steps.

    edit = TRCE.train(pipe, "red", prompts=[...], keywords=["crimson"], preserve=[...])   # minutes
    edit.save("no-red.safetensors"); edit = TRCE.load("no-red.safetensors")             # or `generate --adapter`
    with stablekit.use(pipe, edit):
        image = pipe("a scarlet star on a gray background").images[0]

Implemented:

* Stage 1, the edit of every text cross-attention ``to_k`` and ``to_v``: each malicious prompt (a training prompt
  with the concept word, and the same prompt with each of `keywords`, the paper's concept list) is paired with its
  safe prompt (the word replaced by `anchor`), and the projection ``W`` becomes the minimiser of
  ``sum_pairs sum_groups w_group |W' c - W s|^2 / n_pairs + preserve_scale |W' p - W p|^2 / n_preserve + lamb
  |W' - W|^2``, ``c`` a malicious prompt's token embedding and ``s`` the safe prompt's at the aligned position,
  ``p`` every token embedding of the preservation prompts. The token groups and their weights
  (``token_weights``) are the reference's: the start token, the end token ("the first [EoT]", the trigger), the
  padding positions after it (weighted by their count, "the last [EoT]s") and the keyword's own tokens (mapped to
  the safe prompt's last position), and a fifth group, the context words, mapped to the same words of the safe
  prompt (in a causal encoder the words after the keyword carry it; in a bidirectional one, MiniLM, all do).
* Stage 2, contrastive steering: the stage-1 model's self-attention layers and cross-attention queries are trained
  with a hinge on the early-step prediction of each malicious prompt, ``max(0, beta (|e(x_t, c) - e_safe|^2 -
  |e(x_t, c) - e_unsafe|^2 + margin))``, where ``e_safe = e0(x_t, s) + g (e0(x_t, s) - e0(x_t, ""))`` and
  ``e_unsafe`` the same with the malicious prompt, by the original model ``e0`` (``g`` = ``guidance``), and the
  same hinge on the unconditional prediction; ``x_t`` are the latents of the original model's sampling
  trajectory of the malicious prompt at its first ``early`` fraction of steps. A preservation term (weight
  ``preserve_weight``) holds the predictions of the preservation prompts' trajectories (any step) at the stage-1
  model's.

The result is a :class:`~stablekit.plugins.WeightEdit` of the UNet (stage 1's ``to_k``/``to_v`` deltas, stage 2's
deltas of ``attn1.*`` and ``attn2.to_q``), saved as safetensors with its parameters and the norms of the weights it
was made from (attaching it to another model is refused).

Defaults after the reference (``config/stage1``, ``config/stage2``): stage 1 ``lamb`` 0 is replaced by a small
ridge, stage 2 ``guidance`` 15, ``beta`` 1, ``margin`` 0.01, the early half of the trajectory (25 of 50 steps),
regularisation batch 4, preservation weight 100, the self-attention and cross-attention-query layers trained.

Deviations:
1. The trigger token: MiniLM is bidirectional, so its end token ([SEP]) and padding positions play the roles of
   CLIP's first and last [EoT], and every context word also carries the concept; ``token_weights`` default to
   ``(0, 1, 1, 1, 1)`` (start, end, padding, keyword, context) instead of the reference's ``[0, 1, 0, 0]``, which
   leaves a bidirectional encoder's other positions unedited. Each padding position is mapped to the safe
   prompt's own padding at that position (the reference maps them all to its last one, weighted by their count).
2. The preservation prompts are the caller's (the default model's world captions without the concept), not a
   COCO cache; ``preserve_scale`` weighs their mean per prompt against the pairs' mean (the reference divides its
   COCO sums by 3e4). ``lamb`` 0.1 instead of 0 keeps the solve well posed with few preservation prompts.
3. Stage 2 trains ``iterations`` steps of a batch of 4 at lr 1e-4 with Adam (the reference: batch 1, 3 epochs of
   100 trajectories at 1e-6 with AdamW, without zeroing gradients between steps), on the exact trajectory
   timesteps of the pipeline's own sampler (``steps``, guidance 7.5); its preservation term covers both the
   conditional and the unconditional predictions of the preservation prompts (the reference: the unconditional
   prediction on its regularisation trajectories).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..errors import StablekitError
from ..plugins import WeightEdit, settle, weight_norms
from ..text import encode_ids, token_ids, tokenizer
from .advunlearn import replace_word
from .concept_edit import ConceptEdit
from .safree import concept_words
from .templates import training_prompts
from .uce import closed_form, cross_attention_weights

GROUPS = ("start", "end", "padding", "keyword", "context")


@dataclass(frozen=True)
class TRCEConfig:
    """The parameters of :class:`TRCE` (see the module docstring)."""

    concepts: tuple[str, ...]
    keywords: tuple[str, ...] = ()
    anchor: str = ""
    token_weights: tuple[float, ...] = (0.0, 1.0, 1.0, 1.0, 1.0)
    preserve_scale: float = 1.0
    lamb: float = 0.1
    iterations: int = 200
    lr: float = 1e-4
    guidance: float = 15.0
    beta: float = 1.0
    margin: float = 0.01
    early: float = 0.5
    preserve_weight: float = 100.0
    batch: int = 4
    steps: int = 25
    seed: int = 0

    def __post_init__(self):
        settle(self, concepts=concept_words(self.concepts, "TRCE"), keywords=tuple(self.keywords))
        settle(self, token_weights=tuple(float(w) for w in self.token_weights))
        if len(self.concepts) != 1:
            raise StablekitError("TRCE erases one concept per adapter (combine adapters for several)")
        if len(self.token_weights) != len(GROUPS) or min(self.token_weights) < 0 or not any(self.token_weights):
            raise StablekitError(f"TRCE: token_weights are {len(GROUPS)} weights >= 0 ({', '.join(GROUPS)})")
        ints = ("iterations", "batch", "steps")
        if any(isinstance(getattr(self, k), bool) or int(getattr(self, k)) < 0 for k in ints):
            raise StablekitError(f"TRCE: {', '.join(ints)} must be whole numbers >= 0")
        if self.lamb <= 0 or self.lr <= 0 or self.preserve_scale < 0 or self.preserve_weight < 0:
            raise StablekitError("TRCE: lamb and lr must be > 0, preserve_scale and preserve_weight >= 0")
        if not 0 < self.early <= 1 or self.beta <= 0 or self.margin < 0 or self.guidance < 0:
            raise StablekitError("TRCE: early in (0, 1], beta > 0, margin and guidance >= 0")


def pair_rows(ids_bad: list[int], ids_safe: list[int], length: int) -> dict[str, list]:
    """Per token group, the aligned ``(position in the malicious row, position in the safe row)`` pairs of two
    token-id rows that differ only in the middle (the keyword and its replacement), both padded to `length`."""
    pre = 0
    while pre < min(len(ids_bad), len(ids_safe)) - 1 and ids_bad[pre] == ids_safe[pre]:
        pre += 1
    suf = 0
    while suf < min(len(ids_bad), len(ids_safe)) - pre and ids_bad[-1 - suf] == ids_safe[-1 - suf]:
        suf += 1
    nb, ns = len(ids_bad), len(ids_safe)
    context = [(k, k) for k in range(1, pre)] + [(nb - 1 - j, ns - 1 - j) for j in range(1, suf)]
    return {
        "start": [(0, 0)],
        "end": [(nb - 1, ns - 1)],
        "padding": [(k, min(max(k, ns), length - 1)) for k in range(nb, length)],
        "keyword": [(k, length - 1) for k in range(pre, nb - suf)],
        "context": context,
    }


def _stage1_rows(pipe, pairs: list[tuple[str, str]], weights: tuple[float, ...]):
    """The malicious (``c``) and safe (``s``) embedding rows of stage 1, each scaled by the square root of its token
    group's weight (the reference weighs the padding group by its count: one row per position here)."""
    length = tokenizer(pipe).model_max_length
    c_rows, s_rows = [], []
    for bad, safe in pairs:
        ib, isafe = token_ids(pipe, bad), token_ids(pipe, safe)
        emb = encode_ids(pipe, [ib, isafe]).float()
        for group, w in zip(GROUPS, weights, strict=True):
            for kb, ks in pair_rows(ib, isafe, length)[group] if w else ():
                c_rows.append(w**0.5 * emb[0, kb])
                s_rows.append(w**0.5 * emb[1, ks])
    return torch.stack(c_rows), torch.stack(s_rows)


@torch.no_grad()
def stage1(pipe, cfg: TRCEConfig, pairs: list[tuple[str, str]], preserve: list[str]) -> dict[str, torch.Tensor]:
    """Stage 1's deltas of the cross-attention keys and values (``{"unet.<module>.to_k.weight": delta}``)."""
    c, s = _stage1_rows(pipe, pairs, cfg.token_weights)
    p = encode_ids(pipe, [token_ids(pipe, t) for t in preserve]).float().flatten(0, 1) if preserve else c[:0]
    erase_scale = 1.0 / len(pairs)
    preserve_scale = cfg.preserve_scale / max(1, len(preserve))
    out = {}
    for name, w in cross_attention_weights(pipe.unet).items():
        # closed_form maps c to W g: the safe rows are the guide
        new = closed_form(w, c, s, p, erase_scale, preserve_scale, cfg.lamb)
        out[name] = (new - w.double()).float().cpu()
    return out


def stage2_parameters(unet) -> dict[str, torch.nn.Parameter]:
    """``{"unet.<name>": parameter}``: what stage 2 trains, the self-attention layers and the cross-attention
    queries (the reference's ``attn1`` and ``attn2.to_q``)."""
    return {f"unet.{n}": p for n, p in unet.named_parameters() if ".attn1." in n or (".attn2." in n and ".to_q." in n)}


class TRCE(ConceptEdit):
    """A two-stage UNet erasure; ``TRCE.train(pipe, concept, ...)`` makes one, ``TRCE.load`` reads one.
    ``TRCE(concepts, deltas, meta=None, **params)``."""

    name = "trce"
    Config = TRCEConfig

    title = "TRCE"

    @classmethod
    def train(cls, pipe, concept: str, prompts=None, preserve=None, progress: bool = True, **params) -> TRCE:
        """Erase `concept` from `pipe`'s UNet. `prompts`: training prompts containing the concept word (default:
        generic templates of it), each also used with every word of ``keywords``; `preserve`: prompts whose
        generations must not change (default: none for stage 1, the anchor's prompts for stage 2)."""
        cfg = TRCEConfig(concepts=(concept,), **params)
        prompts = training_prompts(prompts, concept, "TRCE")
        pairs = [
            (replace_word(p, concept, word), replace_word(p, concept, cfg.anchor))
            for p in prompts
            for word in (concept, *cfg.keywords)
        ]
        preserve = list(preserve or [])
        deltas = stage1(pipe, cfg, pairs, preserve)
        base = {**cross_attention_weights(pipe.unet), **stage2_parameters(pipe.unet)}
        meta = {"base_norms": json.dumps(weight_norms(pipe, base))}
        edit = cls(cfg.concepts, deltas, meta, **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "concepts"})
        if cfg.iterations:
            anchors = preserve or [p for _, p in pairs]
            edit.deltas |= _Steering(pipe, cfg, pairs, anchors).run(edit, progress)
        return edit


class _Steering:
    """Stage 2 of :meth:`TRCE.train`: trajectories, the original and stage-1 models' targets, the training loop."""

    def __init__(self, pipe, cfg: TRCEConfig, pairs: list[tuple[str, str]], preserve: list[str]):
        self.pipe, self.cfg, self.pairs, self.preserve = pipe, cfg, pairs, preserve

    def embed(self, texts: list[str]) -> torch.Tensor:
        return encode_ids(self.pipe, [token_ids(self.pipe, t) for t in texts]).float()

    @torch.no_grad()
    def trajectories(self, texts: list[str], seed: int, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampler's ``(latents (steps, N, ...), timesteps (steps,))`` for `texts` (prompt i with noise seed
        ``seed * 100_000 + i``): the UNet's inputs at each step of the pipeline's own sampling (conditional half)."""
        from ..pipeline import guidance_rescale

        seen = []

        def grab(module, args, kwargs):
            x = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            seen.append((x[x.shape[0] // 2 :].detach().float().cpu(), float(t.flatten()[0])))

        handle = self.pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
        kw = dict(num_inference_steps=self.cfg.steps, guidance_rescale=guidance_rescale(self.pipe))
        parts = []
        try:
            for k in range(0, len(texts), chunk):
                seen.clear()
                gens = [
                    torch.Generator("cpu").manual_seed(seed * 100_000 + k + i)
                    for i in range(len(texts[k : k + chunk]))
                ]
                self.pipe(texts[k : k + chunk], generator=gens, output_type="latent", **kw)
                parts.append(torch.stack([x for x, _ in seen]))
        finally:
            handle.remove()
        return torch.cat(parts, dim=1), torch.tensor([t for _, t in seen])

    def predict(self, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """The UNet's predictions, `chunk` rows at a time (differentiable where gradients are on)."""
        unet, out = self.pipe.unet, []
        for k in range(0, len(x), chunk):
            xs, ts, es = (v[k : k + chunk] for v in (x, t, e))
            out.append(unet(xs.to(unet.device, unet.dtype), ts.to(unet.device), es.to(unet.device, unet.dtype)).sample)
        return torch.cat(out).float()

    @torch.no_grad()
    def targets(self, edit: TRCE) -> dict:
        """Early trajectory points of the malicious prompts with the original model's guided safe and unsafe
        predictions; every trajectory point of the preservation prompts with the stage-1 model's predictions."""
        from ..plugins import use

        cfg, g = self.cfg, self.cfg.guidance
        bad, safe = [b for b, _ in self.pairs], [s for _, s in self.pairs]
        xs, ts = self.trajectories(bad, cfg.seed)
        early = max(1, round(cfg.early * len(ts)))
        x, t = xs[:early].flatten(0, 1), ts[:early].repeat_interleave(len(bad))
        e_bad, e_safe, e_null = self.embed(bad), self.embed(safe), self.embed([""])
        rep = early
        pb = self.predict(x, t, e_bad.repeat(rep, 1, 1))
        ps = self.predict(x, t, e_safe.repeat(rep, 1, 1))
        pn = self.predict(x, t, e_null.expand(len(x), -1, -1))
        out = {"x": x, "t": t, "e": e_bad.repeat(rep, 1, 1), "safe": ps + g * (ps - pn), "unsafe": pb + g * (pb - pn)}
        xr, tr = self.trajectories(self.preserve, cfg.seed + 1)
        k = len(self.preserve)
        out |= {
            "xr": xr.flatten(0, 1),
            "tr": tr.repeat_interleave(k),
            "er": self.embed(self.preserve).repeat(len(tr), 1, 1),
        }
        with use(self.pipe, WeightEdit(edit.deltas)):
            out["keep"] = self.predict(out["xr"], out["tr"], out["er"])
            out["keep_null"] = self.predict(out["xr"], out["tr"], e_null.expand(len(out["xr"]), -1, -1))
        out["null"] = e_null
        return out

    def hinge(self, pred: torch.Tensor, safe: torch.Tensor, unsafe: torch.Tensor) -> torch.Tensor:
        to_safe = (pred - safe).pow(2).mean(dim=(1, 2, 3))
        to_unsafe = (pred - unsafe).pow(2).mean(dim=(1, 2, 3))
        return (self.cfg.beta * (to_safe - to_unsafe + self.cfg.margin)).clamp(min=0).mean()

    def loss(self, ref: dict, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch's (contrastive steering loss, preservation loss)."""
        cfg = self.cfg
        i = torch.tensor(rng.sample(range(len(ref["x"])), min(cfg.batch, len(ref["x"]))))
        x, t, safe, unsafe = ref["x"][i], ref["t"][i], ref["safe"][i], ref["unsafe"][i]
        cond = self.hinge(self.predict(x, t, ref["e"][i]), safe, unsafe)
        uncond = self.hinge(self.predict(x, t, ref["null"].expand(len(i), -1, -1)), safe, unsafe)
        j = torch.tensor(rng.sample(range(len(ref["xr"])), min(cfg.batch, len(ref["xr"]))))
        xr, tr = ref["xr"][j], ref["tr"][j]
        keep = F.mse_loss(self.predict(xr, tr, ref["er"][j]), ref["keep"][j])
        keep = keep + F.mse_loss(self.predict(xr, tr, ref["null"].expand(len(j), -1, -1)), ref["keep_null"][j])
        return (cond + uncond) / 2, keep

    def run(self, edit: TRCE, progress: bool) -> dict[str, torch.Tensor]:
        """Stage 2's deltas (``{"unet.<name>": delta}``), trained on top of stage 1's `edit`."""
        from tqdm.auto import tqdm

        from ..pipeline import frozen
        from ..plugins import use

        ref = self.targets(edit)
        params = stage2_parameters(self.pipe.unet)
        start = {n: p.detach().clone() for n, p in params.items()}
        rng = random.Random(self.cfg.seed)
        bar = tqdm(range(self.cfg.iterations), desc="train TRCE stage 2", disable=None if progress else True)
        opt = torch.optim.Adam(params.values(), lr=self.cfg.lr)
        try:
            with frozen(self.pipe.unet, self.pipe.text_encoder), use(self.pipe, WeightEdit(edit.deltas)):
                for p in params.values():
                    p.requires_grad_(True)
                for _ in bar:
                    steer, keep = self.loss(ref, rng)
                    opt.zero_grad(set_to_none=True)
                    (steer + self.cfg.preserve_weight * keep).backward()
                    opt.step()
                    bar.set_postfix(steer=f"{steer.item():.4f}", keep=f"{keep.item():.5f}", refresh=False)
                deltas = {n: (p.detach() - start[n]).float().cpu() for n, p in params.items()}
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(start[n])
        return deltas
