"""Contrastive search (Su et al., 2022), step for step as transformers 4.x did it.

At each step the `top_k` most probable next tokens (softmax of the processed logits)
are candidates. Each candidate is run through the model once, as one batch of
`batch * top_k` rows sharing the prompt's KV cache, which gives its final hidden
state (the last block's output after `ln_final`, what transformers reads as
`hidden_states[-1]` for GPT-2). A candidate scores

    (1 - penalty_alpha) * p(candidate) - penalty_alpha * max_j cos(h_candidate, h_j)

where h_j runs over the final hidden states of every earlier token, prompt included
(left padding excluded, as transformers does with the attention mask); the best
candidate is the next token, and its logits are the next step's distribution.

The cache keeps `batch * top_k` rows throughout: all rows of a prompt share their
history, so after a step only the newest position differs between them, and copying
the chosen candidate's keys/values at that one position to its siblings is all the
bookkeeping needed (transformers copies the whole cache each step). The final hidden
states are read from the `blocks.{last}.hook_resid_post` hook point and normalised
with the model's own `ln_final`, so the forward pass itself is unchanged.

transformers 5 moved contrastive search to the Hub
(`transformers-community/contrastive-search`, same code as 4.x's `_contrastive_search`).
One difference: the softmax and the cosine similarities are computed in float32
whatever the model dtype (transformers uses the model's dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from ..errors import GPT2LabError
from ..validate import integer, is_int, number, show
from .generate import check_decoding_memory, check_finite, end_ids

if TYPE_CHECKING:
    from ..model import GPT2, KVCache

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_contrastive(model: GPT2, penalty_alpha, top_k) -> None:
    """Raise GPT2LabError unless penalty_alpha is in [0, 1] and 2 <= top_k <= vocabulary."""
    number("penalty_alpha", penalty_alpha, 0, 1)
    if not is_int(top_k) or not 2 <= top_k <= model.cfg.d_vocab:
        raise GPT2LabError(
            f"contrastive search (penalty_alpha > 0) needs top_k >= 2 candidates per step "
            f"(at most the vocabulary, {model.cfg.d_vocab}), got top_k={show(top_k)}"
        )


def _forward(model: GPT2, tokens, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the final hidden states (after ln_final, every position) of one call."""
    box: list[torch.Tensor] = []

    def grab(x: torch.Tensor, _hook) -> None:
        box.append(x)

    with model.hooks([(model.blocks[-1].hook_resid_post.name, grab)]):
        logits = model(tokens, **kwargs)
    return logits, model.ln_final(box[-1])


def _keep_selected(cache: KVCache, pos: int, source: torch.Tensor, k: int) -> None:
    """Give every row of a prompt the chosen candidate's keys/values at `pos`."""
    for t in (cache.k, cache.v):  # [layer, batch * k, head, pos, d_head]
        at = t[:, :, :, pos]  # a view: [layer, batch * k, head, d_head]
        at.copy_(at.index_select(1, source).repeat_interleave(k, dim=1))


