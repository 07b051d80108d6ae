"""The decoding loop: prefill the prompt once, then one token at a time from the KV cache.

A batch of prompts is left-padded so every row's next token sits in the last
column; the attention mask and position ids make the padding invisible, so each row
gets exactly the tokens it would get alone. Each step's logits go through a
pipeline of small processors (penalties, then warpers: see processors.py), then the
next token is the argmax (greedy) or a draw from the softmax (sampling). Beam
search lives in beam.py and contrastive search in contrastive.py; this module
dispatches to them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import GPT2LabError
from .processors import build_pipeline

if TYPE_CHECKING:
    from ..model import GPT2

SAMPLING_OPTIONS = ("top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


@dataclass
class GenerationResult:
    """What a generation produced, per batch row (per returned sequence for beam search)."""

    tokens: list[list[int]]  # new tokens only (an ending <|endoftext|> or stop id is left out)
    logprobs: list[list[float]]  # log-probability of each new token under the model
    finish_reasons: list[str]  # "stop" (end-of-text, stop id or string), "length" or "time"
    texts: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # beam search: the hypothesis scores


def _prompt_tokens(model: GPT2, prompt) -> tuple[torch.Tensor, torch.Tensor | None, bool, bool]:
    """(tokens, mask, input was text, input was a single item)."""
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)
    ):
        tokens, mask = model.to_tokens(prompt, return_mask=True)
        return tokens, mask, True, isinstance(prompt, str)
    if isinstance(prompt, torch.Tensor) and prompt.dim() in (1, 2) and prompt.numel():
        tokens = prompt if prompt.dim() == 2 else prompt.unsqueeze(0)
        return tokens.to(model.device), None, False, prompt.dim() == 1
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return torch.tensor([prompt], device=model.device), None, False, True
    raise GPT2LabError(
        "prompt must be a string, a list of strings, a list of token ids or a tensor of ids"
    )


def _pad_lengths(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else (mask == 0).sum(1)


@dataclass
class _Settings:
    """The validated options of one generate() call."""

    max_new_tokens: int
    sample: bool
    pipeline: Any
    stop_ids: set[int]
    stop_strings: list[str]
    max_time: float | None
    seed: int | None
    penalty_alpha: float = 0.0  # > 0: contrastive search with `top_k` candidates
    top_k: int = 0


def _settings(
    model: GPT2, prompt_len: int, opts: dict[str, Any], pad_lengths: torch.Tensor | None = None
) -> _Settings:
    """Validate the options; `pad_lengths` [rows]: left padding, kept out of penalties."""
    max_new_tokens = opts.pop("max_new_tokens", 32)
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 1
    ):
        raise GPT2LabError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    penalty_alpha, contrastive_k = _contrastive_options(model, opts)
    temperature = opts.pop("temperature", None)
    if temperature is not None and (
        not isinstance(temperature, (int, float))
        or isinstance(temperature, bool)
        or temperature < 0
    ):
        raise GPT2LabError(f"temperature must be a number >= 0, got {temperature!r}")
    do_sample = opts.pop("do_sample", None)
    if temperature == 0:
        sample = False  # temperature 0 means greedy, whatever else is set
    elif do_sample is not None:
        sample = bool(do_sample)
    else:
        sample = temperature is not None or any(opts.get(k) is not None for k in SAMPLING_OPTIONS)
    eot = model.tokenizer.eot_token
    stop_ids = set(opts.pop("stop_token_ids", None) or [])
    if opts.pop("stop_at_eot", True):
        stop_ids.add(eot)
    if any(not isinstance(t, int) or not 0 <= t < model.cfg.d_vocab for t in stop_ids):
        raise GPT2LabError(f"stop_token_ids must be token ids below {model.cfg.d_vocab}")
    stop = opts.pop("stop", None)
    stop_strings = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise GPT2LabError("stop must be a non-empty string or a list of non-empty strings")
    bad_words = opts.pop("bad_words", None)
    if bad_words is not None:
        opts["bad_words_ids"] = [
            model.tokenizer.encode(w) if isinstance(w, str) else list(w) for w in bad_words
        ]
    max_time = opts.pop("max_time", None)
    if max_time is not None and (not isinstance(max_time, (int, float)) or max_time <= 0):
        raise GPT2LabError(f"max_time must be a positive number of seconds, got {max_time!r}")
    seed = opts.pop("seed", None)
    processing = {
        k: opts.pop(k)
        for k in (
            *SAMPLING_OPTIONS,
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
            "no_repeat_ngram_size",
            "bad_words_ids",
            "min_new_tokens",
        )
        if k in opts
    }
    if opts:
        raise GPT2LabError(f"unknown generation option {sorted(opts)[0]!r}")
    if not sample:  # warpers only reshape the distribution a sampler draws from
        for k in SAMPLING_OPTIONS:
            processing.pop(k, None)
    pipeline = build_pipeline(
        temperature=temperature if sample else None,
        prompt_len=prompt_len,
        eos_token_id=eot,
        pad_lengths=pad_lengths,
        **processing,
    )
    if prompt_len + max_new_tokens > model.cfg.n_ctx:
        raise GPT2LabError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"context of {model.cfg.n_ctx}"
        )
    return _Settings(
        max_new_tokens, sample, pipeline, stop_ids, stop_strings, max_time, seed,
        penalty_alpha, contrastive_k,
    )  # fmt: skip


def _contrastive_options(model: GPT2, opts: dict[str, Any]) -> tuple[float, int]:
    """Pop `penalty_alpha` (and with it `top_k`): (alpha, top_k), or (0, 0) for no
    contrastive search. As in transformers, penalty_alpha > 0 with top_k > 1 selects
    it; it is deterministic, so sampling options are an error rather than ignored."""
    from .contrastive import check_contrastive

    alpha = opts.pop("penalty_alpha", None)
    if alpha is None:
        return 0.0, 0
    check_contrastive(model, alpha, 2)
    if alpha == 0:  # no degeneration penalty: the other options decide
        return 0.0, 0
    top_k = opts.get("top_k")
    check_contrastive(model, alpha, top_k)
    opts.pop("top_k")
    sampling = [
        k for k in ("do_sample", "temperature", *SAMPLING_OPTIONS) if opts.get(k) is not None
    ]
    if sampling and not (sampling == ["do_sample"] and opts["do_sample"] is False):
        raise GPT2LabError(
            f"contrastive search (penalty_alpha > 0) does not sample; drop {sampling[0]}"
        )
    opts.pop("do_sample", None)
    return float(alpha), top_k


def _decode(model: GPT2, tokens: torch.Tensor, mask: torch.Tensor | None, s: _Settings):
    """The step iterator for these settings: contrastive search, or greedy/sampling."""
    if s.penalty_alpha > 0:
        from .contrastive import contrastive_steps

        return contrastive_steps(
            model, tokens, mask, penalty_alpha=s.penalty_alpha, top_k=s.top_k,
            max_new_tokens=s.max_new_tokens, stop_ids=s.stop_ids, logits_processor=s.pipeline,
        )  # fmt: skip
    return _steps(model, tokens, mask, s)


def _steps(model: GPT2, tokens: torch.Tensor, mask: torch.Tensor | None, s: _Settings) -> Iterator:
    """Yield (next tokens [B], their log-probs [B], finished [B] before this step)."""
    B, T = tokens.shape
    gen = torch.Generator(device=model.device)
    gen.manual_seed(s.seed if s.seed is not None else int(torch.randint(2**31, ()).item()))
    eot = model.tokenizer.eot_token
    stop_ids = torch.tensor(sorted(s.stop_ids), device=model.device, dtype=torch.long)

    cache = model.new_cache(B, T + s.max_new_tokens)
    logits = model(tokens, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]
    seq = torch.cat([tokens, tokens.new_empty(B, s.max_new_tokens)], dim=1)
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    for step in range(s.max_new_tokens):
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        scores = s.pipeline(seq[:, : T + step], logits)
        if s.sample:
            probs = torch.softmax(scores, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        else:
            next_token = scores.argmax(-1)
        next_token = torch.where(done, eot, next_token)
        seq[:, T + step] = next_token
        yield next_token, logprobs.gather(1, next_token[:, None]).squeeze(1), done.clone()
        done |= torch.isin(next_token, stop_ids)
        if bool(done.all()) or step == s.max_new_tokens - 1:
            return
        logits = model(next_token[:, None], cache=cache)[:, -1]


class _StopStrings:
    """One row's text as it is decoded, cut at the first stop string.

    `push` returns only text that is final: whole characters, and never a tail that
    could still grow into a stop string (that is held back until it cannot)."""

    def __init__(self, model: GPT2, stops: list[str]):
        self.decoder = model.tokenizer.stream_decoder()
        self.stops, self.text, self.emitted, self.stopped = stops, "", 0, False
        self.longest = max((len(x) for x in stops), default=0)

    def push(self, token: int) -> str:
        before = len(self.text)
        self.text += self.decoder.push(token)
        hits = [self.text.find(x, max(0, before - self.longest)) for x in self.stops]
        hits = [i for i in hits if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._emit(len(self.text))
        safe = len(self.text)
        for x in self.stops:  # the longest proper prefix of a stop string ending the text
            for n in range(min(len(x) - 1, len(self.text)), 0, -1):
                if self.text.endswith(x[:n]):
                    safe = min(safe, len(self.text) - n)
                    break
        return self._emit(safe)

    def finish(self) -> str:
        """What is left once decoding ends: held-back text and any incomplete character."""
        if self.stopped:
            return ""
        self.text += self.decoder.flush()
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


@torch.inference_mode()
def generate(model: GPT2, prompt, *, return_result: bool = False, **options):
    """Continue `prompt` (text, a list of texts, token ids or an id tensor).

    Greedy by default; sampling when `do_sample=True` or any of temperature / top_k /
    top_p / min_p / typical_p / epsilon_cutoff / eta_cutoff is given (temperature 0
    is always greedy); beam search with `num_beams > 1`; contrastive search with
    `penalty_alpha > 0` and `top_k > 1` (as in transformers). Returns the continuation as
    text for text input (a list for a list of prompts), token ids for id input, or a
    `GenerationResult` with `return_result=True`.
    """
    tokens, mask, is_text, single = _prompt_tokens(model, prompt)
    if options.get("num_beams", 1) != 1 or options.get("num_beam_groups", 1) != 1:
        result = _generate_beams(model, tokens, mask, dict(options))
    else:
        settings = _settings(model, tokens.shape[1], dict(options), _pad_lengths(mask))
        result = _generate_loop(model, tokens, mask, settings)
    if return_result:
        return result
    value = result.texts if is_text else result.tokens
    return value[0] if single and len(value) == 1 else value


def _generate_loop(model: GPT2, tokens, mask, s: _Settings) -> GenerationResult:
    B = tokens.shape[0]
    rows = [_StopStrings(model, s.stop_strings) for _ in range(B)]
    out: list[list[int]] = [[] for _ in range(B)]
    lps: list[list[float]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    start = time.monotonic()
    for next_token, logprob, finished in _decode(model, tokens, mask, s):
        for b, (t, lp, was_done) in enumerate(
            zip(next_token.tolist(), logprob.tolist(), finished.tolist(), strict=True)
        ):
            if was_done or reasons[b] != "length":
                continue
            if t in s.stop_ids:
                reasons[b] = "stop"
                continue
            out[b].append(t)
            lps[b].append(lp)
            rows[b].push(t)
            if rows[b].stopped:
                reasons[b] = "stop"
        if all(r != "length" for r in reasons):
            break
        if s.max_time is not None and time.monotonic() - start > s.max_time:
            reasons = ["time" if r == "length" else r for r in reasons]
            break
    texts = []
    for b, row in enumerate(rows):
        if row.stopped:
            texts.append(row.text)
            # keep only the tokens whose text lies before the stop string
            while out[b] and len(model.tokenizer.decode(out[b][:-1])) >= len(row.text):
                out[b].pop()
                lps[b].pop()
        else:
            texts.append(model.tokenizer.decode(out[b]))
    return GenerationResult(out, lps, reasons, texts)


BEAM_OPTIONS = (
    "num_beams",
    "length_penalty",
    "early_stopping",
    "num_return_sequences",
    "num_beam_groups",
    "diversity_penalty",
)


def _generate_beams(model: GPT2, tokens, mask, options: dict[str, Any]) -> GenerationResult:
    """Beam search (beam.py) with the same processors; one result per returned sequence."""
    from .beam import beam_search

    beam = {k: options.pop(k) for k in BEAM_OPTIONS if k in options}
    n = beam.get("num_beams", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise GPT2LabError(f"num_beams must be an integer >= 1, got {n!r}")
    sampling = [k for k in ("do_sample", "temperature", *SAMPLING_OPTIONS) if options.get(k)]
    if sampling:
        raise GPT2LabError(f"beam search does not sample; drop {sampling[0]}")
    if options.get("stop") or options.get("max_time"):
        raise GPT2LabError("stop strings and max_time are not supported with beam search")
    if options.get("penalty_alpha"):
        raise GPT2LabError("penalty_alpha (contrastive search) cannot be combined with beam search")
    pad = _pad_lengths(mask)
    s = _settings(
        model, tokens.shape[1], options, None if pad is None else pad.repeat_interleave(n)
    )
    eot = model.tokenizer.eot_token
    rows = beam_search(
        model, tokens, mask, max_new_tokens=s.max_new_tokens, eos_token_id=eot,
        logits_processor=s.pipeline, **beam,
    )  # fmt: skip
    result = GenerationResult([], [], [])
    for hypotheses in rows:
        for ids, score in hypotheses:
            ids = list(ids)
            finished = eot in ids
            ids = ids[: ids.index(eot)] if finished else ids
            result.tokens.append(ids)
            result.logprobs.append([])  # a beam's tokens have no single sampling distribution
            result.finish_reasons.append("stop" if finished else "length")
            result.scores.append(float(score))
    result.texts = [model.tokenizer.decode(t) for t in result.tokens]
    return result


@torch.inference_mode()
def stream(model: GPT2, prompt: str, **options) -> Iterator[str]:
    """Yield the continuation of one text prompt piece by piece, as tokens are decoded.

    Pieces are whole UTF-8 characters, and text that might be the start of a stop
    string is held back until it is clear it is not; "".join(pieces) equals
    generate(prompt, **options) for the same options and seed.
    """
    if not isinstance(prompt, str):
        raise GPT2LabError("stream() takes one text prompt")
    if options.get("num_beams", 1) != 1:
        raise GPT2LabError("stream() does not support beam search (it revises earlier tokens)")
    tokens, mask, _, _ = _prompt_tokens(model, prompt)
    s = _settings(model, tokens.shape[1], dict(options))
    row = _StopStrings(model, s.stop_strings)
    start = time.monotonic()
    for next_token, _, finished in _decode(model, tokens, mask, s):
        t = int(next_token[0])
        if bool(finished[0]) or t in s.stop_ids:
            break
        piece = row.push(t)
        if piece:
            yield piece
        if row.stopped or (s.max_time is not None and time.monotonic() - start > s.max_time):
            break
    tail = row.finish()
    if tail:
        yield tail
