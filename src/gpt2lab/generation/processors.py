"""Logits processors: small steps that reshape next-token scores before a token is picked.

Each processor is a callable `(input_ids [batch, seq], scores [batch, vocab]) -> scores`,
the same convention as transformers' `LogitsProcessor`, so every one can be checked
1:1 against its transformers counterpart (tests/test_processors.py does). They never
modify their inputs. Two kinds, applied in this order by `build_pipeline`:

* penalties and constraints (repetition, frequency and presence penalties, no-repeat
  n-grams, banned sequences, a minimum number of new tokens) change or forbid
  particular tokens; they apply to greedy search, beam search and sampling alike;
* warpers (temperature, top-k, top-p, min-p, typical, epsilon, eta) reshape the
  distribution a sampler draws from; a filtered token's score becomes -inf.

The arithmetic of each step copies transformers' own (same sort direction, same
cumulative sums, same comparisons), so the kept set agrees even on ties at a cut-off.
Arguments are checked when a processor is built; a bad one raises `GPT2LabError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real

import torch

from ..errors import GPT2LabError
from ..validate import as_list, integer, number, show, token_ids

NEG_INF = -math.inf

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------- helpers


class LogitsProcessor:
    """Base class: only a readable repr (the public attributes) for pipelines in logs."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _token_counts(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """How often each vocabulary entry occurs in each row of `ids`: [batch, vocab], scores' dtype.

    Ids at or past the vocabulary size (transformers' marker for "ignore") land in a
    spare column that is dropped."""
    vocab = scores.shape[-1]
    counts = scores.new_zeros(scores.shape[0], vocab + 1)
    counts.scatter_add_(1, ids.clamp(max=vocab), counts.new_ones(ids.shape))
    return counts[:, :vocab]


def _mark(ids: torch.Tensor, keep: torch.Tensor, vocab: int) -> torch.Tensor:
    """Boolean [batch, vocab]: True at ids[b, j] wherever keep[b, j]."""
    mask = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, torch.where(keep, ids.clamp(max=vocab), vocab), True)
    return mask[:, :vocab]


def _kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest score of each row, [batch, 1] (k is clipped to the vocabulary)."""
    return torch.topk(scores, min(k, scores.shape[-1]), dim=-1).values[..., -1:]


# ---------------------------------------------------------------------------- warpers


class TemperatureWarper(LogitsProcessor):
    """Divide the logits by the temperature: < 1 sharpens the distribution, > 1 flattens it.

    Temperature 0 is greedy decoding, which is not a distribution; ask for it by not
    sampling rather than through this warper. Below COLD (1e-4) the best score of each
    row is first moved to 0 and only the others are divided: dividing by a tiny
    temperature would otherwise overflow to +inf (and the softmax to NaN), and one below
    float32's range (5e-324) is 0 in float32. After the shift every score is 0 or
    negative and at worst becomes -inf, so the distribution goes to its limit, all mass
    on the best token(s). Softmax and every later warper are unchanged by the shift; at
    COLD and above the division is exactly transformers'."""

    COLD = 1e-4

    def __init__(self, temperature: float):
        self.temperature = number("temperature", temperature, 0, low_open=True)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature >= self.COLD:
            return scores / self.temperature
        shifted = scores - scores.amax(dim=-1, keepdim=True)
        return torch.where(shifted < 0, shifted / self.temperature, shifted)


class TopKWarper(LogitsProcessor):
    """Keep the k highest-scoring tokens (all tokens tied with the k-th are kept too)."""

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1):
        self.top_k = integer("top_k", top_k, 1)
        self.min_tokens_to_keep = integer("min_tokens_to_keep", min_tokens_to_keep, 1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = max(self.top_k, self.min_tokens_to_keep)
        return scores.masked_fill(scores < _kth_largest(scores, k), NEG_INF)


class TopPWarper(LogitsProcessor):
    """Nucleus sampling (Holtzman et al., 2019): keep the smallest set of most likely tokens
    whose probabilities add up to at least top_p.

    As in transformers, the cut is made from the bottom: sorting ascending, a token is
    dropped while the cumulative probability up to and including it is <= 1 - top_p."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1):
        self.top_p = number("top_p", top_p, 0, 1, low_open=True)
        self.min_tokens_to_keep = integer("min_tokens_to_keep", min_tokens_to_keep, 1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - self.top_p
        drop[..., -self.min_tokens_to_keep :] = False
        return scores.masked_fill(drop.scatter(-1, order, drop), NEG_INF)


class MinPWarper(LogitsProcessor):
    """Min-p sampling (Nguyen et al., 2024): drop tokens less likely than min_p times the
    most likely token's probability, so the cut-off follows the model's confidence."""

    def __init__(self, min_p: float, min_tokens_to_keep: int = 1):
        self.min_p = number("min_p", min_p, 0, 1)
        self.min_tokens_to_keep = integer("min_tokens_to_keep", min_tokens_to_keep, 1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        drop = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        k = min(self.min_tokens_to_keep, probs.shape[-1])
        drop.scatter_(-1, torch.topk(probs, k, dim=-1).indices, False)
        return scores.masked_fill(drop, NEG_INF)


class TypicalWarper(LogitsProcessor):
    """Locally typical sampling (Meister et al., 2022): keep the tokens whose surprisal is
    closest to the distribution's entropy, up to a probability mass of typical_p.

    min_tokens_to_keep protects the most *typical* tokens, not the most likely ones."""

    def __init__(self, typical_p: float, min_tokens_to_keep: int = 1):
        self.typical_p = number("typical_p", typical_p, 0, 1, low_open=True, high_open=True)
        self.min_tokens_to_keep = integer("min_tokens_to_keep", min_tokens_to_keep, 1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = scores.log_softmax(dim=-1)
        entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)  # nansum: 0 * -inf
        distance, order = torch.sort((-logp - entropy).abs(), descending=False)
        cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < self.typical_p).sum(dim=-1, keepdim=True)
        last = last.clamp(max=distance.shape[-1] - 1)
        drop = distance > distance.gather(-1, last)
        drop[..., : self.min_tokens_to_keep] = False
        return scores.masked_fill(drop.scatter(-1, order, drop), NEG_INF)


class EpsilonWarper(LogitsProcessor):
    """Epsilon sampling (Hewitt et al., 2022): drop every token with probability below a
    fixed epsilon (the min_tokens_to_keep highest-scoring tokens always survive)."""

    def __init__(self, epsilon: float, min_tokens_to_keep: int = 1):
        self.epsilon = number("epsilon_cutoff", epsilon, 0, 1, low_open=True, high_open=True)
        self.min_tokens_to_keep = integer("min_tokens_to_keep", min_tokens_to_keep, 1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        drop = scores.softmax(dim=-1) < self.epsilon
        drop &= scores < _kth_largest(scores, self.min_tokens_to_keep)
        return scores.masked_fill(drop, NEG_INF)


class EtaWarper(LogitsProcessor):
    """Eta sampling (Hewitt et al., 2022): epsilon sampling whose cut-off shrinks as the
    distribution's entropy H grows, eta = min(epsilon, sqrt(epsilon) * exp(-H))."""

    def __init__(self, epsilon: float, min_tokens_to_keep: int = 1):
        self.epsilon = number("eta_cutoff", epsilon, 0, 1, low_open=True, high_open=True)
        self.min_tokens_to_keep = integer("min_tokens_to_keep", min_tokens_to_keep, 1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        # The entropy as torch.distributions.Categorical computes it (what transformers
        # uses): log-probabilities clamped to the dtype's minimum, so 0 * -inf is 0.
        logp = (scores - scores.logsumexp(dim=-1, keepdim=True)).clamp(
            min=torch.finfo(scores.dtype).min
        )
        entropy = -(logp * logp.softmax(dim=-1)).sum(dim=-1, keepdim=True)
        epsilon = torch.tensor(self.epsilon, dtype=scores.dtype, device=scores.device)
        eta = torch.minimum(epsilon, epsilon.sqrt() * torch.exp(-entropy))
        drop = (probs < eta) & (scores < _kth_largest(scores, self.min_tokens_to_keep))
        return scores.masked_fill(drop, NEG_INF)


# ---------------------------------------------------------------------------- penalties


class RepetitionPenalty(LogitsProcessor):
    """CTRL's repetition penalty (Keskar et al., 2019), as transformers applies it: every
    token already in the sequence (prompt included) has its logit divided by the penalty
    if positive, multiplied by it if negative. A penalty > 1 discourages repeats.

    `ignore_prefix` (an int, or a [batch] tensor of per-row counts) leaves that many
    leading positions out, e.g. left padding: transformers passes the padding lengths
    from the attention mask here."""

    def __init__(self, penalty: float, ignore_prefix: int | torch.Tensor | None = None):
        self.penalty = number("repetition_penalty", penalty, 0, low_open=True)
        if isinstance(ignore_prefix, torch.Tensor):
            if ignore_prefix.dim() != 1:
                raise GPT2LabError("ignore_prefix must be an int or a 1-D tensor of per-row counts")
        elif ignore_prefix is not None:
            ignore_prefix = integer("ignore_prefix", ignore_prefix, 0)
        self.ignore_prefix = ignore_prefix

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        if isinstance(self.ignore_prefix, int):
            input_ids = input_ids[:, self.ignore_prefix :]
        elif isinstance(self.ignore_prefix, torch.Tensor):
            if self.ignore_prefix.shape[0] != input_ids.shape[0]:
                raise GPT2LabError(
                    f"ignore_prefix has {self.ignore_prefix.shape[0]} rows but the batch has "
                    f"{input_ids.shape[0]}"
                )
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            skip = positions[None, :] < self.ignore_prefix.to(input_ids.device)[:, None]
            input_ids = input_ids.masked_fill(skip, vocab)
        seen = _mark(input_ids, torch.ones_like(input_ids, dtype=torch.bool), vocab)
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalised, scores)


class FrequencyPenalty(LogitsProcessor):
    """OpenAI's frequency penalty: subtract penalty * (times the token was generated so far).

    Only tokens after the first `prompt_len` positions count. Negative values encourage
    repetition; OpenAI's API allows [-2, 2]."""

    def __init__(self, penalty: float, prompt_len: int = 0):
        self.penalty = number("frequency_penalty", penalty)
        self.prompt_len = integer("prompt_len", prompt_len, 0)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores - _token_counts(input_ids[:, self.prompt_len :], scores) * self.penalty


class PresencePenalty(LogitsProcessor):
    """OpenAI's presence penalty: subtract a flat penalty from every token generated at least
    once so far (after the first `prompt_len` positions), however often it occurred."""

    def __init__(self, penalty: float, prompt_len: int = 0):
        self.penalty = number("presence_penalty", penalty)
        self.prompt_len = integer("prompt_len", prompt_len, 0)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        present = _token_counts(input_ids[:, self.prompt_len :], scores) > 0
        return scores - present.to(scores.dtype) * self.penalty


class NoRepeatNGram(LogitsProcessor):
    """Forbid any token that would complete an n-gram already present in the sequence
    (prompt included), as in fairseq and transformers. Size 1 forbids every seen token."""

    def __init__(self, ngram_size: int):
        self.ngram_size = integer("no_repeat_ngram_size", ngram_size, 1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n, length = self.ngram_size, input_ids.shape[1]
        if length < n:
            return scores
        ngrams = input_ids.unfold(1, n, 1)  # [batch, length - n + 1, n], a view
        prefix = input_ids[:, length - n + 1 :]  # the last n - 1 tokens
        match = (ngrams[..., :-1] == prefix[:, None, :]).all(dim=-1)
        return scores.masked_fill(_mark(ngrams[..., -1], match, scores.shape[-1]), NEG_INF)


class BannedSequences(LogitsProcessor):
    """Never generate any of the given token sequences (transformers' `bad_words_ids`).

    A one-token sequence bans that token everywhere; a longer one bans its last token
    whenever the sequence so far ends with the rest. As in transformers, a one-token
    sequence that is the end-of-sequence token is ignored (ending must stay possible),
    and a prefix longer than the sequence so far never matches."""

    def __init__(
        self, sequences: Sequence[Sequence[int]], eos_token_id: int | Sequence[int] | None = None
    ):
        seqs = as_list(sequences)
        if not seqs:
            raise GPT2LabError(
                "bad_words_ids must be a non-empty list of non-empty lists of token ids, "
                f"got {show(sequences)}"
            )
        self.sequences = [token_ids("each of bad_words_ids", s) for s in seqs]
        eos = set()
        if eos_token_id is not None:
            eos = set(token_ids("eos_token_id", eos_token_id, allow_one=True))
        self._single = sorted({s[0] for s in self.sequences if len(s) == 1 and s[0] not in eos})
        by_prefix_len: dict[int, list[list[int]]] = {}
        for s in self.sequences:
            if len(s) > 1:
                by_prefix_len.setdefault(len(s) - 1, []).append(s)
        self._groups = list(by_prefix_len.values())
        self._max_id = max(t for s in self.sequences for t in s)
        self._cache: dict[torch.device, tuple] = {}

    def _tensors(self, device: torch.device):
        if device not in self._cache:
            single = torch.tensor(self._single, dtype=torch.long, device=device)
            groups = [
                (
                    torch.tensor([s[:-1] for s in g], device=device),  # prefixes [G, L]
                    torch.tensor([s[-1] for s in g], device=device),  # last tokens [G]
                )
                for g in self._groups
            ]
            self._cache[device] = (single, groups)
        return self._cache[device]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        batch, vocab = scores.shape
        if self._max_id >= vocab:
            raise GPT2LabError(
                f"bad_words_ids contains token id {self._max_id}, outside the vocabulary of {vocab}"
            )
        single, groups = self._tensors(scores.device)
        banned = torch.zeros(batch, vocab, dtype=torch.bool, device=scores.device)
        banned[:, single] = True
        for prefixes, last in groups:
            if prefixes.shape[1] > input_ids.shape[1]:
                continue
            tail = input_ids[:, None, -prefixes.shape[1] :]  # [batch, 1, L]
            match = (tail == prefixes[None]).all(dim=-1)  # [batch, G]
            banned |= _mark(last.expand(batch, -1), match, vocab)
        return scores.masked_fill(banned, NEG_INF)


class MinNewTokens(LogitsProcessor):
    """Forbid the end-of-sequence token(s) until at least min_new_tokens tokens have been
    generated after the first `prompt_len` positions."""

    def __init__(self, min_new_tokens: int, prompt_len: int, eos_token_id: int | Sequence[int]):
        self.min_new_tokens = integer("min_new_tokens", min_new_tokens, 0)
        self.prompt_len = integer("prompt_len", prompt_len, 0)
        self.eos_token_id = token_ids("eos_token_id", eos_token_id, allow_one=True)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] - self.prompt_len >= self.min_new_tokens:
            return scores
        vocab = scores.shape[-1]
        eos = torch.zeros(vocab, dtype=torch.bool, device=scores.device)
        eos[[t for t in self.eos_token_id if t < vocab]] = True
        return scores.masked_fill(eos, NEG_INF)


# ---------------------------------------------------------------------------- pipeline


class LogitBias(LogitsProcessor):
    """Add a fixed amount to chosen tokens' logits (OpenAI's `logit_bias`): -100 all but bans
    a token, +100 all but forces it. Applied first, before penalties and warpers."""

    def __init__(self, bias: dict[int, float]):
        if not isinstance(bias, dict) or not bias:
            raise GPT2LabError(
                f"logit_bias must be a non-empty mapping of token ids to numbers, got {show(bias)}"
            )
        self.ids = token_ids("logit_bias keys", list(bias))
        self.values = [number(f"logit_bias[{t}]", bias[t]) for t in self.ids]
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        key = (scores.device, scores.dtype)
        if key not in self._cache:
            self._cache[key] = (
                torch.tensor(self.ids, device=scores.device),
                torch.tensor(self.values, device=scores.device, dtype=scores.dtype),
            )
        ids, values = self._cache[key]
        if int(ids.max()) >= scores.shape[-1]:
            raise GPT2LabError(
                f"logit_bias names token id {int(ids.max())}, outside the vocabulary of {scores.shape[-1]}"
            )
        return scores.index_add(-1, ids, values.expand(scores.shape[0], -1))


class LogitsPipeline(list):
    """A list of processors applied in order; an empty pipeline returns the scores as given."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores

    def __repr__(self) -> str:
        return f"LogitsPipeline({list.__repr__(self)})"


def build_pipeline(
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    typical_p: float | None = None,
    epsilon_cutoff: float | None = None,
    eta_cutoff: float | None = None,
    repetition_penalty: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    bad_words_ids: Sequence[Sequence[int]] | None = None,
    min_new_tokens: int | None = None,
    logit_bias: dict[int, float] | None = None,
    prompt_len: int = 0,
    eos_token_id: int | Sequence[int] = 50256,
    min_tokens_to_keep: int = 1,
    pad_lengths: torch.Tensor | None = None,
) -> LogitsPipeline:
    """The processors for a set of generation options, in transformers' order.

    Penalties and constraints come first, then temperature, then the filters: top-k,
    top-p, min-p, typical, epsilon, eta. None and the values that change nothing
    (temperature 1, top_k 0, top_p 1, min_p 0, typical_p 1, cut-offs 0, penalties 1 for
    repetition and 0 for frequency/presence, n-gram size 0, no bad words, min_new_tokens
    0) add no step; anything else is validated. `prompt_len` is where generated tokens
    start (for the frequency/presence penalties and min_new_tokens); `pad_lengths`, a
    [batch] tensor of left-padding counts, keeps padding out of the repetition penalty
    as transformers does given an attention mask. Beam search with sampling keeps
    `min_tokens_to_keep` = 2 (one more than the number of end tokens) in transformers.
    """
    integer("prompt_len", prompt_len, 0)
    steps: list[Processor] = []
    if logit_bias:
        steps.append(LogitBias(logit_bias))
    if _active(repetition_penalty, 1):
        steps.append(RepetitionPenalty(repetition_penalty, ignore_prefix=pad_lengths))
    if _active(frequency_penalty, 0):
        steps.append(FrequencyPenalty(frequency_penalty, prompt_len))
    if _active(presence_penalty, 0):
        steps.append(PresencePenalty(presence_penalty, prompt_len))
    if _active(no_repeat_ngram_size, 0):
        steps.append(NoRepeatNGram(no_repeat_ngram_size))
    if bad_words_ids is not None and (not isinstance(bad_words_ids, Sequence) or bad_words_ids):
        steps.append(BannedSequences(bad_words_ids, eos_token_id))
    if _active(min_new_tokens, 0):
        steps.append(MinNewTokens(min_new_tokens, prompt_len, eos_token_id))
    if _active(temperature, 1):
        steps.append(TemperatureWarper(temperature))
    keep = min_tokens_to_keep
    if _active(top_k, 0):
        steps.append(TopKWarper(top_k, min_tokens_to_keep=keep))
    if _active(top_p, 1):
        steps.append(TopPWarper(top_p, min_tokens_to_keep=keep))
    if _active(min_p, 0):
        steps.append(MinPWarper(min_p, min_tokens_to_keep=keep))
    if _active(typical_p, 1):
        steps.append(TypicalWarper(typical_p, min_tokens_to_keep=keep))
    if _active(epsilon_cutoff, 0):
        steps.append(EpsilonWarper(epsilon_cutoff, min_tokens_to_keep=keep))
    if _active(eta_cutoff, 0):
        steps.append(EtaWarper(eta_cutoff, min_tokens_to_keep=keep))
    return LogitsPipeline(steps)


def _active(value, no_op: float) -> bool:
    """Whether an option adds a step: given, and not the number that changes nothing.
    Anything but a plain number (a bool, a string, a tensor) adds its step, whose
    constructor then rejects it, rather than being compared (a tensor cannot be)."""
    if value is None:
        return False
    if isinstance(value, Real) and not isinstance(value, bool):
        return value != no_op
    return True


__all__ = [
    "BannedSequences",
    "EpsilonWarper",
    "EtaWarper",
    "FrequencyPenalty",
    "LogitBias",
    "LogitsPipeline",
    "LogitsProcessor",
    "MinNewTokens",
    "MinPWarper",
    "NoRepeatNGram",
    "PresencePenalty",
    "RepetitionPenalty",
    "TemperatureWarper",
    "TopKWarper",
    "TopPWarper",
    "TypicalWarper",
    "build_pipeline",
]
