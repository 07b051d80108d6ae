"""The one way in: any accepted prompt form -> a `Batch` of token ids and its padding mask.

Every entry point that takes "a prompt" (the model's forward and `to_tokens`,
generation, scoring, the lenses, attribution, patching) turns it into token ids here,
with the same conventions:

- forms: a str ("text"), a non-empty list or tuple of str ("texts"), a non-empty list
  of integer ids ("ids"), or an integer tensor [pos] / [batch, pos] ("tensor");
- BOS: `prepend_bos=True` puts `<|endoftext|>` (GPT-2's BOS, as in TransformerLens)
  before each text; token ids are taken as given unless a caller asks otherwise;
- padding: rows of different lengths are padded with `<|endoftext|>` on the left
  (every row's last token in the last column: where next-token logits are read and
  generation appends) or on the right (TransformerLens' default); the mask says which
  positions are real (1) and which are padding (0).

`single_token_id` is the one lookup of "one token" (an answer, a target, a name):
a text that must encode to exactly one token, or an id.

This module sits below model.py: it takes the tokenizer, never the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import GPT2LabError
from .validate import boolean, is_int, show

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

PADDING_SIDES = ("left", "right")
# Integer dtypes accepted for token ids.
TOKEN_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# ---- the two conventions -----------------------------------------------------------------
def check_prepend_bos(value: Any) -> bool:
    """`prepend_bos` as a bool; anything but True / False is an error."""
    return boolean("prepend_bos", value)


def check_padding_side(value: Any) -> str:
    """`padding_side` as "left" or "right"; anything else is an error."""
    if isinstance(value, str) and value in PADDING_SIDES:
        return value
    raise GPT2LabError(f"padding_side must be 'left' or 'right', got {show(value)}")


def pad(rows: Sequence[Sequence[int]], pad_id: int, side: str = "left"):
    """Rows of ids as one [batch, pos] long tensor padded with `pad_id` on `side`, and its
    0/1 long mask (1 = real token)."""
    side = check_padding_side(side)
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        tokens[i, cols] = torch.tensor(list(r), dtype=torch.long)
        mask[i, cols] = 1
    return tokens, mask


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids padded on the left (every row's last token in the last column)."""
    return pad(rows, pad_id, "left")


# ---- prompts -----------------------------------------------------------------------------
def prompt_kind(prompt: Any) -> str | None:
    """Which accepted form `prompt` has: "text" (a str), "texts" (a non-empty list or tuple
    of str), "ids" (a non-empty list or tuple of integer ids), "tensor" (a non-empty
    tensor of one or two dimensions), or None for anything else."""
    if isinstance(prompt, str):
        return "text"
    if isinstance(prompt, (list, tuple)) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "texts"
        if all(is_int(p) for p in prompt):
            return "ids"
        return None
    if isinstance(prompt, torch.Tensor) and prompt.dim() in (1, 2) and prompt.numel():
        return "tensor"
    return None


def encode(tokenizer: Tokenizer, text: str, prepend_bos: bool = False) -> list[int]:
    """One text's ids, `<|endoftext|>` first with `prepend_bos`; the empty text is the
    single token `<|endoftext|>` (a row needs at least one token)."""
    ids = tokenizer.encode(text)
    if prepend_bos:
        ids = [tokenizer.eot_token, *ids]
    return ids or [tokenizer.eot_token]


@dataclass(frozen=True)
class Batch:
    """A prompt as model input.

    `tokens` [batch, pos] int64; `mask` [batch, pos] int64 (1 = real token, 0 =
    padding), None when no row is padded (or, for tensors, when none was given);
    `is_text`: the input was text (outputs go back as text); `single`: one prompt was
    given (a str, a list of ids or a [pos] tensor), so outputs drop the batch axis.
    """

    tokens: torch.Tensor
    mask: torch.Tensor | None
    is_text: bool
    single: bool
    padding_side: str = "left"

    @property
    def lengths(self) -> torch.Tensor:
        """[batch] the number of real tokens in each row."""
        if self.mask is None:
            return torch.full((self.tokens.shape[0],), self.tokens.shape[1], dtype=torch.long)
        return self.mask.sum(-1).long()

    def to(self, device: Any) -> Batch:
        mask = None if self.mask is None else self.mask.to(device)
        return Batch(self.tokens.to(device), mask, self.is_text, self.single, self.padding_side)