@torch.inference_mode()
def contrastive_steps(
    model: GPT2,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    penalty_alpha: float,
    top_k: int,
    max_new_tokens: int,
    stop_ids: Iterable[int] = (50256,),
    logits_processor: LogitsProcessor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (next tokens [B], their log-probs [B], finished [B] before this step).

    The same protocol as generate.py's greedy/sampling loop: rows that finished (on a
    `stop_ids` token) get `<|endoftext|>` from then on; the log-prob is the raw
    model's (log_softmax of the unprocessed logits) for the chosen token.
    """
    check_contrastive(model, penalty_alpha, top_k)
    tokens = model._check_tokens(tokens)
    B, T = tokens.shape
    integer("max_new_tokens", max_new_tokens, 1)
    if T + max_new_tokens > model.cfg.n_ctx:
        raise GPT2LabError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
            f"{model.cfg.n_ctx}"
        )
    k, dev = top_k, tokens.device
    rows = torch.arange(B, device=dev)
    eot = model.tokenizer.eot_token
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=dev)

    check_decoding_memory(
        model, f"contrastive search with top_k={k} x {B} prompts x {T + max_new_tokens} "
        "positions", B * k, T + max_new_tokens, copies=2, vocab_buffers=2,
        hint="use a smaller top_k, fewer prompts or fewer new tokens",
    )  # fmt: skip
    cache = model.new_cache(B, T + max_new_tokens)
    logits, hidden = _forward(
        model, tokens, attention_mask=attention_mask, cache=cache, logits_to_keep=1
    )
    logits = logits[:, -1].float()
    check_finite(logits)
    # every token's final hidden state, and which of them count (not left padding)
    context = hidden.new_zeros(B, T + max_new_tokens, hidden.shape[-1], dtype=torch.float32)
    context[:, :T] = hidden.float()
    valid = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=dev)
    if attention_mask is not None:
        valid[:, :T] = attention_mask.to(dev).bool()
    cache.reorder(rows.repeat_interleave(k))  # k rows per prompt from here on

    seq = torch.cat([tokens, tokens.new_empty(B, max_new_tokens)], dim=1)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for step in range(max_new_tokens):
        cur = T + step
        logprobs = torch.log_softmax(logits, dim=-1)
        scores = logits if logits_processor is None else logits_processor(seq[:, :cur], logits)
        top_probs, top_ids = torch.softmax(scores, dim=-1).topk(k, dim=-1)  # [B, k]

        cand_logits, cand_hidden = _forward(model, top_ids.reshape(-1, 1), cache=cache)
        cand = cand_hidden[:, -1].float().view(B, k, -1)
        ctx = context[:, :cur]
        cosine = (cand / cand.norm(dim=-1, keepdim=True)) @ (
            ctx / ctx.norm(dim=-1, keepdim=True)
        ).transpose(1, 2)  # [B, k, cur]
        cosine = cosine.masked_fill(~valid[:, None, :cur], float("-inf"))
        penalty = cosine.max(dim=-1).values
        chosen = ((1.0 - penalty_alpha) * top_probs - penalty_alpha * penalty).argmax(-1)

        next_token = torch.where(done, eot, top_ids[rows, chosen])
        seq[:, cur] = next_token
        context[:, cur] = cand[rows, chosen]
        source = rows * k + chosen
        logits = cand_logits[source, -1].float()
        _keep_selected(cache, cur, source, k)
        logprob = logprobs.gather(1, next_token[:, None]).squeeze(1)
        yield next_token.tolist(), logprob.tolist(), done.tolist()  # lists, as generate's _steps
        done |= torch.isin(next_token, stops)
        if bool(done.all()):
            return


def contrastive_search(
    model: GPT2,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    penalty_alpha: float,
    top_k: int,
    max_new_tokens: int,
    eos_token_id: int | Iterable[int] | None = 50256,
    logits_processor: LogitsProcessor | None = None,
) -> list[list[int]]:
    """Contrastive search from left-padded prompts `tokens` [batch, pos] (mask: 1 = token).

    Returns the new token ids per prompt, ending with the EOS token when the row
    finished on one. `logits_processor(input_ids, logits)` is applied to the float32
    logits before the softmax that ranks the candidates (penalties, bad words...).
    """
    eos = end_ids(model, "eos_token_id", eos_token_id)
    out: list[list[int]] = [[] for _ in range(tokens.shape[0] if tokens.dim() == 2 else 1)]
    for next_token, _, finished in contrastive_steps(
        model, tokens, attention_mask, penalty_alpha=penalty_alpha, top_k=top_k,
        max_new_tokens=max_new_tokens, stop_ids=eos, logits_processor=logits_processor,
    ):  # fmt: skip
        for b, (t, was_done) in enumerate(zip(next_token, finished, strict=True)):
            if not was_done:
                out[b].append(t)
    return out
