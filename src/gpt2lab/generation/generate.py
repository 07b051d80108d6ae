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

import contextvars
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import GPT2LabError
from ..inputs import prompt_kind, to_batch
from ..validate import (
    as_list,
    boolean,
    check_memory,
    integer,
    is_int,
    number,
    seed,
    show,
    token_ids,
)
from .processors import build_pipeline

if TYPE_CHECKING:
    from ..model import GPT2

SAMPLING_OPTIONS = ("top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
# The values of the sampling options that change nothing (what beam search accepts).
SAMPLING_NO_OPS = {"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                   "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}  # fmt: skip
# transformers' beam options at their defaults: accepted without beams, as the no-ops they
# are there; any other value needs beam search (num_beams > 1).
BEAM_DEFAULTS = {"num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1,
                 "length_penalty": 1.0, "diversity_penalty": 0.0, "early_stopping": False}  # fmt: skip
# Other transformers options that gpt2lab accepts at their defaults only.
OTHER_DEFAULTS = {"use_cache": True, "output_scores": False, "output_logits": False,
                  "output_attentions": False, "output_hidden_states": False,
                  "return_dict_in_generate": False}  # fmt: skip


@dataclass
class GenerationResult:
    """What a generation produced, per batch row (per returned sequence for beam search)."""

    tokens: list[list[int]]  # new tokens only (an ending <|endoftext|> or stop id is left out)
    logprobs: list[list[float]]  # log-probability of each new token under the model
    finish_reasons: list[str]  # "stop" (end-of-text, stop id or string), "length" or "time"
    texts: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # beam search: the hypothesis scores


def _prompt_tokens(
    model: GPT2, prompt, prepend_bos: Any = None, padding_side: Any = None
) -> tuple[torch.Tensor, torch.Tensor | None, bool, bool]:
    """(tokens, mask, input was text, input was a single item).

    Text gets the BOS if `prepend_bos` (default: the model's `default_prepend_bos`); a
    batch of texts is always left-padded, so that every row continues from the last
    column (TransformerLens' `generate` forces left padding too); `padding_side` is
    checked and otherwise changes nothing."""
    bos = model._bos(prepend_bos)
    model._side(padding_side)
    kind = prompt_kind(prompt)
    if kind == "ids":
        token_ids("prompt", prompt, model.cfg.d_vocab)  # its own message for a bad id
    elif kind not in ("text", "texts", "tensor") or isinstance(prompt, tuple):
        raise GPT2LabError(
            "prompt must be a string, a list of strings, a list of token ids or a tensor of ids, "
            f"got {show(prompt)}"
        )
    batch = to_batch(
        model.tokenizer, prompt, prepend_bos=bos, padding_side="left", device=model.device
    )
    return batch.tokens, batch.mask, batch.is_text, batch.single


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
    max_new_tokens = integer("max_new_tokens", opts.pop("max_new_tokens", 32), 1)
    _accept_defaults(model, opts)
    penalty_alpha, contrastive_k = _contrastive_options(model, opts)
    temperature = opts.pop("temperature", None)
    if temperature is not None:
        temperature = number("temperature", temperature, 0)
    do_sample = opts.pop("do_sample", None)
    if temperature == 0:
        sample = False  # temperature 0 means greedy, whatever else is set
    elif do_sample is not None:
        sample = boolean("do_sample", do_sample)
    else:
        sample = temperature is not None or any(opts.get(k) is not None for k in SAMPLING_OPTIONS)
    eot = model.tokenizer.eot_token
    stop_ids = _stop_ids(model, opts.pop("stop_token_ids", None))
    if boolean("stop_at_eot", opts.pop("stop_at_eot", True)):
        stop_ids.add(eot)
    stop_strings = _stop_strings(opts.pop("stop", None))
    bad_words = opts.pop("bad_words", None)
    if bad_words is not None:
        opts["bad_words_ids"] = _bad_words(model, bad_words)
    max_time = _max_time(opts.pop("max_time", None))
    seed_value = seed(opts.pop("seed", None))
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
        raise GPT2LabError(f"unknown generation option {sorted(opts, key=str)[0]!r}")
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
    _check_vocab(model, processing.get("bad_words_ids"))
    if prompt_len + max_new_tokens > model.cfg.n_ctx:
        raise GPT2LabError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"context of {model.cfg.n_ctx}"
        )
    return _Settings(
        max_new_tokens, sample, pipeline, stop_ids, stop_strings, max_time, seed_value,
        penalty_alpha, contrastive_k,
    )  # fmt: skip


