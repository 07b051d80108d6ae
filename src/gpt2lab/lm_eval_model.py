"""gpt2lab as a model for EleutherAI's lm-evaluation-harness (`pip install lm-eval`).

Importing this module registers the model under the name "gpt2lab". lm-eval (0.4.x)
has no plugin discovery for models outside its own package, so it must be imported
before lm-eval looks the name up:

    import lm_eval
    import gpt2lab.lm_eval_model  # registers "gpt2lab"

    results = lm_eval.simple_evaluate(
        model="gpt2lab", model_args="pretrained=gpt2-medium,dtype=bfloat16", tasks=["hellaswag"]
    )
    # or pass an instance: model=GPT2LabLM(pretrained="path/to/checkpoint")

From the shell, run lm-eval's own command line through this module, which registers
the model first and then hands every argument to lm-eval unchanged:

    python -m gpt2lab.lm_eval_model run --model gpt2lab \\
        --model_args pretrained=gpt2-medium,dtype=bfloat16 --tasks lambada_openai --batch_size 8

(plain `lm_eval --model gpt2lab ...` does not find the model.)

model_args: `pretrained` (preset such as gpt2-medium, checkpoint directory, HF repo id,
or `bundled`, the tiny model shipped with gpt2lab and the default), `dtype` (float32
default, bfloat16, float16, int8), `device` (cpu default, cuda, cuda:N, mps, xpu),
`batch_size` (rows per forward pass; "auto" means 16), `max_length` (context used,
default the model's n_ctx), `max_gen_toks` (default 256).

The three request types follow lm-eval's HF model (`HFLM`) conventions:

- loglikelihood: context and continuation split as lm-eval's `_encode_pair` does
  (`gpt2lab.scoring.encode_pair`); an empty context becomes `<|endoftext|>`; rows
  longer than the context keep their last max_length + 1 tokens. Returns (sum of
  log-probs, whether every continuation token was the argmax).
- loglikelihood_rolling: lm-eval's rolling windows (`get_rolling_token_windows` with
  `<|endoftext|>` as prefix and context_len 1, made disjoint): every token is scored
  once, each window seeing up to max_length tokens.
- generate_until: greedy unless the request sets do_sample=True (and a temperature
  other than 0), as HFLM does; stops at `<|endoftext|>`, at any of the `until` strings (the text is cut
  before the first one) or after max_gen_toks tokens; the context is truncated on the
  left to max_length - max_gen_toks tokens.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .errors import GPT2LabError, one_line
from .model import left_pad
from .scoring import encode_pair, token_logprobs
from .validate import is_int, show

DEFAULT_BATCH = 16
logger = logging.getLogger(__name__)


def _registered(cls):
    """register_model("gpt2lab"), except while this file runs as `python -m ...`:
    then `main` imports the module under its real name, which registers it."""
    return cls if __name__ == "__main__" else register_model("gpt2lab")(cls)


@_registered
class GPT2LabLM(LM):
    """An lm-eval `LM` backed by a gpt2lab GPT2 (see the module docstring)."""

    def __init__(
        self,
        pretrained: Any = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = None,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        **_ignored: Any,  # lm-eval passes e.g. max_batch_size to every model
    ) -> None:
        super().__init__()
        from .checkpoint import load
        from .model import GPT2

        if isinstance(pretrained, GPT2):
            self.model = pretrained
        elif dtype == "int8":  # int8 weights, bf16 compute (what --dtype int8 means elsewhere)
            self.model = load(pretrained, device=device, quantize="int8")
        else:
            self.model = load(pretrained, dtype=dtype, device=device)
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        self.eot = self.tokenizer.eot_token
        self.batch_size = _positive_int("batch_size", batch_size, DEFAULT_BATCH)
        n_ctx = self.model.cfg.n_ctx
        self.max_length = _positive_int("max_length", max_length, n_ctx)
        if self.max_length > n_ctx:
            raise GPT2LabError(f"max_length {self.max_length} exceeds the model's context {n_ctx}")
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks, 256)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """model_args win over lm-eval's own settings (its CLI always passes batch_size=1
        and device=cuda:0); lm-eval's default cuda device falls back to the CPU when no
        GPU is present, while device=cuda in model_args is an error there."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if (
            "device" not in arg_dict
            and str(extra.get("device", "")).startswith("cuda")
            and not torch.cuda.is_available()
        ):
            logger.warning("no CUDA GPU available: gpt2lab runs on the CPU")
            extra.pop("device")
        return cls(**{**extra, **arg_dict})

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    # ---- scoring -----------------------------------------------------------------------
    def _score(
        self, pairs: list[tuple[list[int], list[int]]], desc: str
    ) -> list[tuple[float, bool]]:
        """(sum log-prob, all greedy) per (context ids, continuation ids), in order.

        Longest rows first so each batch pads little; rows over max_length keep their
        last max_length + 1 tokens."""
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        todo = [i for i, (_, cont) in enumerate(pairs) if cont]
        todo.sort(key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        keep = self.max_length + 1
        for start in tqdm(range(0, len(todo), self.batch_size), desc=desc, disable=len(todo) < 2):
            chunk = todo[start : start + self.batch_size]
            rows = [(pairs[i][0] + pairs[i][1])[-keep:] for i in chunk]
            conts = [pairs[i][1][-self.max_length :] for i in chunk]
            prefixes = [row[: len(row) - len(c)] for row, c in zip(rows, conts, strict=True)]
            logprobs, greedy = token_logprobs(self.model, prefixes, conts)
            for i, lp, g in zip(chunk, logprobs, greedy, strict=True):
                out[i] = (float(lp.double().sum()), bool(g.all()))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            if context == "":
                cont = self.tokenizer.encode(continuation)
                pairs.append(([self.eot], cont) if cont[:1] != [self.eot] else (cont[:1], cont[1:]))
            else:
                pairs.append(encode_pair(self.model, context, continuation))
        results = self._score(pairs, "loglikelihood")
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for n, request in enumerate(requests):
            (text,) = request.args[:1]
            ids = self.tokenizer.encode(text)
            for window in get_rolling_token_windows(ids, self.eot, self.max_length, 1):
                pairs.append(make_disjoint_window(window))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, self._score(pairs, "loglikelihood_rolling"), strict=True):
            totals[n] += lp
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation --------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from .generation import GenerationConfig, generate_tokens

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same options run as batches
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for members in groups.values():
            options, max_new = self._generation_options(requests[members[0]].args[1])
            config = GenerationConfig.from_options(**options)
            budget = self.max_length - max_new
            if budget < 1:
                raise GPT2LabError(
                    f"max_gen_toks ({max_new}) leaves no room for context in {self.max_length}"
                )
            members = sorted(members, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                rows = [
                    (self.tokenizer.encode(requests[i].args[0]) or [self.eot])[-budget:]
                    for i in chunk
                ]
                tokens, mask = left_pad(rows, self.eot)
                tokens = tokens.to(self.device)
                mask = None if bool(mask.all()) else mask.to(self.device)
                result = generate_tokens(self.model, tokens, mask, config)
                for i, text in zip(chunk, result.texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return [text or "" for text in out]

    def _generation_options(self, gen_kwargs: dict) -> tuple[dict[str, Any], int]:
        """lm-eval's gen_kwargs as gpt2lab generate() options, and max new tokens."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else [u for u in until if u]
        max_new = _positive_int("max_gen_toks", kwargs.pop("max_gen_toks", None), self.max_gen_toks)
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = kwargs.pop("temperature", None)
        options: dict[str, Any] = dict(max_new_tokens=max_new, stop=until or None)
        if do_sample and temperature != 0:
            options.update(do_sample=True, temperature=temperature)
            for key in ("top_k", "top_p", "min_p", "seed"):
                if kwargs.get(key) is not None:
                    options[key] = kwargs.pop(key)
        for key in ("top_k", "top_p", "min_p", "seed"):  # greedy: these change nothing
            kwargs.pop(key, None)
        for key in ("repetition_penalty", "no_repeat_ngram_size"):
            if key in kwargs:
                options[key] = kwargs.pop(key)
        if kwargs:
            raise GPT2LabError(f"unsupported generation option(s) for gpt2lab: {sorted(kwargs)}")
        return options, max_new


def _positive_int(name: str, value: Any, default: int) -> int:
    """An integer >= 1 given as an int or a string of digits (model_args arrive as text);
    None or "auto..." means `default`. A bool or a float such as 2.5 is an error."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not is_int(value) or value < 1:
        raise GPT2LabError(f"{name} must be a positive integer, got {show(value)}")
    return int(value)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with "gpt2lab" registered: `python -m gpt2lab.lm_eval_model ...`.

    What lm-eval's own `cli_evaluate` does (set up logging, parse, run), with two changes.
    A bad command line (argparse: usage text and exit code 2) comes out as one line
    "gpt2lab: error: ..." with exit code 2. Bad values (an unknown task, a bad
    --model_args: ValueError and friends from lm-eval's code) become a GPT2LabError
    (exit code 1 in `gpt2lab eval`); an exception raised in gpt2lab's code is left
    alone: that is a bug, not bad input."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    import gpt2lab.lm_eval_model  # noqa: F401  (registers the model under its real name)

    setup_logging()
    cli = HarnessCLI()
    args = _parse(cli, sys.argv[1:] if argv is None else list(argv))
    try:
        cli.execute(args)
    except (ValueError, TypeError, KeyError, NotImplementedError) as e:
        if isinstance(e, GPT2LabError) or not _raised_in_lm_eval(e):
            raise
        raise GPT2LabError(f"lm-eval: {type(e).__name__}: {e}") from e


class _ArgparseError(Exception):
    pass


def _parse(cli, argv: list[str]):
    """`cli.parse_args()` over `argv`, an argparse error raised as one line and exit 2.

    Only this call and only lm-eval's own parser objects are changed: each parser (the
    main one and every subcommand's) gets an `error` of its own, raising instead of
    printing the usage text, and sys.argv (which lm-eval's parse_args reads, and edits
    to insert its default "run" command) holds `argv` only while parsing. Nothing is
    patched on argparse itself, so other threads' parsers behave as always, and nothing
    is left changed while the evaluation runs."""

    def error(message: str):
        raise _ArgparseError(message)

    for parser in _parsers(cli._parser):
        parser.error = error
    saved = sys.argv
    sys.argv = [saved[0] if saved else "lm-eval", *argv]
    try:
        return cli.parse_args()
    except _ArgparseError as e:
        print(f"gpt2lab: error: {one_line(e)} (see 'gpt2lab eval --help')", file=sys.stderr)
        sys.exit(2)
    finally:
        sys.argv = saved


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """A parser and, recursively, its subcommands' parsers."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _raised_in_lm_eval(e: BaseException) -> bool:
    """Whether the innermost frame of the traceback is lm-eval's code."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__", "").startswith("lm_eval")


if __name__ == "__main__":
    main()
