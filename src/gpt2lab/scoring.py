"""Scoring text with a GPT-2: per-token log-probs, surprisal, perplexity, multiple choice.

Everything here reduces to one question: what log-probability does the model give to
each token of a continuation, given the tokens before it? `token_logprobs` answers it
for a batch of (prefix, continuation) pairs in one left-padded forward pass, always
doing the log-softmax in float32 (a bf16 log-softmax over 50257 logits loses digits
that perplexity and surprisal care about). The three jobs built on it:

- `score`: every token's log-prob (nats) and surprisal (bits), summed per word.
- `perplexity`: HuggingFace's sliding-window algorithm ("Perplexity of fixed-length
  models"), so numbers compare with the ones in its docs and in papers.
- `choose`: lm-evaluation-harness' multiple-choice scoring (acc and acc_norm).

Conventions, each the one the usual reference uses:

- BOS: `bos=True` is the default everywhere (`perplexity`, `score`, `choose`, and the
  CLI's `gpt2lab score`). GPT-2 has no BOS token of its own; `<|endoftext|>` (50256),
  the separator between its training documents, plays that role. Prepended as
  context, it lets the model predict the text's first token, so every token of the
  text is scored: the number is about the text, not the text minus its first token.
  It is also what the tools researchers compare with do: lm-eval's rolling
  log-likelihood (perplexity tasks) uses it as the prefix, and TransformerLens prepends
  it by default for GPT-2 (`model(text, return_type="loss").exp()` equals
  `perplexity(text)` for a text within the context). `bos=False` prepends nothing:
  the first token is context only, and `perplexity(..., bos=False)` reproduces HF's
  "Perplexity of fixed-length models" guide exactly (its loop takes the tokens as
  given). On a long text the two differ by one token of the total; on a short one
  they can differ a lot (the first token is often the least predictable).
- Sliding window (HF). Windows of `max_length` tokens start every `stride` tokens;
  only the last `end - previous_end` tokens of each window are targets, the rest is
  context. A window's first token can never be predicted inside it, so with
  `bos=False` the first token of the text is never scored, and with
  `stride == max_length` neither is the first token of each later window, exactly as
  in HF's loop. Perplexity is exp(sum of NLL / number of tokens actually predicted).
- Multiple choice (lm-eval). Context and option are split as lm-eval's
  `_encode_pair` does: trailing whitespace of the context moves to the front of the
  option, then encode(context + option)[len(encode(context)):] are the option's
  tokens. acc picks argmax(loglikelihood); acc_norm picks argmax(loglikelihood /
  len(option)), the option's length in characters as given (lm-eval divides by
  `len(choice)` of the choice string without its " " delimiter: to reproduce it pass
  context "...Answer: " and options "Paris", the space then moves to the option).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from .errors import GPT2LabError
from .inputs import TOKEN_DTYPES, left_pad, to_batch
from .progress import progress_bar
from .validate import boolean, check_memory, is_int, show

if TYPE_CHECKING:
    from .model import GPT2

LN2 = math.log(2)


# ---- the one primitive --------------------------------------------------------------
@torch.no_grad()
def token_logprobs(
    model: GPT2,
    prefixes: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    with_greedy: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Log-probs of each continuation's tokens given its prefix, all rows in one batch.

    Row i is `prefixes[i] + continuations[i]`, left-padded to the longest row; the
    model sees all but its last token, and the last `len(continuations[i])` positions
    predict the continuation. Rows longer than the context keep their last
    n_ctx + 1 tokens (the prefix loses its start, as lm-eval truncates).

    Returns, per row, a float32 CPU tensor of log-probs (natural log) and a bool tensor
    telling whether each continuation token was the model's top (greedy) choice (an
    empty list with `with_greedy=False`: the argmax over the vocabulary costs about as
    much as the log-softmax, and perplexity does not need it).
    """
    if len(prefixes) != len(continuations) or not prefixes:
        raise GPT2LabError("token_logprobs needs one prefix per continuation, at least one row")
    n_ctx = model.cfg.n_ctx
    rows = []
    for prefix, cont in zip(prefixes, continuations, strict=True):
        if not prefix:
            raise GPT2LabError("the prefix is empty: give at least one token of context (BOS)")
        if not 0 < len(cont) <= n_ctx:
            raise GPT2LabError(f"a continuation must have 1..{n_ctx} tokens, got {len(cont)}")
        rows.append((list(prefix) + list(cont))[-(n_ctx + 1) :][:-1])
    _check_memory(model, rows, max(len(c) for c in continuations))

    tokens, mask = left_pad(rows, model.tokenizer.eot_token)
    padded = not bool(mask.all())
    keep = max(len(c) for c in continuations)
    logits = model(
        tokens.to(model.device),
        attention_mask=mask.to(model.device) if padded else None,
        logits_to_keep=keep,
    )
    logp = logits.float().log_softmax(-1)  # [batch, keep, vocab], float32 even for bf16
    top = logp.argmax(-1) if with_greedy else None

    logprobs, greedy = [], []
    for i, cont in enumerate(continuations):
        target = torch.tensor(list(cont), device=logp.device)
        rows_lp = logp[i, keep - len(cont) :]
        logprobs.append(rows_lp.gather(-1, target[:, None])[:, 0].cpu())
        if top is not None:
            greedy.append((top[i, keep - len(cont) :] == target).cpu())
    return logprobs, greedy


