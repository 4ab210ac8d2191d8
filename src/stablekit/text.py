"""Token embeddings from a pipeline's own text encoder(s), in the space its ``encode_prompt`` produces.

Guards, erasure and red-team attacks work on token embeddings of concept words and of edited token sequences (a
prompt with one token left out, optimised tokens), which ``encode_prompt`` cannot make from text alone.
:class:`Slots` hooks the first text encoder's input-embedding table so that chosen positions of a token-id row
take given embeddings (any encoder: CLIP, BERT...), for the attacks and defenses that optimise prompt tokens,
and decodes the tokens nearest to them back to text.
:func:`encode_ids` runs token-id rows through the encoders the way the pipelines do: padded to the tokenizer's
length with its pad token, the attention mask passed only where the encoder's config asks for it; SD 1.x/2.x read
the last hidden state (or, with ``clip_skip``, an earlier one through the final layer norm), SDXL concatenates the
penultimate hidden states of both encoders. Both SDXL encoders are given the ids of the first tokenizer (the two
CLIP tokenizers share one vocabulary).
"""

from __future__ import annotations

import torch


def is_clip(pipe) -> bool:
    """Whether every text encoder of `pipe` is a CLIP text model (causal: its end token sums up the prompt)."""
    encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2")]
    return all(getattr(e.config, "model_type", "").startswith("clip") for e in encoders if e is not None)


def tokenizer(pipe):
    return getattr(pipe, "tokenizer", None) or pipe.tokenizer_2


def token_ids(pipe, text: str) -> list[int]:
    """Ids of `text` with its start and end tokens, truncated as the pipeline truncates."""
    tok = tokenizer(pipe)
    return tok(text, truncation=True, max_length=tok.model_max_length).input_ids


def _encoders(pipe) -> list[tuple]:
    pairs = [
        (getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
        (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None)),
    ]
    return [(tok, enc) for tok, enc in pairs if enc is not None]


def _padded(tok, rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    n = tok.model_max_length
    ids = torch.tensor([r + [tok.pad_token_id] * (n - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows], device=device)
    return ids, mask


def encode_ids(pipe, rows: list[list[int]], clip_skip: int | None = None, grad: bool = False) -> torch.Tensor:
    """``(len(rows), max_length, dim)`` token embeddings of token-id rows, as ``encode_prompt`` makes them
    (differentiable with ``grad=True``, for attacks that optimise input token embeddings)."""
    with torch.set_grad_enabled(grad):
        return _encode(pipe, rows, clip_skip)


def _encode(pipe, rows, clip_skip):
    xl = hasattr(pipe, "text_encoder_2")
    out = []
    for tok, enc in _encoders(pipe):
        ids, mask = _padded(tok, rows, enc.device)
        use_mask = getattr(enc.config, "use_attention_mask", False)
        res = enc(ids, attention_mask=mask if use_mask else None, output_hidden_states=True)
        if xl:
            out.append(res.hidden_states[-(clip_skip or 0) - 2])
        elif clip_skip:
            out.append(enc.text_model.final_layer_norm(res.hidden_states[-(clip_skip + 1)]))
        else:
            out.append(res[0])
    return torch.cat(out, dim=-1)


class Slots:
    """Token-id row ``[start] + k slots + prompt tokens + [end]`` (or the slots at `positions` of a given row)."""

    def __init__(self, pipe, k: int, prompt: str = ""):
        self.pipe, self.tok = pipe, tokenizer(pipe)
        ids = token_ids(pipe, prompt)
        filler = self.tok.unk_token_id if self.tok.unk_token_id is not None else ids[-1]
        self.row = ids[:1] + [filler] * k + ids[1:]
        self.positions = list(range(1, k + 1))
        self.table = pipe.text_encoder.get_input_embeddings().weight  # (vocab, dim)
        self.embeds = None

    def _hook(self, module, inputs, output):
        if self.embeds is None:
            return output
        out = output.clone()
        out[:, self.positions] = self.embeds.to(out.dtype)
        return out

    def encode(self, embeds: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings ``(1, length, dim)`` with the slots' input embeddings `embeds` ``(k, dim)``
        (differentiable)."""
        handle = self.pipe.text_encoder.get_input_embeddings().register_forward_hook(self._hook)
        self.embeds = embeds
        try:
            return encode_ids(self.pipe, [self.row], getattr(self.pipe, "clip_skip", None), grad=True)
        finally:
            self.embeds = None
            handle.remove()

    def nearest(self, embeds: torch.Tensor) -> torch.Tensor:
        """The vocabulary ids nearest (cosine) to `embeds` ``(k, dim)``, special tokens excluded."""
        table = torch.nn.functional.normalize(self.table.detach().float(), dim=-1)
        sim = torch.nn.functional.normalize(embeds.detach().float(), dim=-1) @ table.T
        sim[:, self.tok.all_special_ids] = -2
        return sim.argmax(dim=-1)

    def text(self, ids: torch.Tensor) -> str:
        """The prompt with the slots filled by token `ids`, as text."""
        row = list(self.row)
        for p, i in zip(self.positions, ids.tolist(), strict=False):
            row[p] = i
        return self.tok.decode(row[1:-1], skip_special_tokens=True)
