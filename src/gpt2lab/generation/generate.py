"""The decoding loop: prefill the prompt once, then one token at a time from the KV cache.

A batch of prompts is left-padded so every row's next token sits in the last
column; the attention mask and position ids make the padding invisible, so each row
gets exactly the tokens it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import GPT2LabError

if TYPE_CHECKING:
    from ..model import GPT2


@dataclass
class GenerationResult:
    """What a generation produced, per batch row."""

    tokens: list[list[int]]  # new tokens only (an ending <|endoftext|> is left out)
    logprobs: list[list[float]]  # log-probability of each new token under the model
    finish_reasons: list[str]  # "stop" (end-of-text) or "length"
    texts: list[str] = field(default_factory=list)


def _prompt_tokens(model: GPT2, prompt) -> tuple[torch.Tensor, torch.Tensor | None, bool, bool]:
    """(tokens, mask, input was text, input was a single item)."""
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)
    ):
        tokens, mask = model.to_tokens(prompt, return_mask=True)
        return tokens, mask, True, isinstance(prompt, str)
    if isinstance(prompt, torch.Tensor):
        tokens = prompt if prompt.dim() == 2 else prompt.unsqueeze(0)
        return tokens.to(model.device), None, False, prompt.dim() == 1
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return torch.tensor([prompt], device=model.device), None, False, True
    raise GPT2LabError(
        "prompt must be a string, a list of strings, a list of token ids or a tensor of ids"
    )


@torch.inference_mode()
def generate(
    model: GPT2,
    prompt,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int | None = None,
    stop_at_eot: bool = True,
    return_result: bool = False,
):
    """Continue `prompt`; temperature 0 is greedy, above 0 samples from softmax(logits / T).

    Returns the continuation as text for text input (a list for a list of prompts),
    token ids for id input, or a `GenerationResult` with `return_result=True`.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GPT2LabError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise GPT2LabError(f"temperature must be >= 0, got {temperature!r}")
    tokens, mask, is_text, single = _prompt_tokens(model, prompt)
    B, T = tokens.shape
    if T + max_new_tokens > model.cfg.n_ctx:
        raise GPT2LabError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of {model.cfg.n_ctx}"
        )
    gen = torch.Generator(device=model.device)
    gen.manual_seed(seed if seed is not None else int(torch.randint(2**31, ()).item()))
    eot = model.tokenizer.eot_token

    cache = model.new_cache(B, T + max_new_tokens)
    logits = model(tokens, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    new_tokens, new_logprobs = [], []
    for step in range(max_new_tokens):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if temperature == 0:
            next_token = logprobs.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        next_token = torch.where(done, eot, next_token)
        new_tokens.append(next_token)
        new_logprobs.append(logprobs.gather(1, next_token[:, None]).squeeze(1))
        if stop_at_eot:
            done |= next_token == eot
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(next_token[:, None], cache=cache)[:, -1]

    out = torch.stack(new_tokens, 1).tolist()
    lps = torch.stack(new_logprobs, 1).tolist()
    result = GenerationResult([], [], [])
    for row, row_lp in zip(out, lps, strict=True):
        n = row.index(eot) if stop_at_eot and eot in row else len(row)
        result.tokens.append(row[:n])
        result.logprobs.append(row_lp[:n])
        result.finish_reasons.append("stop" if n < len(row) else "length")
    result.texts = [model.tokenizer.decode(t) for t in result.tokens]
    if return_result:
        return result
    value = result.texts if is_text else result.tokens
    return value[0] if single else value
