"""Direct logit attribution: how much each component writes a logit (difference) directly.

The final residual stream is a sum of parts (token and position embeddings, every
attention layer / head, every MLP layer / neuron). The final LayerNorm centres it, divides
it by one scale per position and applies an affine map, and the unembedding reads it.
With the scale frozen at its value in the real run, that whole path is linear, so

    logit(a) - logit(b) = sum_i  centre(part_i) / scale . (w_ln * (W_U[:, a] - W_U[:, b]))
                          + b_ln . (W_U[:, a] - W_U[:, b]) + b_U[a] - b_U[b]

exactly: each part gets its term, and the constant terms are reported as "bias". This
works on processed models (where w_ln = 1, b_ln = 0 and b_U holds the folded bias) and
unprocessed ones alike. Parts are projected before they are expanded, so attributing to
every neuron of a large model never materialises a [neurons, d_model] stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import GPT2LabError
from ..inputs import prompt_kind, single_token_id, to_batch
from .processing import processing_of

if TYPE_CHECKING:
    from ..model import GPT2

BY = ("component", "layer", "head", "neuron")


@dataclass
class Attribution:
    """What each component adds to the target logit (difference), at one position.

    `values[i]` belongs to `labels[i]`; [components] for one prompt, [components, batch]
    for a batch. The values sum to `total`, the model's actual logit (difference).
    """

    labels: list[str]
    values: torch.Tensor
    total: torch.Tensor
    target: str  # what was attributed, e.g. "logit(' Paris') - logit(' London')"
    processed: bool  # whether the model's weights were processed

    def top(self, k: int = 10, *, absolute: bool = True) -> list[tuple[str, float]]:
        """The k largest components as (label, value), by |value| unless `absolute=False`;
        for a batch, ranked by the mean over the batch."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise GPT2LabError(f"top(k) needs a positive integer k, got {k!r}")
        score = self.values if self.values.dim() == 1 else self.values.mean(-1)
        order = (score.abs() if absolute else score).argsort(descending=True)[:k]
        return [(self.labels[i], float(score[i])) for i in order.tolist()]

    def __getitem__(self, label: str) -> torch.Tensor:
        try:
            return self.values[self.labels.index(label)]
        except ValueError:
            raise GPT2LabError(f"no component labelled {label!r}") from None

    def __len__(self) -> int:
        return len(self.labels)