def _check_memory(model: GPT2, rows: list[list[int]], keep: int) -> None:
    """Refuse a batch whose forward pass would not fit in memory, before running it: per
    row, three float32 [keep, vocab] buffers (logits, their float32 copy, log-softmax)
    and a layer's activations ([pos, d_mlp] and a few [pos, d_model], twice over)."""
    cfg, width = model.cfg, max(len(r) for r in rows)
    per_row = 3 * keep * cfg.d_vocab * 4 + 2 * width * (cfg.d_mlp + 4 * cfg.d_model) * 4
    check_memory(
        f"scoring {len(rows)} rows of up to {width} tokens at once",
        len(rows) * per_row,
        model.device,
        hint="score fewer options or shorter texts at a time",
    )


# ---- sliding window -------------------------------------------------------------------
def windows(n_tokens: int, max_length: int, stride: int):
    """HF's windows: yield (begin, end, trg_len); the last trg_len tokens are targets."""
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        yield begin, end, end - prev_end
        prev_end = end
        if end == n_tokens:
            break


def sliding_logprobs(
    model: GPT2, ids: Sequence[int], max_length: int, stride: int, *, progress: bool = False
) -> torch.Tensor:
    """log p(ids[t] | window context) for every t, NaN where a token gets no prediction.

    The cost is one forward pass and one log-softmax over the whole vocabulary per
    window, so it grows with the text: a 5 MB text is about a million tokens, thousands
    of windows, minutes on a CPU. `progress=True` shows a transient progress bar on
    stderr (tokens done, time left)."""
    out = torch.full((len(ids),), math.nan)
    with progress_bar(len(ids), "scoring", progress, unit="tokens") as advance:
        for begin, end, trg_len in windows(len(ids), max_length, stride):
            start = max(end - trg_len, begin + 1)  # the window's first token has no context
            if start < end:
                (lp,), _ = token_logprobs(
                    model, [ids[begin:start]], [ids[start:end]], with_greedy=False
                )
                out[start:end] = lp
            advance(trg_len)
    return out


def _ids(model: GPT2, text_or_ids, bos: bool) -> tuple[list[int], int]:
    """Token ids (with the BOS prepended if asked) and how many BOS tokens were added.

    Text is a str; ids are a list, tuple, range, 1-D integer array or an integer tensor
    (1-D or [1, pos]). Bytes are refused rather than read as ids (b"hi" would be [104,
    105]), as are bools and floats among the ids."""
    bos = boolean("bos", bos)
    if isinstance(text_or_ids, str):
        ids = model.tokenizer.encode(text_or_ids)
    elif isinstance(text_or_ids, (bytes, bytearray, memoryview)):
        raise GPT2LabError("give text as a str (decode the bytes first), not bytes")
    elif isinstance(text_or_ids, torch.Tensor):
        if text_or_ids.dim() == 2 and text_or_ids.shape[0] == 1:
            text_or_ids = text_or_ids[0]
        if text_or_ids.dim() != 1 or text_or_ids.dtype not in TOKEN_DTYPES:
            raise GPT2LabError(
                "token ids must be one sequence of integers (1-D tensor or [1, pos]), got "
                f"{show(text_or_ids)}"
            )
        ids = text_or_ids.tolist()
    elif isinstance(text_or_ids, (list, tuple, range)) or type(text_or_ids).__name__ == "ndarray":
        ids = list(text_or_ids)
        if not all(is_int(i) for i in ids):
            raise GPT2LabError("token ids must be integers (not bools, floats or nested lists)")
    else:
        raise GPT2LabError(
            f"give text (a str) or a sequence of integer token ids, got {type(text_or_ids).__name__}"
        )
    if not ids:
        raise GPT2LabError("the text is empty: give at least one token")
    if not all(0 <= i < model.cfg.d_vocab for i in ids):
        raise GPT2LabError(f"token ids must be in [0, {model.cfg.d_vocab})")
    batch = to_batch(model.tokenizer, [int(i) for i in ids], prepend_bos=bos, bos_on_ids=True)
    return batch.tokens[0].tolist(), int(bos)