def _accept_defaults(model: GPT2, opts: dict[str, Any]) -> None:
    """Pop transformers' options that change nothing at the values given: the beam options
    at their defaults (other values need num_beams > 1), output switches at theirs, and
    `pad_token_id` / `eos_token_id` as HF GPT-2 code passes them (padding never shows in
    gpt2lab's outputs; the end token is <|endoftext|>)."""
    for key, default in BEAM_DEFAULTS.items():
        value = opts.pop(key, None)  # None means the default, as in transformers
        if value is None:
            continue
        if key == "num_beams":
            integer("num_beams", value, 1)
        if _same(value, default):
            continue
        if key == "num_return_sequences":  # transformers would sample several per prompt
            raise GPT2LabError(
                f"num_return_sequences={show(value)}: gpt2lab supports num_return_sequences "
                "only with beam search (num_beams > 1); for several samples of one prompt, "
                "pass it several times in a list of prompts or call generate again with "
                "other seeds"
            )
        raise GPT2LabError(
            f"{key}={show(value)} needs beam search (num_beams > 1); without beams only "
            f"{key}={default!r} is accepted"
        )
    for key, default in OTHER_DEFAULTS.items():
        value = opts.pop(key, None)
        if value is not None and not _same(value, default):
            raise GPT2LabError(f"{key} is not supported other than at its default, {default!r}")
    pad = opts.pop("pad_token_id", None)
    if pad is not None:
        integer("pad_token_id", pad, 0, model.cfg.d_vocab - 1)
    eos = opts.pop("eos_token_id", None)
    if eos is not None:
        if token_ids("eos_token_id", eos, model.cfg.d_vocab, allow_one=True) != [
            model.tokenizer.eot_token
        ]:
            raise GPT2LabError(
                "eos_token_id other than <|endoftext|> is not supported; pass stop_token_ids "
                "to end on other tokens"
            )


def _same(value: Any, default: Any) -> bool:
    """`value` equals `default` and has its kind (True is not 1, 1.0 is not the int 1)."""
    if isinstance(default, bool):
        return isinstance(value, bool) and value == default
    if isinstance(default, int):
        return is_int(value) and value == default
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == default


def end_ids(model: GPT2, name: str, value: Any) -> list[int]:
    """Token ids that end a row (`stop_token_ids`, `eos_token_id`): None or no ids for
    none, one id, or any iterable of ids (a list, tuple, set, range, array or tensor)."""
    if value is None:
        return []
    return token_ids(name, value, model.cfg.d_vocab, allow_one=True, allow_empty=True)


def _stop_ids(model: GPT2, value: Any) -> set[int]:
    return set(end_ids(model, "stop_token_ids", value))


def _stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, (list, tuple)) or any(
        not isinstance(s, str) or not s for s in strings
    ):
        raise GPT2LabError(
            f"stop must be a non-empty string or a list of non-empty strings, got {show(stop)}"
        )
    return list(strings)


def _bad_words(model: GPT2, bad_words: Any) -> list[list[int]]:
    """`bad_words` as token sequences to ban: a string is one word (encoded as given, so
    " word" bans the word after a space); otherwise any iterable (a list, tuple, set...)
    of words, each a string or an iterable of token ids."""
    words = [bad_words] if isinstance(bad_words, str) else as_list(bad_words)
    if not words:
        raise GPT2LabError(
            "bad_words must be a string or a non-empty list of strings and lists of token "
            f"ids, got {show(bad_words)}"
        )
    out = []
    for word in words:
        if isinstance(word, str):
            ids = model.tokenizer.encode(word)
            if not ids:
                raise GPT2LabError("bad_words holds an empty string: give each word some text")
        else:
            ids = token_ids("each of bad_words", word, model.cfg.d_vocab)
        out.append(ids)
    return out


