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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import GPT2LabError
from ..inputs import prompt_kind, to_batch
from ..kernels.pick import greedy
from ..validate import (
    boolean,
    check_memory,
    integer,
    show,
    token_ids,
)
from .config import BEAM_OPTIONS, GenerationConfig, wants_beams

if TYPE_CHECKING:
    from ..model import GPT2


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
    """A config resolved against a model and a prompt: what the decoding loop reads."""

    max_new_tokens: int
    sample: bool
    pipeline: Any
    stop_ids: set[int]
    stop_strings: list[str]
    max_time: float | None
    seeds: list[int]  # one per row (sampling)
    penalty_alpha: float = 0.0  # > 0: contrastive search with `top_k` candidates
    top_k: int = 0


def resolve(
    model: GPT2, config: GenerationConfig, prompt_len: int, rows: int,
    pad_lengths: torch.Tensor | None = None,
) -> _Settings:  # fmt: skip
    """Check `config` against the model and a prompt of `prompt_len` columns; `pad_lengths`
    [rows]: left padding, kept out of penalties."""
    config.check(model, prompt_len)
    return _Settings(
        config.max_new_tokens, config.sample, config.processors(model, prompt_len, pad_lengths),
        config.stop_ids(model), list(config.stop), config.max_time, config.row_seeds(rows),
        config.penalty_alpha or 0.0, config.top_k or 0 if config.penalty_alpha else 0,
    )  # fmt: skip


def end_ids(model: GPT2, name: str, value: Any) -> list[int]:
    """Token ids that end a row (`stop_token_ids`, `eos_token_id`): None or no ids for
    none, one id, or any iterable of ids (a list, tuple, set, range, array or tensor)."""
    if value is None:
        return []
    return token_ids(name, value, model.cfg.d_vocab, allow_one=True, allow_empty=True)


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
    """Yield (next tokens, their log-probs, finished before this step), lists of B each.

    Bookkeeping stays in Python lists: on a decoding step every torch op costs tens of
    microseconds (the weight reads have just evicted the caches), a list op far less."""
    B, T = tokens.shape
    gens = (
        [torch.Generator(device=model.device).manual_seed(x) for x in s.seeds] if s.sample else []
    )
    eot = model.tokenizer.eot_token
    plain = not s.sample and not s.pipeline  # greedy on the raw logits: kernels.pick

    check_decoding_memory(
        model, f"generating for {B} prompts x {T + s.max_new_tokens} positions", B,
        T + s.max_new_tokens, copies=1,
    )  # fmt: skip
    cache = model.new_cache(B, T + s.max_new_tokens)
    logits = model(tokens, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]
    check_finite(logits)
    seq = torch.cat([tokens, tokens.new_empty(B, s.max_new_tokens)], dim=1) if s.pipeline else None
    done = [False] * B
    for step in range(s.max_new_tokens):
        if plain:
            next_token, logprob = greedy(logits)
        else:
            logits = logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            scores = s.pipeline(seq[:, : T + step], logits) if s.pipeline else logits
            next_token = (
                _draw(torch.softmax(scores, dim=-1), gens) if s.sample else scores.argmax(-1)
            )
            logprob = logprobs.gather(1, next_token[:, None]).squeeze(1)
        ids = next_token.tolist()
        if any(done):  # finished rows are fed the end token (their output is ignored)
            ids = [eot if d else t for t, d in zip(ids, done, strict=True)]
            next_token = torch.tensor(ids, dtype=torch.long, device=model.device)
        if seq is not None:
            seq[:, T + step] = next_token
        yield ids, logprob.tolist(), done
        done = [d or t in s.stop_ids for t, d in zip(ids, done, strict=True)]
        if all(done) or step == s.max_new_tokens - 1:
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


def _draw(probs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """One token per row from `probs` [batch, vocab], row b with its own generator
    `gens[b]` (so a row's draws never depend on its batch-mates), by torch.multinomial,
    whose error for an invalid distribution is turned into one that says what went wrong."""
    try:
        if len(gens) == 1:
            return torch.multinomial(probs, 1, generator=gens[0]).squeeze(1)
        return torch.cat(
            [torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, gens, strict=True)]
        ).squeeze(1)
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
def generate(
    model: GPT2, prompt, *, return_result: bool = False, config: GenerationConfig | None = None,
    **options,
):  # fmt: skip
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
    result = generate_tokens(model, tokens, mask, _config(config, options))
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