def _check_window(model: GPT2, max_length: int | None, stride: int | None, default_stride):
    max_length = model.cfg.n_ctx if max_length is None else max_length
    if not is_int(max_length) or not 2 <= max_length <= model.cfg.n_ctx:
        raise GPT2LabError(
            f"max_length must be an integer in 2..{model.cfg.n_ctx}, got {show(max_length)}"
        )
    stride = default_stride(max_length) if stride is None else stride
    if not is_int(stride) or not 0 < stride <= max_length:
        raise GPT2LabError(
            f"stride must be an integer in 1..max_length ({max_length}), got {show(stride)}"
        )
    return int(max_length), int(stride)


# ---- perplexity -----------------------------------------------------------------------
def perplexity(
    model: GPT2,
    text_or_ids,
    *,
    stride: int | None = None,
    max_length: int | None = None,
    bos: bool = True,
    return_details: bool = False,
    progress: bool = False,
):
    """Perplexity by HF's sliding window: exp(total NLL / number of predicted tokens).

    `max_length` defaults to the model's context, `stride` to `max_length` (disjoint
    chunks; a smaller stride gives every target more context: gpt2-large on
    WikiText-2 scores 19.44 at stride 1024 and 16.44 at 512). `text_or_ids` is text or
    token ids. With `return_details=True` returns (ppl, nll_sum, n_tokens).
    `progress=True` shows a progress bar on stderr (for long texts).

    `bos=True` (the default, as in `score`, `choose` and `gpt2lab score`) prepends
    `<|endoftext|>` as context, so the text's first token is scored too, as lm-eval
    and TransformerLens score it; `bos=False` takes the tokens as given, which is HF's
    perplexity guide exactly (see the module notes).

    Every predicted token counts once. (HF's current doc loop weights each window's
    mean loss by its targets minus one: exact for disjoint windows, one token short
    for overlapping ones; the difference is negligible on long texts.)
    """
    return_details = boolean("return_details", return_details)
    progress = boolean("progress", progress)
    ids, _ = _ids(model, text_or_ids, bos)
    max_length, stride = _check_window(model, max_length, stride, lambda m: m)
    lp = sliding_logprobs(model, ids, max_length, stride, progress=progress).double()
    predicted = lp[~lp.isnan()]
    if predicted.numel() == 0:
        raise GPT2LabError("perplexity needs at least two tokens with bos=False")
    nll_sum = float(-predicted.sum())
    n_tokens = predicted.numel()
    ppl = math.exp(nll_sum / n_tokens)
    return (ppl, nll_sum, n_tokens) if return_details else ppl


# ---- per-token scores and surprisal ----------------------------------------------------
class Word(NamedTuple):
    text: str
    start: int  # first token index (into TokenScores.tokens)
    end: int  # one past the last token index
    logprob: float  # natural log, summed over the word's tokens (NaN if one is unscored)
    surprisal: float  # bits


@dataclass
class TokenScores:
    """One entry per token of the text (a BOS, if used, is context and not listed).

    `logprobs[i]` is ln p(token i | tokens before it); NaN for a token that was not
    predicted (the first token when `bos=False`). Surprisal is -logprob / ln 2 bits.
    """

    tokens: list[int]
    strings: list[str]
    logprobs: list[float]

    @property
    def surprisal(self) -> list[float]:
        return [-lp / LN2 for lp in self.logprobs]

    @property
    def total_logprob(self) -> float:
        """Sum of the log-probs of the scored tokens (natural log)."""
        return math.fsum(lp for lp in self.logprobs if not math.isnan(lp))

    def words(self, *, split_punctuation: bool = False) -> list[Word]:
        """Word-level surprisal: the sum over each word's tokens.

        A word is a run of whitespace followed by non-whitespace, so a new word starts
        at a token that begins with whitespace (GPT-2's " world"), unless the tokens
        before it in the word are whitespace only ("\\n\\n" then "The" is one word: the
        break belongs to the word it precedes). Punctuation stays attached ("world!" is
        one word), as in reading-time corpora; with `split_punctuation=True` a token
        that starts with punctuation or a symbol ("!", "'s") also starts a new word.
        """
        words: list[Word] = []
        start, empty, blank = 0, True, False  # the word so far is "" / whitespace only
        for i, s in enumerate(self.strings):
            if i > start and self._starts_word(s, blank, split_punctuation):
                words.append(self._word(start, i))
                start, empty, blank = i, True, False
            if s:  # kept up to date token by token: linear even in a text without spaces
                blank, empty = (blank or empty) and s.isspace(), False
        if self.strings:
            words.append(self._word(start, len(self.strings)))
        return words

    def _word(self, start: int, end: int) -> Word:
        logprob = math.fsum(self.logprobs[start:end])
        return Word("".join(self.strings[start:end]), start, end, logprob, -logprob / LN2)

    @staticmethod
    def _starts_word(s: str, blank_so_far: bool, split_punctuation: bool) -> bool:
        if blank_so_far:
            return False  # only whitespace so far: this token completes that word
        if s[:1].isspace():
            return True
        return split_punctuation and bool(s) and not s[0].isalnum() and s[0] != "\ufffd"