def _check_vocab(model: GPT2, sequences: Any) -> None:
    """Banned token ids must exist (BannedSequences itself only learns the vocabulary
    size at the first step, too late to say so before decoding starts)."""
    if sequences:
        top = max(t for seq in sequences for t in seq)
        if top >= model.cfg.d_vocab:
            raise GPT2LabError(
                f"bad_words_ids contains token id {top}, outside the vocabulary of "
                f"{model.cfg.d_vocab}"
            )


def _max_time(value: Any) -> float | None:
    """A time limit in seconds (> 0; infinity means none)."""
    if value is None or (isinstance(value, float) and value == math.inf):
        return None
    return number("max_time", value, 0, low_open=True)


def check_decoding_memory(
    model: GPT2,
    what: str,
    rows: int,
    positions: int,
    *,
    copies: int,
    vocab_buffers: int = 6,
    hint: str = "use fewer prompts, beams or new tokens",
) -> None:
    """Refuse, before allocating, a decoding job whose working set would not fit in memory.

    Per row (a prompt, a beam or a contrastive candidate): its KV cache (all layers, keys
    and values) `copies` times, `vocab_buffers` vocabulary-sized float32 buffers a step
    (logits, log-probs, processed scores, the softmax and top-k work: about six for
    greedy, sampling and beam rows, two for a contrastive candidate) and a few int64 rows
    of tokens. `copies` is 1 for greedy search and sampling, which fill one cache in
    place; 2 for beam search, whose reorder builds the reordered cache while the old one
    is still alive, and contrastive search, which copies the prompt's cache to every
    candidate row."""
    cfg = model.cfg
    cache = 2 * cfg.n_layers * positions * cfg.d_model * model.dtype.itemsize
    per_row = copies * cache + vocab_buffers * cfg.d_vocab * 4 + 6 * positions * 8
    check_memory(what, rows * per_row, model.device, hint=hint)


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

    check_decoding_memory(
        model, f"generating for {B} prompts x {T + s.max_new_tokens} positions", B,
        T + s.max_new_tokens, copies=1,
    )  # fmt: skip
    cache = model.new_cache(B, T + s.max_new_tokens)
    logits = model(tokens, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]
    check_finite(logits)
    seq = torch.cat([tokens, tokens.new_empty(B, s.max_new_tokens)], dim=1)
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    for step in range(s.max_new_tokens):
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        scores = s.pipeline(seq[:, : T + step], logits)
        if s.sample:
            next_token = _draw(torch.softmax(scores, dim=-1), gen)
        else:
            next_token = scores.argmax(-1)
        next_token = torch.where(done, eot, next_token)
        seq[:, T + step] = next_token
        yield next_token, logprobs.gather(1, next_token[:, None]).squeeze(1), done.clone()
        done |= torch.isin(next_token, stop_ids)
        if bool(done.all()) or step == s.max_new_tokens - 1:
            return
        logits = model(next_token[:, None], cache=cache)[:, -1]


def check_finite(logits: torch.Tensor) -> None:
    """Refuse to decode from non-finite logits (checked once, on the prompt's): NaN or inf
    weights would otherwise make greedy search emit token 0 forever, sampling fail deep
    in torch, and beam scores turn NaN."""
    if not bool(torch.isfinite(logits).all()):
        raise _not_finite()


def _not_finite() -> GPT2LabError:
    return GPT2LabError(
        "the model's logits are not finite (NaN or inf): its weights hold NaN or inf "
        "values; reload or retrain the checkpoint"
    )