def from_texts(
    tokenizer: Tokenizer,
    texts: str | Sequence[str],
    *,
    prepend_bos: bool = False,
    padding_side: str = "left",
    device: Any = None,
    truncate: int | None = None,
) -> Batch:
    """Text (a str or a non-empty list of str) as a padded batch. `truncate=n` keeps the
    first n tokens of each text (TransformerLens' `truncate`, at the context length)."""
    prepend_bos = check_prepend_bos(prepend_bos)
    padding_side = check_padding_side(padding_side)
    single = isinstance(texts, str)
    if prompt_kind(texts) not in ("text", "texts"):
        raise GPT2LabError(
            "text must be a string or a non-empty list of strings (token ids go in as a "
            f"tensor), got {show(texts)}"
        )
    rows = [encode(tokenizer, t, prepend_bos) for t in ([texts] if single else texts)]
    if truncate is not None:
        rows = [r[:truncate] for r in rows]
    tokens, mask = pad(rows, tokenizer.eot_token, padding_side)
    if device is not None:
        tokens, mask = tokens.to(device), mask.to(device)
    return Batch(tokens, None if bool(mask.all()) else mask, True, single, padding_side)


def to_batch(
    tokenizer: Tokenizer,
    prompt: Any,
    *,
    prepend_bos: bool = False,
    padding_side: str = "left",
    attention_mask: torch.Tensor | None = None,
    bos_on_ids: bool = False,
    device: Any = None,
) -> Batch:
    """Any accepted prompt form (see `prompt_kind`) as a Batch.

    Text is tokenized (BOS and padding as asked); a list of ids is one row; a tensor is
    taken as it is ([pos] becomes [1, pos]) with `attention_mask` as its mask. BOS goes
    before token ids only with `bos_on_ids` (TransformerLens prepends it to text only).
    The ids are not range-checked here: the model checks them against its vocabulary.
    """
    kind = prompt_kind(prompt)
    if kind in ("text", "texts"):
        return from_texts(
            tokenizer, prompt, prepend_bos=prepend_bos, padding_side=padding_side, device=device
        )
    if kind is None:
        raise GPT2LabError(
            "prompt must be a string, a list of strings, a list of token ids or a tensor of "
            f"ids, got {show(prompt)}"
        )
    bos = check_prepend_bos(prepend_bos) and bos_on_ids
    if kind == "ids":
        tokens = torch.tensor([[int(t) for t in prompt]], dtype=torch.long)
        single = True
    else:  # (its dtype and values are the model's to check)
        single = prompt.dim() == 1
        tokens = prompt[None] if single else prompt
    if bos:
        eot = torch.full((tokens.shape[0], 1), tokenizer.eot_token, dtype=tokens.dtype)
        tokens = torch.cat([eot.to(tokens.device), tokens], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat(
                [torch.ones_like(attention_mask[:, :1]), attention_mask], dim=1
            )
    if device is not None:
        tokens = tokens.to(device)
    return Batch(tokens, attention_mask, False, single, padding_side)


# ---- one token ---------------------------------------------------------------------------
def single_token_id(
    tokenizer: Tokenizer, text: Any, vocab: int | None = None, *, what: str | None = None
) -> int:
    """The id of a text that must encode to exactly one token (`" Mary"`, with its
    leading space), or an id itself (an int or a one-element integer tensor), checked to
    lie in [0, vocab) (default: the tokenizer's vocabulary).

    A text of several tokens is an error that suggests the leading space when that would
    make it one token ("Mary" -> " Mary"). `what` names the argument in the messages
    ("answer", "target")."""
    if isinstance(text, str):
        ids = tokenizer.encode(text)
        if len(ids) != 1:
            hint = space_hint(tokenizer, text)
            if what is None:
                raise GPT2LabError(f"{text!r} is {len(ids)} tokens, not one{hint}")
            hint = hint or " (usually with its leading space, e.g. ' Paris')"
            raise GPT2LabError(
                f"{what} {text!r} is {len(ids)} tokens, not one; give a single token{hint}"
            )
        text = ids[0]  # (a model with a smaller vocabulary may not have it: checked below)
    if isinstance(text, torch.Tensor) and text.numel() == 1 and text.dtype in TOKEN_DTYPES:
        text = int(text.item())
    if not is_int(text):
        raise GPT2LabError(f"{what or 'a token'} must be a token string or id, got {show(text)}")
    vocab = tokenizer.vocab_size if vocab is None else vocab
    if not 0 <= text < vocab:
        raise GPT2LabError(f"{what or 'token'} id {text} is outside the vocabulary [0, {vocab})")
    return int(text)


def space_hint(tokenizer: Tokenizer, text: str) -> str:
    """The hint " (did you mean ' Mary', with a leading space?)" when `text` lacks a
    leading space and would be one token with it; "" otherwise."""
    if not text.startswith(" ") and len(tokenizer.encode(" " + text)) == 1:
        return f" (did you mean {' ' + text!r}, with a leading space?)"
    return ""


__all__ = [
    "PADDING_SIDES",
    "Batch",
    "check_padding_side",
    "check_prepend_bos",
    "encode",
    "from_texts",
    "left_pad",
    "pad",
    "prompt_kind",
    "single_token_id",
    "space_hint",
    "to_batch",
]