@torch.inference_mode()
def generate_tokens(
    model: GPT2, tokens: torch.Tensor, mask: torch.Tensor | None, config: GenerationConfig
) -> GenerationResult:
    """Continue left-padded prompts `tokens` [batch, pos] (`mask`: 1 = token, or None) as
    `config` says: the one decoding entry point behind generate, the CLI, lm-eval and
    the server. Rows are independent: row b samples with seed `config.seed + b`."""
    if not isinstance(config, GenerationConfig):
        raise GPT2LabError(f"config must be a GenerationConfig, got {type(config).__name__}")
    tokens = model._check_tokens(tokens)
    if config.mode == "beam":
        return _generate_beams(model, tokens, mask, config)
    s = resolve(model, config, tokens.shape[1], tokens.shape[0], _pad_lengths(mask))
    return _generate_loop(model, tokens, mask, s)


def _generate_loop(model: GPT2, tokens, mask, s: _Settings) -> GenerationResult:
    B = tokens.shape[0]
    rows = [_StopStrings(model, s.stop_strings) for _ in range(B)]
    out: list[list[int]] = [[] for _ in range(B)]
    lps: list[list[float]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    start = time.monotonic()
    for next_token, logprob, finished in _decode(model, tokens, mask, s):
        for b, (t, lp, was_done) in enumerate(zip(next_token, logprob, finished, strict=True)):
            if was_done or reasons[b] != "length":
                continue
            if lp != lp:  # NaN: the logits went non-finite after the prompt (checked there)
                raise _not_finite()
            if t in s.stop_ids:
                reasons[b] = "stop"
                continue
            out[b].append(t)
            lps[b].append(lp)
            if s.stop_strings:  # (else the text is decoded once, at the end)
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


def _generate_beams(model: GPT2, tokens, mask, config: GenerationConfig) -> GenerationResult:
    """Beam search (beam.py) with the same processors; one result per returned sequence."""
    from .beam import plan_beam_search, run_beam_search

    beam = {k: getattr(config, k) for k in BEAM_OPTIONS if getattr(config, k) is not None}
    n = beam["num_beams"] = integer("num_beams", beam.get("num_beams", 1), 1)
    eot = model.tokenizer.eot_token
    # Checked (memory included) before the per-beam padding lengths below are allocated.
    plan = plan_beam_search(
        model, tokens, max_new_tokens=config.max_new_tokens, eos_token_id=eot, **beam
    )
    pad = _pad_lengths(mask)
    s = resolve(
        model, config, tokens.shape[1], tokens.shape[0] * n,
        None if pad is None else pad.repeat_interleave(n),
    )  # fmt: skip
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


def _config(config: GenerationConfig | None, options: dict[str, Any]) -> GenerationConfig:
    """`config` (a GenerationConfig) with keyword `options` on top, or the options alone."""
    if config is None:
        return GenerationConfig.from_options(**options)
    if not isinstance(config, GenerationConfig):
        raise GPT2LabError(f"config must be a GenerationConfig, got {type(config).__name__}")
    return config.replace(**options) if options else config


def stream(
    model: GPT2, prompt: str, *, config: GenerationConfig | None = None, **options
) -> Iterator[str]:
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
    options = dict(options)
    bos, side = options.pop("prepend_bos", None), options.pop("padding_side", None)
    if wants_beams(options.get("num_beams"), options.get("num_beam_groups")) or (
        isinstance(config, GenerationConfig) and config.mode == "beam"
    ):
        raise GPT2LabError("stream() does not support beam search (it revises earlier tokens)")
    tokens, mask, _, _ = _prompt_tokens(model, prompt, bos, side)
    s = resolve(model, _config(config, options), tokens.shape[1], 1)
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
        t = next_token[0]
        if finished[0] or t in s.stop_ids:
            break
        piece = row.push(t)
        if piece:
            yield piece
        if row.stopped or (s.max_time is not None and time.monotonic() - start > s.max_time):
            break
    tail = row.finish()
    if tail:
        yield tail