def score(
    model: GPT2,
    text_or_ids,
    *,
    bos: bool = True,
    stride: int | None = None,
    progress: bool = False,
) -> TokenScores:
    """Every token's log-prob and surprisal; see `TokenScores` and the module notes on BOS.

    `bos=True` (the default, as in `perplexity`) prepends `<|endoftext|>` as context so
    the first token gets a log-prob too; with `bos=False` its log-prob is NaN.

    Text longer than the context is scored with the sliding window (stride defaults to
    half the context, must be below it), so every token gets exactly one prediction
    with at least n_ctx - stride tokens of context.
    """
    progress = boolean("progress", progress)
    ids, n_bos = _ids(model, text_or_ids, bos)
    n_ctx = model.cfg.n_ctx
    if is_int(stride) and stride == n_ctx:
        raise GPT2LabError(f"stride must be below n_ctx ({n_ctx}) so that every token is scored")
    max_length, stride = _check_window(model, None, stride, lambda m: max(1, m // 2))
    lp = sliding_logprobs(model, ids, max_length, stride, progress=progress)[n_bos:]
    tokens = ids[n_bos:]
    strings = [model.tokenizer.decode([t]) for t in tokens]
    return TokenScores(tokens, strings, lp.tolist())


# ---- multiple choice --------------------------------------------------------------------
@dataclass
class Choice:
    """Scores of each option as a continuation of the context (lm-eval's loglikelihood)."""

    options: list[str]
    loglikelihoods: list[float]  # sum of the option tokens' log-probs, natural log
    is_greedy: list[bool]  # every option token was the model's top choice
    n_tokens: list[int]
    best: int  # acc: argmax loglikelihood
    best_norm: int  # acc_norm: argmax loglikelihood / len(option)


def encode_pair(model: GPT2, context: str, option: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing whitespace of the context joins the option."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, option = context[:-n_spaces], context[-n_spaces:] + option
    whole = model.tokenizer.encode(context + option)
    context_ids = model.tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def choose(model: GPT2, context: str, options: Sequence[str], *, bos: bool = True) -> Choice:
    """Score each option as a continuation of `context`, all options in one batch.

    With `bos=True` `<|endoftext|>` is prepended to the context. With `bos=False`
    nothing is, except for an empty context (the first option token needs something
    to be predicted from), which is exactly what lm-eval does for GPT-2.
    """
    if not isinstance(context, str):
        raise GPT2LabError(f"context must be a string, got {type(context).__name__}")
    if (
        not isinstance(options, (list, tuple))
        or not options
        or not all(isinstance(o, str) for o in options)
    ):
        raise GPT2LabError("options must be a non-empty list of strings")
    bos = boolean("bos", bos)
    prefixes, continuations = [], []
    for i, option in enumerate(options):
        context_ids, option_ids = encode_pair(model, context, option)
        if not option_ids:
            raise GPT2LabError(f"option {i} ({option!r}) is empty: give it some text")
        if bos or not context_ids:
            context_ids = [model.tokenizer.eot_token, *context_ids]
        prefixes.append(context_ids)
        continuations.append(option_ids)

    logprobs, greedy = token_logprobs(model, prefixes, continuations)
    lls = [float(lp.double().sum()) for lp in logprobs]
    lengths = [max(len(o), 1) for o in options]
    return Choice(
        options=list(options),
        loglikelihoods=lls,
        is_greedy=[bool(g.all()) for g in greedy],
        n_tokens=[len(c) for c in continuations],
        best=max(range(len(lls)), key=lambda i: lls[i]),
        best_norm=max(range(len(lls)), key=lambda i: lls[i] / lengths[i]),
    )
