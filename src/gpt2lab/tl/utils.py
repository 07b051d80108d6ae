"""The helpers of `transformer_lens.utils` that notebooks call, for gpt2lab models.

Same names, arguments and results as TransformerLens 3.9, so `utils.get_act_name(...)`,
`utils.test_prompt(...)` and friends keep working after the import changes. Where gpt2lab
already has the function (get_act_name), this calls it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ..errors import GPT2LabError
from ..interp.cache import get_act_name

__all__ = [
    "get_act_name",
    "get_device",
    "lm_accuracy",
    "lm_cross_entropy_loss",
    "remove_batch_dim",
    "test_prompt",
    "to_numpy",
    "tokenize_and_concatenate",
]

# get_act_name is gpt2lab's (interp.cache), TransformerLens' rules: "resid_pre", 3 ->
# "blocks.3.hook_resid_pre"; ("q", 3) -> "blocks.3.attn.hook_q"; "attn" -> "pattern";
# "k6" -> "blocks.6.attn.hook_k"; ("scale", 4, "ln1"); "scale" -> "ln_final.hook_scale".
# It differs from TransformerLens' only where TransformerLens returns a name that no
# GPT-2 has: "resid_pre5" (TransformerLens: "hook_resid_pre5"; here the layer is read
# from it, "blocks.5.hook_resid_pre") and the sub-module of hooks GPT-2 lacks ("mid",
# "pre_linear", "rot_k", "rot_q").


def get_device() -> str:
    """The device TransformerLens picks: "cuda" if there is a GPU, else "cpu" ("mps" on a
    Mac only with TRANSFORMERLENS_ALLOW_MPS=1, as in TransformerLens)."""
    if torch.cuda.is_available():
        return "cuda"
    mps = torch.backends.mps
    if mps.is_available() and mps.is_built() and os.environ.get("TRANSFORMERLENS_ALLOW_MPS") == "1":
        return "mps"
    return "cpu"


def to_numpy(tensor: Any) -> np.ndarray:
    """A tensor (detached, on the CPU; bfloat16 as float32), list, tuple or scalar as a
    numpy array."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, (list, tuple)):
        return np.array(tensor)
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().cpu()
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    if isinstance(tensor, (int, float, bool, str)):
        return np.array(tensor)
    raise GPT2LabError(
        f"to_numpy takes a tensor, array, list or number, got {type(tensor).__name__}"
    )


def remove_batch_dim(tensor: torch.Tensor) -> torch.Tensor:
    """Drop the first axis if it has length 1 (a batch of one), else the tensor as it is."""
    return tensor.squeeze(0) if tensor.shape[0] == 1 else tensor


def lm_cross_entropy_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    per_token: bool = False,
) -> torch.Tensor:
    """Next-token cross-entropy: position i's logits predict token i + 1. The mean over
    the [batch, pos - 1] predictions, or each of them (`per_token`); `attention_mask`
    leaves out predictions of or from padding (0 there with `per_token`)."""
    log_probs = logits.log_softmax(-1)
    predicted = log_probs[..., :-1, :].gather(-1, tokens[..., 1:, None])[..., 0]
    if attention_mask is None:
        n_tokens = predicted.numel()
    else:
        if attention_mask.shape != tokens.shape:
            raise GPT2LabError(
                f"attention_mask must have the shape of tokens {tuple(tokens.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.bool()
        next_token_mask = mask[:, :-1] & mask[:, 1:]
        predicted = predicted.masked_fill(~next_token_mask, 0.0)
        n_tokens = next_token_mask.sum().item()
    return -predicted if per_token else -predicted.sum() / n_tokens


def lm_accuracy(logits: torch.Tensor, tokens: torch.Tensor, per_token: bool = False):
    """Top-1 next-token accuracy: the fraction (or, with `per_token`, the [batch, pos - 1]
    booleans) of positions whose highest logit is the next token."""
    correct = logits.argmax(-1)[:, :-1] == tokens[:, 1:]
    return correct if per_token else correct.sum() / correct.numel()


def test_prompt(
    prompt: str,
    answer: str | list[str],
    model: Any,
    prepend_space_to_answer: bool = True,
    print_details: bool = True,
    prepend_bos: bool | None = None,
    top_k: int = 10,
) -> None:
    """Print how the model ranks `answer` after `prompt`: the prompt and answer tokens,
    each answer token's rank, logit and probability, the top `top_k` tokens, and the
    answer's ranks, as TransformerLens prints them (without the bold). A list of answers
    compares their first tokens as alternative next tokens. `prepend_bos` defaults to the
    model's `default_prepend_bos` (True after from_pretrained)."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    n_answers = len(answers)
    several = n_answers > 1
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    prompt_tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)
    answer_tokens = model.to_tokens(answers, prepend_bos=False, padding_side="right")
    if several:
        answer_tokens = answer_tokens[:, :1]
    tokens = torch.cat((prompt_tokens.repeat(answer_tokens.shape[0], 1), answer_tokens), dim=1)
    prompt_str_tokens = model.to_str_tokens(prompt, prepend_bos=prepend_bos)
    answer_str_tokens_list = [model.to_str_tokens(a, prepend_bos=False) for a in answers]
    prompt_length = len(prompt_str_tokens)
    answer_length = 1 if several else len(answer_str_tokens_list[0])

    if print_details:
        print("Tokenized prompt:", prompt_str_tokens)
        if several:
            print("Tokenized answers:", answer_str_tokens_list)
        else:
            print("Tokenized answer:", answer_str_tokens_list[0])
    with torch.no_grad():
        logits = model(tokens)
    probs = logits.softmax(dim=-1)
    answer_ranks = []
    for index in range(prompt_length, prompt_length + answer_length):
        token_ids = tokens[:, index]
        str_tokens = [a[index - prompt_length] for a in answer_str_tokens_list]
        token_probs = probs[:, index - 1]  # position index - 1 predicts token `index`
        sorted_probs, sorted_ids = token_probs.sort(descending=True)
        ranks = sorted_ids.argsort(-1)[range(n_answers), token_ids.cpu()].tolist()
        answer_ranks.append(list(zip(str_tokens, ranks, strict=True)))
        if print_details:
            lines = [
                f"Rank: {ranks[i]: <8} Logit: {logits[i, index - 1, token_ids[i]].item():5.2f} "
                f"Prob: {token_probs[i, token_ids[i]].item():6.2%} Token: |{str_tokens[i]}|"
                for i in range(n_answers)
            ]
            print(f"Performance on answer token{'s' if several else ''}:\n" + "\n".join(lines))
            for i in range(top_k):
                token = model.to_string(sorted_ids[0, i])
                print(
                    f"Top {i}th token. Logit: {logits[0, index - 1, sorted_ids[0, i]].item():5.2f} "
                    f"Prob: {sorted_probs[0, i].item():6.2%} Token: |{token}|"
                )
    print(
        f"Ranks of the answer tokens: {[r[0] for r in answer_ranks] if not several else answer_ranks}"
    )


test_prompt.__test__ = False  # pytest: a helper named test_*, not a test


def tokenize_and_concatenate(*args: Any, **kwargs: Any):
    """Not provided: TransformerLens' version maps a `datasets.Dataset` through an HF
    tokenizer. gpt2lab prepares corpora itself (`gpt2lab prepare`, or
    gpt2lab.training.data.prepare), tokenized, concatenated and sharded."""
    raise GPT2LabError(
        "utils.tokenize_and_concatenate is not provided by gpt2lab.tl: tokenize a corpus with "
        "`gpt2lab prepare` (gpt2lab.training.data.prepare), or model.to_tokens for a few texts"
    )