def direct_logit_attribution(
    model: GPT2,
    tokens_or_text: Any,
    answer: Any,
    wrong: Any = None,
    *,
    by: str = "component",
    pos: int = -1,
    attention_mask: torch.Tensor | None = None,
) -> Attribution:
    """Split the logit of `answer` (minus that of `wrong`, when given) at position `pos`
    into the direct contributions of the model's components.

    `tokens_or_text`: a string, a list of strings (left-padded, so pos=-1 is each row's
    last token) or token ids [pos] / [batch, pos]. `answer` / `wrong`: a one-token string
    such as " Paris", a token id, or one id / string per batch row. `by`:
    "component" (embed, pos_embed, each layer's attn_out and mlp_out), "layer" (attention
    plus MLP of each layer), "head" (each head, MLPs whole) or "neuron" (each MLP neuron,
    attention layers whole); output biases not in a part go to "bias" with ln_final's bias
    and b_U.
    """
    if by not in BY:
        raise GPT2LabError(f"by must be one of {', '.join(BY)}; got {by!r}")
    tokens, attention_mask, single = _prompt(model, tokens_or_text, attention_mask)
    B, T = tokens.shape
    if isinstance(pos, bool) or not isinstance(pos, int) or not -T <= pos < T:
        raise GPT2LabError(f"pos must be an int in [-{T}, {T}) for {T} tokens, got {pos!r}")
    pos %= T
    answer_ids = _answer_ids(model, answer, B, "answer")
    wrong_ids = None if wrong is None else _answer_ids(model, wrong, B, "wrong")

    cfg = model.cfg
    names = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale"]
    for i in range(cfg.n_layers):
        names.append(f"blocks.{i}.hook_attn_out" if by != "head" else f"blocks.{i}.attn.hook_z")
        names.append(f"blocks.{i}.hook_mlp_out" if by != "neuron" else f"blocks.{i}.mlp.hook_post")
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            tokens, attention_mask=attention_mask, names_filter=names, pos_slice=[pos]
        )
    acts = {name: x[:, 0].float() for name, x in cache.items()}  # the position axis is 1 long
    total = logits[:, pos].float().gather(1, answer_ids[:, None])[:, 0]
    if wrong_ids is not None:
        total = total - logits[:, pos].float().gather(1, wrong_ids[:, None])[:, 0]

    # The direction each part is read along (centring and the frozen scale folded in),
    # and the constant terms.
    unembed_w = model.unembed.weight if model.unembed.weight is not None else model.wte.weight
    unembed_w = unembed_w.detach().float()
    unembed_b = model.unembed.bias
    unembed_b = (
        torch.zeros(cfg.d_vocab, device=unembed_w.device)
        if unembed_b is None
        else unembed_b.detach().float()
    )
    u, bias = unembed_w[answer_ids], unembed_b[answer_ids]  # [B, d_model], [B]
    if wrong_ids is not None:
        u, bias = u - unembed_w[wrong_ids], bias - unembed_b[wrong_ids]
    ln = model.ln_final
    direction = u * ln.weight.detach().float()
    direction = direction - direction.mean(-1, keepdim=True)  # centre(x) . d == x . centre(d)
    direction = direction / acts["ln_final.hook_scale"]  # [B, d_model], scale is [B, 1]
    bias = bias + u @ ln.bias.detach().float()

    def read(x: torch.Tensor) -> torch.Tensor:  # [B, d_model] or [d_model] -> [B]
        return (x * direction).sum(-1)

    labels = ["embed", "pos_embed"]
    parts = [read(acts["hook_embed"])[None], read(acts["hook_pos_embed"])[None]]  # [1, B] each
    for i, block in enumerate(model.blocks):
        attn_out = acts.get(f"blocks.{i}.hook_attn_out")
        mlp_out = acts.get(f"blocks.{i}.hook_mlp_out")
        if by == "layer":
            labels.append(f"L{i}")
            parts.append(read(attn_out + mlp_out)[None])
            continue
        if by == "head":
            W_O = block.attn.c_proj.weight.detach().float()  # [d_model, heads * d_head]
            z = acts[f"blocks.{i}.attn.hook_z"]  # [B, heads, d_head]
            per_head = (direction @ W_O).view(B, cfg.n_heads, cfg.d_head)
            labels += [f"L{i}H{h}" for h in range(cfg.n_heads)]
            parts.append((z * per_head).sum(-1).T)  # [heads, B]
            bias = bias + read(block.attn.c_proj.bias.detach().float())
        else:
            labels.append(f"{i}_attn_out")
            parts.append(read(attn_out)[None])
        if by == "neuron":
            W_out = block.mlp.c_proj.weight.detach().float()  # [d_model, d_mlp]
            post = acts[f"blocks.{i}.mlp.hook_post"]  # [B, d_mlp]
            labels += [f"L{i}N{k}" for k in range(cfg.d_mlp)]
            parts.append((post * (direction @ W_out)).T)  # [d_mlp, B]
            bias = bias + read(block.mlp.c_proj.bias.detach().float())
        else:
            labels.append(f"{i}_mlp_out")
            parts.append(read(mlp_out)[None])
    labels.append("bias")
    parts.append(bias[None])
    values = torch.cat(parts)  # [components, B]
    if single:
        values, total = values[:, 0], total[0]
    return Attribution(
        labels=labels,
        values=values,
        total=total,
        target=_describe(model, answer_ids, wrong_ids),
        processed=processing_of(model) is not None,
    )


def _prompt(
    model: GPT2, prompt: Any, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(tokens [batch, pos], attention mask, whether a single prompt was given). Text is
    left-padded (pos=-1 is each row's last token), BOS as the model's default says."""
    kind = prompt_kind(prompt)
    if kind in ("text", "texts") and not isinstance(prompt, tuple):
        if attention_mask is not None:
            raise GPT2LabError("attention_mask goes with token ids; text is padded for you")
    elif kind != "tensor":
        raise GPT2LabError("give the prompt as text, a list of texts, or a tensor of token ids")
    batch = to_batch(
        model.tokenizer,
        prompt,
        prepend_bos=model.default_prepend_bos,
        padding_side="left",
        attention_mask=attention_mask,
        device=model.device if kind != "tensor" else None,
    )
    return batch.tokens, batch.mask, batch.single


def _answer_ids(model: GPT2, answer: Any, batch: int, what: str) -> torch.Tensor:
    """One token id per batch row, from a one-token string, an id, or one per row."""
    items = list(answer) if isinstance(answer, (list, tuple)) else None
    if isinstance(answer, torch.Tensor):
        if answer.is_floating_point() or answer.dtype == torch.bool or answer.dim() > 1:
            raise GPT2LabError(f"{what} must be integer token ids [batch], got {answer.dtype}")
        items = answer.reshape(-1).tolist()
    if items is None:
        items = [answer]
    if len(items) == 1:
        items = items * batch
    if len(items) != batch:
        raise GPT2LabError(f"{what} has {len(items)} tokens for a batch of {batch} prompts")
    ids = [single_token_id(model.tokenizer, item, model.cfg.d_vocab, what=what) for item in items]
    return torch.tensor(ids, dtype=torch.long, device=model.device)


def _describe(model: GPT2, answer: torch.Tensor, wrong: torch.Tensor | None) -> str:
    def name(ids: torch.Tensor) -> str:
        unique = ids.unique().tolist()
        if len(unique) > 1:
            return "per-row tokens"
        return repr(model.tokenizer.decode([unique[0]]))

    text = f"logit({name(answer)})"
    return text if wrong is None else f"{text} - logit({name(wrong)})"
