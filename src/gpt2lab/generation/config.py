"""One typed, validated set of generation options, shared by every way in.

`model.generate`, `stream`, beam and contrastive search, the CLI, the lm-eval adapter
and the server all turn their options into a `GenerationConfig` and hand it to the
decoding loop, so an option means the same thing, and is refused with the same
message, whichever door it came through. The config is frozen and knows no model:
what can be checked without one (types, ranges, combinations) is checked when it is
built; what needs one (token ids against the vocabulary, words to tokenize, the
context length) is checked by `resolve` / `check` against the model at hand.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import GPT2LabError
from ..validate import as_list, boolean, integer, is_int, number, seed, show, token_ids
from .processors import LogitsPipeline, build_pipeline

if TYPE_CHECKING:
    import torch

    from ..model import GPT2

SAMPLING_OPTIONS = ("top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
PENALTY_OPTIONS = ("repetition_penalty", "frequency_penalty", "presence_penalty",
                   "no_repeat_ngram_size", "min_new_tokens")  # fmt: skip
# The values of the sampling options that change nothing (what beam search accepts).
SAMPLING_NO_OPS = {"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                   "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}  # fmt: skip
# transformers' beam options at their defaults: accepted without beams, as the no-ops they
# are there; any other value needs beam search (num_beams > 1).
BEAM_DEFAULTS = {"num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1,
                 "length_penalty": 1.0, "diversity_penalty": 0.0, "early_stopping": False}  # fmt: skip
BEAM_OPTIONS = tuple(BEAM_DEFAULTS)
# Other transformers options that gpt2lab accepts at their defaults only (not kept).
OTHER_DEFAULTS = {"use_cache": True, "output_scores": False, "output_logits": False,
                  "output_attentions": False, "output_hidden_states": False,
                  "return_dict_in_generate": False}  # fmt: skip
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for logit_bias values
SEED_LIMIT = 2**64


@dataclass(frozen=True)
class GenerationConfig:
    """Every generation option; None means "not given" (the option's no-op).

    Build it with `from_options(**kwargs)` or `from_json(text)`, which validate; the
    constructor is for the validated fields only."""

    max_new_tokens: int = 32
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    epsilon_cutoff: float | None = None
    eta_cutoff: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    min_new_tokens: int | None = None
    logit_bias: tuple[tuple[int, float], ...] | None = None  # (token id, added to its logit)
    bad_words: Any = None  # a string, or a tuple of strings and tuples of ids
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    stop_at_eot: bool = True
    max_time: float | None = None
    seed: int | None = None
    penalty_alpha: float | None = None
    num_beams: Any = None  # beam options: checked by beam search itself (beam.py)
    num_beam_groups: Any = None
    num_return_sequences: Any = None
    length_penalty: Any = None
    diversity_penalty: Any = None
    early_stopping: Any = None
    pad_token_id: int | None = None  # transformers' arguments, checked against the model
    eos_token_id: Any = None
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    # ---- building --------------------------------------------------------------------
    @classmethod
    def from_options(cls, **options: Any) -> GenerationConfig:
        """Validate keyword options (model.generate's names) into a config."""
        return _build(dict(options))

    @classmethod
    def from_json(cls, value: str | bytes | Mapping[str, Any]) -> GenerationConfig:
        """A config from a JSON object (text) or an already-parsed mapping."""
        if isinstance(value, (str, bytes)):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise GPT2LabError(f"generation options are not valid JSON: {e}") from None
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise GPT2LabError(f"generation options must be a JSON object, got {show(value)}")
        return _build(dict(value))

    def replace(self, **changes: Any) -> GenerationConfig:
        """A new config with `changes` applied, validated like the original."""
        return _build({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The options that were given, as keyword arguments (JSON-able)."""
        out = {}
        for name in sorted(self.given):
            value = getattr(self, name)
            if name == "logit_bias" and value is not None:
                value = {str(t): b for t, b in value}
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[name] = value
        return out

    # ---- what it means -------------------------------------------------------------
    @property
    def mode(self) -> str:
        """ "greedy", "sample", "beam" or "contrastive"."""
        if wants_beams(self.num_beams, self.num_beam_groups):
            return "beam"
        if self.penalty_alpha:
            return "contrastive"
        return "sample" if self.sample else "greedy"

    @property
    def sample(self) -> bool:
        """Whether tokens are drawn: do_sample=True, or any sampling option given
        (temperature 0 is always greedy; contrastive search never samples)."""
        if self.temperature == 0 or self.penalty_alpha:
            return False
        if self.do_sample is not None:
            return self.do_sample
        return self.temperature is not None or any(
            getattr(self, k) is not None for k in SAMPLING_OPTIONS
        )

    def stop_ids(self, model: GPT2) -> set[int]:
        """Token ids that end a row: stop_token_ids, and <|endoftext|> unless
        stop_at_eot=False."""
        ids = set(token_ids("stop_token_ids", self.stop_token_ids, model.cfg.d_vocab,
                            allow_empty=True))  # fmt: skip
        if self.stop_at_eot:
            ids.add(model.tokenizer.eot_token)
        return ids

    def processors(
        self, model: GPT2, prompt_len: int, pad_lengths: torch.Tensor | None = None
    ) -> LogitsPipeline:
        """The logits processors for a prompt of `prompt_len` columns (`pad_lengths`
        [rows]: left padding, kept out of the penalties). Warpers only when sampling."""
        return build_pipeline(
            **self._processor_options(),
            prompt_len=prompt_len,
            eos_token_id=model.tokenizer.eot_token,
            pad_lengths=pad_lengths,
            bad_words_ids=self.banned(model),
            logit_bias=dict(self.logit_bias) if self.logit_bias else None,
        )

    def _processor_options(self) -> dict[str, Any]:
        """The penalties, and the temperature and warpers when sampling (warpers only
        reshape the distribution a sampler draws from)."""
        opts = {k: getattr(self, k) for k in PENALTY_OPTIONS}
        if self.sample:
            opts.update({k: getattr(self, k) for k in SAMPLING_OPTIONS})
        opts["temperature"] = self.temperature if self.sample else None
        return opts

    def banned(self, model: GPT2) -> list[list[int]] | None:
        """bad_words and bad_words_ids as token sequences (words tokenized as given)."""
        if self.bad_words is not None:
            words = [self.bad_words] if isinstance(self.bad_words, str) else self.bad_words
            return [model.tokenizer.encode(w) if isinstance(w, str) else list(w) for w in words]
        if self.bad_words_ids is not None:
            return [list(w) for w in self.bad_words_ids]
        return None

    def check(self, model: GPT2, prompt_len: int) -> None:
        """What needs the model: ids inside its vocabulary, contrastive search's top_k,
        the prompt plus new tokens inside its context."""
        vocab = model.cfg.d_vocab
        if self.pad_token_id is not None:
            integer("pad_token_id", self.pad_token_id, 0, vocab - 1)
        if self.eos_token_id is not None and token_ids(
            "eos_token_id", self.eos_token_id, vocab, allow_one=True
        ) != [model.tokenizer.eot_token]:
            raise GPT2LabError(
                "eos_token_id other than <|endoftext|> is not supported; pass stop_token_ids "
                "to end on other tokens"
            )
        if self.penalty_alpha:
            from .contrastive import check_contrastive

            check_contrastive(model, self.penalty_alpha, self.top_k)
        self.stop_ids(model)
        banned = self.banned(model)
        if banned:
            if any(not ids for ids in banned):
                raise GPT2LabError("bad_words holds an empty string: give each word some text")
            top = max(t for seq in banned for t in seq)
            if top >= vocab:
                raise GPT2LabError(
                    f"bad_words_ids contains token id {top}, outside the vocabulary of {vocab}"
                )
        if self.logit_bias:
            top = max(t for t, _ in self.logit_bias)
            if top >= vocab:
                raise GPT2LabError(
                    f"logit_bias names token id {top}, outside the vocabulary of {vocab}"
                )
        if self.mode != "beam" and prompt_len + self.max_new_tokens > model.cfg.n_ctx:
            raise GPT2LabError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({self.max_new_tokens}) exceeds "
                f"the context of {model.cfg.n_ctx}"
            )

    def row_seeds(self, rows: int) -> list[int]:
        """One sampling seed per batch row: seed + row (mod 2**64), so a row draws the same
        tokens whatever else is in its batch; a fresh random base without a seed."""
        base = self.seed
        if base is None:
            import secrets

            base = secrets.randbits(63)
        return [(base + b) % SEED_LIMIT for b in range(rows)]


# ---- validation ----------------------------------------------------------------------
FIELDS = {f.name for f in dataclasses.fields(GenerationConfig)} - {"given"}


def same(value: Any, default: Any) -> bool:
    """`value` equals `default` and has its kind (True is not 1, 1.0 is not the int 1)."""
    if isinstance(default, bool):
        return isinstance(value, bool) and value == default
    if isinstance(default, int):
        return is_int(value) and value == default
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == default


def given(value: Any, unset: Any = None) -> bool:
    """Whether an option was given a value: None, an empty string or list, and the number
    `unset` mean it was not."""
    if value is None or (isinstance(value, (str, list, tuple)) and not value):
        return False
    return not (unset is not None and same(value, unset))


def wants_beams(num_beams: Any, num_beam_groups: Any) -> bool:
    """Beam search: num_beams or num_beam_groups other than 1 (invalid values included, so
    that beam search reports them)."""
    return any(v is not None and not same(v, 1) for v in (num_beams, num_beam_groups))


def _build(opts: dict[str, Any]) -> GenerationConfig:
    names = set(opts)
    for key, default in OTHER_DEFAULTS.items():
        value = opts.pop(key, None)
        if value is not None and not same(value, default):
            raise GPT2LabError(f"{key} is not supported other than at its default, {default!r}")
    unknown = sorted(set(opts) - FIELDS, key=str)
    if unknown:
        raise GPT2LabError(f"unknown generation option {unknown[0]!r}")
    out: dict[str, Any] = {"max_new_tokens": integer(
        "max_new_tokens", opts.get("max_new_tokens", 32), 1)}  # fmt: skip
    beams = wants_beams(opts.get("num_beams"), opts.get("num_beam_groups"))
    if beams:
        _beam_only(opts)
        out.update({k: opts[k] for k in BEAM_OPTIONS if opts.get(k) is not None})
    else:
        _beam_defaults(opts)
    if opts.get("pad_token_id") is not None:
        out["pad_token_id"] = integer("pad_token_id", opts["pad_token_id"], 0)
    if opts.get("eos_token_id") is not None:
        out["eos_token_id"] = tuple(token_ids("eos_token_id", opts["eos_token_id"], allow_one=True))
    _contrastive(opts, out)
    if opts.get("temperature") is not None:
        out["temperature"] = number("temperature", opts["temperature"], 0)
    if opts.get("do_sample") is not None:
        out["do_sample"] = boolean("do_sample", opts["do_sample"])
    if opts.get("stop_token_ids") is not None:
        out["stop_token_ids"] = tuple(
            token_ids("stop_token_ids", opts["stop_token_ids"], allow_one=True, allow_empty=True)
        )
    out["stop_at_eot"] = boolean("stop_at_eot", opts.get("stop_at_eot", True))
    out["stop"] = _stop_strings(opts.get("stop"))
    if opts.get("bad_words") is not None:
        out["bad_words"] = _bad_words(opts["bad_words"])
    if opts.get("bad_words_ids") is not None:
        out["bad_words_ids"] = _bad_words_ids(opts["bad_words_ids"])
    if opts.get("logit_bias") is not None:
        out["logit_bias"] = _logit_bias(opts["logit_bias"])
    out["max_time"] = _max_time(opts.get("max_time"))
    out["seed"] = seed(opts.get("seed"))
    for key in (*SAMPLING_OPTIONS, *PENALTY_OPTIONS):
        if key in opts and key not in out:
            out[key] = opts[key]
    config = GenerationConfig(**out, given=frozenset(names & FIELDS))
    _check_processors(config)
    return config


def _beam_defaults(opts: dict[str, Any]) -> None:
    """Without beams, the beam options are accepted at their defaults only."""
    for key, default in BEAM_DEFAULTS.items():
        value = opts.get(key)  # None means the default, as in transformers
        if value is None:
            continue
        if key == "num_beams":
            integer("num_beams", value, 1)
        if same(value, default):
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


def _beam_only(opts: dict[str, Any]) -> None:
    """What beam search refuses: sampling, stop strings, a time limit, contrastive search."""
    integer("num_beams", opts.get("num_beams", 1), 1)
    for key, no_op in SAMPLING_NO_OPS.items():  # accepted where they change nothing
        value = opts.pop(key, None)
        if value is not None and not same(value, no_op):
            raise GPT2LabError(f"beam search does not sample; drop {key}")
    if given(opts.get("stop")) or given(opts.get("max_time")):
        raise GPT2LabError("stop strings and max_time are not supported with beam search")
    if given(opts.get("penalty_alpha"), unset=0.0):
        raise GPT2LabError("penalty_alpha (contrastive search) cannot be combined with beam search")
    opts.pop("penalty_alpha", None)


def _contrastive(opts: dict[str, Any], out: dict[str, Any]) -> None:
    """penalty_alpha > 0 with top_k selects contrastive search (as in transformers); it is
    deterministic, so sampling options are an error rather than ignored."""
    alpha = opts.get("penalty_alpha")
    if alpha is None:
        return
    alpha = number("penalty_alpha", alpha, 0, 1)
    if alpha == 0:  # no degeneration penalty: the other options decide
        return
    top_k = opts.pop("top_k", None)
    if not is_int(top_k) or top_k < 2:
        raise GPT2LabError(
            "contrastive search (penalty_alpha > 0) needs top_k >= 2 candidates per step "
            f"(at most the vocabulary), got top_k={show(top_k)}"
        )
    sampling = [
        k for k in ("do_sample", "temperature", *SAMPLING_OPTIONS) if opts.get(k) is not None
    ]
    if sampling and not (sampling == ["do_sample"] and opts["do_sample"] is False):
        raise GPT2LabError(
            f"contrastive search (penalty_alpha > 0) does not sample; drop {sampling[0]}"
        )
    opts.pop("do_sample", None)
    out.update(penalty_alpha=float(alpha), top_k=int(top_k))


def _stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, (list, tuple)) or any(
        not isinstance(s, str) or not s for s in strings
    ):
        raise GPT2LabError(
            f"stop must be a non-empty string or a list of non-empty strings, got {show(stop)}"
        )
    return tuple(strings)


def _bad_words(bad_words: Any) -> Any:
    """`bad_words` as given: a string is one word (encoded as given, so " word" bans the word
    after a space); otherwise any iterable of words, each a string or an iterable of ids."""
    if isinstance(bad_words, str):
        if not bad_words:
            raise GPT2LabError("bad_words holds an empty string: give each word some text")
        return bad_words
    words = as_list(bad_words)
    if not words:
        raise GPT2LabError(
            "bad_words must be a string or a non-empty list of strings and lists of token "
            f"ids, got {show(bad_words)}"
        )
    out: list[Any] = []
    for word in words:
        if isinstance(word, str):
            if not word:
                raise GPT2LabError("bad_words holds an empty string: give each word some text")
            out.append(word)
        else:
            out.append(tuple(token_ids("each of bad_words", word)))
    return tuple(out)


def _bad_words_ids(value: Any) -> tuple[tuple[int, ...], ...]:
    words = as_list(value)
    if words is None:
        raise GPT2LabError(f"bad_words_ids must be a list of lists of token ids, got {show(value)}")
    return tuple(tuple(token_ids("each of bad_words_ids", w)) for w in words)


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: {token id (an int or its decimal string): bias in [-100, 100]}."""
    if not isinstance(value, Mapping):
        raise GPT2LabError(
            f"logit_bias must be a mapping of token ids to numbers, got {show(value)}"
        )
    out = {}
    for key, bias in value.items():
        ids = key
        if isinstance(key, str) and key.strip().isdigit():
            ids = int(key)
        if not is_int(ids) or ids < 0:
            raise GPT2LabError(f"logit_bias keys must be token ids >= 0, got {show(key)}")
        out[int(ids)] = number(f"logit_bias[{ids}]", bias, -LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT)
    return tuple(sorted(out.items()))


def _max_time(value: Any) -> float | None:
    """A time limit in seconds (> 0; infinity means none)."""
    if value is None or (isinstance(value, float) and value == math.inf):
        return None
    return number("max_time", value, 0, low_open=True)


def _check_processors(config: GenerationConfig) -> None:
    """Build the processors once, with no model, so a bad value (top_p=2, a negative
    penalty) is refused now rather than at the first decoding step."""
    build_pipeline(**config._processor_options())