def _draw(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row from `probs` [batch, vocab] (torch.multinomial, whose error for
    an invalid distribution is turned into one that says what went wrong)."""
    try:
        return torch.multinomial(probs, 1, generator=gen).squeeze(1)
    except RuntimeError:
        raise GPT2LabError(
            "cannot sample: the next-token distribution is not valid (NaN or inf logits, or "
            "every token filtered out by the options)"
        ) from None


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
    `GenerationResult` with `return_result=True`. `prepend_bos=True` puts
    `<|endoftext|>` before text prompts (default: the model's `default_prepend_bos`); a
    list of texts is always left-padded (`padding_side` is accepted, as in
    TransformerLens, whose `generate` also pads batches on the left).

    TransformerLens' arguments are accepted too: `stop_at_eos` (= `stop_at_eot`),
    `verbose` and `use_past_kv_cache` (no progress bar; the KV cache is always used,
    which changes no greedy token), and `return_type` ("input", "str" or "tokens"),
    which returns what TransformerLens returns: the prompt *with* its continuation, as
    text without `<|endoftext|>`, or as a [batch, pos + new] tensor whose finished rows
    are filled with `<|endoftext|>`.
    """
    options = dict(options)
    return_result = boolean("return_result", return_result)
    return_type = _transformer_lens_options(options, return_result)
    tokens, mask, is_text, single = _prompt_tokens(
        model, prompt, options.pop("prepend_bos", None), options.pop("padding_side", None)
    )
    if _wants_beams(options):
        result = _generate_beams(model, tokens, mask, dict(options))
    else:
        settings = _settings(model, tokens.shape[1], dict(options), _pad_lengths(mask))
        result = _generate_loop(model, tokens, mask, settings)
    if return_type is not None:
        if return_type == "input":
            return_type = "str" if is_text else "tokens"
        return _transformer_lens_output(model, tokens, mask, result, return_type)
    if return_result:
        return result
    value = result.texts if is_text else result.tokens
    return value[0] if single and len(value) == 1 else value


TL_RETURN_TYPES = ("input", "str", "tokens")


def _transformer_lens_options(options: dict[str, Any], return_result: bool) -> str | None:
    """Pop TransformerLens' generate() arguments; its `return_type` (None if not given)."""
    boolean("verbose", options.pop("verbose", True))  # gpt2lab shows no progress bar
    boolean("use_past_kv_cache", options.pop("use_past_kv_cache", True))
    if "stop_at_eos" in options:
        if "stop_at_eot" in options:
            raise GPT2LabError("give stop_at_eos (TransformerLens' name) or stop_at_eot, not both")
        options["stop_at_eot"] = options.pop("stop_at_eos")
    return_type = options.pop("return_type", None)
    if return_type is None:
        return None
    if return_type == "embeds":
        raise GPT2LabError(
            "return_type='embeds' is not supported: gpt2lab generates from tokens; use "
            "return_type='tokens' and model.embed.W_E[tokens]"
        )
    if not isinstance(return_type, str) or return_type not in TL_RETURN_TYPES:
        raise GPT2LabError(
            f"return_type must be one of {', '.join(TL_RETURN_TYPES)}, got {show(return_type)}"
        )
    if return_result:
        raise GPT2LabError("give return_type (TransformerLens' outputs) or return_result, not both")
    return return_type


def _transformer_lens_output(model: GPT2, tokens, mask, result: GenerationResult, kind: str):
    """TransformerLens' generate() output: each prompt row (padding as <|endoftext|>) and
    its new tokens, rows that ended early filled with <|endoftext|> (the end token
    included, as TransformerLens samples it); "str" decodes each row without it."""
    eot = model.tokenizer.eot_token
    if len(result.tokens) != tokens.shape[0]:
        raise GPT2LabError(
            "return_type gives one sequence per prompt; with num_return_sequences use "
            "return_result=True"
        )
    prompt = tokens if mask is None else tokens.masked_fill(mask == 0, eot)
    n_new = max(
        len(new) + (reason == "stop")
        for new, reason in zip(result.tokens, result.finish_reasons, strict=True)
    )
    new = torch.tensor(
        [row + [eot] * (n_new - len(row)) for row in result.tokens],
        dtype=prompt.dtype,
        device=prompt.device,
    ).view(len(result.tokens), n_new)
    out = torch.cat([prompt, new], dim=1)
    if kind == "tokens":
        return out
    texts = [model.tokenizer.decode([t for t in row if t != eot]) for row in out.tolist()]
    return texts[0] if len(texts) == 1 else texts


def _given(value: Any, unset: Any = None) -> bool:
    """Whether an option was given a value: None, an empty string or list, and the number
    `unset` mean it was not."""
    if value is None or (isinstance(value, (str, list, tuple)) and not value):
        return False
    return not (unset is not None and _same(value, unset))


def _wants_beams(options: dict[str, Any]) -> bool:
    """Beam search: num_beams or num_beam_groups other than 1 (invalid values included, so
    that beam search reports them)."""
    return any(
        options.get(k) is not None and not _same(options[k], 1)
        for k in ("num_beams", "num_beam_groups")
    )


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
            if lp != lp:  # NaN: the logits went non-finite after the prompt (checked there)
                raise _not_finite()
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
    from .beam import plan_beam_search, run_beam_search

    beam = {k: options.pop(k) for k in BEAM_OPTIONS if options.get(k) is not None}
    n = beam["num_beams"] = integer("num_beams", beam.get("num_beams", 1), 1)
    for key, no_op in SAMPLING_NO_OPS.items():  # accepted where they change nothing
        value = options.pop(key, None)
        if value is not None and not _same(value, no_op):
            raise GPT2LabError(f"beam search does not sample; drop {key}")
    if _given(options.get("stop")) or _given(options.get("max_time")):
        raise GPT2LabError("stop strings and max_time are not supported with beam search")
    if _given(options.get("penalty_alpha"), unset=0.0):
        raise GPT2LabError("penalty_alpha (contrastive search) cannot be combined with beam search")
    max_new = integer("max_new_tokens", options.get("max_new_tokens", 32), 1)
    eot = model.tokenizer.eot_token
    # Checked (memory included) before the per-beam padding lengths below are allocated.
    plan = plan_beam_search(model, tokens, max_new_tokens=max_new, eos_token_id=eot, **beam)
    pad = _pad_lengths(mask)
    s = _settings(
        model, tokens.shape[1], options, None if pad is None else pad.repeat_interleave(n)
    )
    rows = run_beam_search(model, plan, mask, s.pipeline)
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


def stream(model: GPT2, prompt: str, **options) -> Iterator[str]:
    """Yield the continuation of one text prompt piece by piece, as tokens are decoded.

    Pieces are whole UTF-8 characters, and text that might be the start of a stop
    string is held back until it is clear it is not; "".join(pieces) equals
    generate(prompt, **options) for the same options and seed. The arguments are
    checked here, before the first piece is asked for.

    Every step runs in the context `stream` was called in: the hooks of a
    `model.hooks(...)` block around the call apply to each step taken while that block
    is open, wherever the iterator is advanced (another thread, an executor,
    interleaved with other streams), and no other block's hooks do.
    """
    if not isinstance(prompt, str):
        raise GPT2LabError("stream() takes one text prompt")
    if _wants_beams(options):
        raise GPT2LabError("stream() does not support beam search (it revises earlier tokens)")
    options = dict(options)
    tokens, mask, _, _ = _prompt_tokens(
        model, prompt, options.pop("prepend_bos", None), options.pop("padding_side", None)
    )
    s = _settings(model, tokens.shape[1], options)
    return _in_context(contextvars.copy_context(), _pieces(model, tokens, mask, s))


def _in_context(ctx: contextvars.Context, steps: Iterator[str]) -> Iterator[str]:
    """`steps`, each advanced (and finally closed) inside `ctx`."""
    try:
        while True:
            try:
                piece = ctx.run(next, steps)
            except StopIteration:
                return
            yield piece
    finally:
        ctx.run(steps.close)


@torch.inference_mode()
def _pieces(model: GPT2, tokens, mask, s: _Settings) -> Iterator[str]:
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
