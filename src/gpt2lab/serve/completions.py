"""POST /v1/completions: a request becomes engine rows; their tokens become OpenAI choices.

`plan` checks everything before any work is queued (a bad option is a 400, not a
half-finished stream) and builds one GenerationConfig per request. Choice i (prompt
major: i = prompt_index * n + j) draws with seed + i, which is what
`model.generate(prompts each repeated n times, seed=seed)` gives row i, so a client
can reproduce any choice with the library. Without a seed the request draws one.

Echo logprobs of the prompt come from one forward pass over the prompt, the log-softmax
taken in float32 as `model.score` does (its numbers, plus each position's top tokens);
the first prompt token has nothing to be predicted from, so its entry is null.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import torch

from ..errors import GPT2LabError, one_line
from ..generation.config import SEED_LIMIT, GenerationConfig
from ..steering.apply import steered
from . import openai_format as fmt
from .schemas import CompletionRequest
from .vectors import build_steering

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's: an unset temperature samples
GONE_POLL = 0.25  # seconds between checks that a non-streaming client is still there


@dataclass
class Plan:
    """A checked completion request, ready to run."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    n: int
    max_tokens: int
    config: GenerationConfig
    seed: int
    top_n: int | None  # logprobs=N (None: no logprobs)
    echo: bool
    steer: list[Any] | None
    unsteered: bool
    stream: bool
    include_usage: bool
    model_name: str
    cid: str = field(default_factory=fmt.completion_id)

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def row_config(self, i: int) -> GenerationConfig:
        return self.config.replace(seed=(self.seed + i) % SEED_LIMIT)


def plan(model: Any, settings: Any, body: CompletionRequest, vectors: dict) -> Plan:
    """Check a request against the model and the server's limits (ApiError / GPT2LabError)."""
    if body.model != settings.model_name:
        raise fmt.ApiError(
            404,
            f"the model {body.model!r} does not exist here; this server serves "
            f"{settings.model_name!r}",
            param="model",
            code="model_not_found",
        )
    if body.suffix is not None:
        raise fmt.ApiError(400, "suffix is not supported by gpt2lab", param="suffix",
                           code="unsupported_parameter")  # fmt: skip
    if body.best_of not in (None, 1):
        raise fmt.ApiError(400, "best_of > 1 is not supported by gpt2lab; use n",
                           param="best_of", code="unsupported_parameter")  # fmt: skip
    echo = bool(body.echo)
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not echo:
        raise fmt.ApiError(400, "max_tokens=0 needs echo=true (scoring the prompt)",
                           param="max_tokens")  # fmt: skip
    if max_tokens > settings.max_tokens_cap:
        raise fmt.ApiError(
            400, f"max_tokens={max_tokens} is over this server's cap of {settings.max_tokens_cap}",
            param="max_tokens",
        )  # fmt: skip
    prompts, texts = _prompts(model, settings, body.prompt)
    n = 1 if body.n is None else body.n
    steer = build_steering(body.steering, vectors, model)
    unsteered = bool(body.return_unsteered)
    if unsteered and steer is None:
        raise fmt.ApiError(400, "return_unsteered needs steering", param="return_unsteered")
    stream = bool(body.stream)
    if unsteered and stream:
        raise fmt.ApiError(
            400, "return_unsteered is not supported with stream; send two requests with the "
            "same seed", param="return_unsteered",
        )  # fmt: skip
    rows = len(prompts) * n * (2 if unsteered else 1)
    if rows > settings.max_choices:
        raise fmt.ApiError(
            400, f"{rows} choices (prompts x n{' x 2' if unsteered else ''}) is over this "
            f"server's limit of {settings.max_choices}", param="n",
        )  # fmt: skip
    if body.stream_options is not None and not stream:
        raise fmt.ApiError(400, "stream_options needs stream=true", param="stream_options")
    config = GenerationConfig.from_options(**_options(body, max(max_tokens, 1)))
    longest = max(len(p) for p in prompts)
    if longest + max_tokens > model.cfg.n_ctx:
        raise fmt.ApiError(
            400, f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the model's "
            f"context of {model.cfg.n_ctx}", param="max_tokens", code="context_length_exceeded",
        )  # fmt: skip
    config.check(model, longest if max_tokens else 0)
    seed = body.seed if body.seed is not None else secrets.randbits(63)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Plan(prompts, texts, n, max_tokens, config, seed, body.logprobs, echo, steer,
                unsteered, stream, include_usage, settings.model_name)  # fmt: skip


def _prompts(model: Any, settings: Any, prompt: Any) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt. Text is tokenized as model.generate does (no BOS
    unless the model's default_prepend_bos; "" is <|endoftext|>, as OpenAI and generate
    take it)."""
    from ..inputs import encode

    tok = model.tokenizer
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    vocab = model.cfg.d_vocab
    limit = min(settings.max_prompt_tokens, model.cfg.n_ctx)
    ids_out, texts = [], []
    for i, item in enumerate(items):
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:  # JSON's "\ud800": no response could carry it back
                raise fmt.ApiError(400, f"prompt {i} is not valid Unicode (a lone surrogate)",
                                   param="prompt") from None  # fmt: skip
            ids = encode(tok, item, prepend_bos=bool(getattr(model, "default_prepend_bos", False)))
            text = item
        else:
            if not item:
                raise fmt.ApiError(400, f"prompt {i} has no token ids", param="prompt")
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise fmt.ApiError(
                    400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})",
                    param="prompt",
                )  # fmt: skip
            ids, text = item, tok.decode(item)
        if len(ids) > limit:
            raise fmt.ApiError(
                400, f"prompt {i} has {len(ids)} tokens, over this server's limit of {limit}",
                param="prompt", code="context_length_exceeded",
            )  # fmt: skip
        ids_out.append(ids)
        texts.append(text)
    return ids_out, texts


def _options(body: CompletionRequest, max_new_tokens: int) -> dict[str, Any]:
    """The request's decoding options under model.generate's names."""
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    opts: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": body.top_p,
        "stop": body.stop or None,
        "logit_bias": _logit_bias(body.logit_bias),
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "typical_p": body.typical_p,
        "epsilon_cutoff": body.epsilon_cutoff,
        "eta_cutoff": body.eta_cutoff,
        "repetition_penalty": body.repetition_penalty,
        "no_repeat_ngram_size": body.no_repeat_ngram_size or None,
        "min_new_tokens": body.min_tokens or None,
        "stop_token_ids": body.stop_token_ids or None,
        "bad_words": body.bad_words or None,
    }
    if body.ignore_eos:
        opts["stop_at_eot"] = False
    return {k: v for k, v in opts.items() if v is not None}


def _logit_bias(value: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias keys are token ids written in decimal ASCII digits."""
    if value is None:
        return None
    out = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit()):
            raise fmt.ApiError(400, f"logit_bias keys must be token ids (decimal digits), got "
                               f"{key[:20]!r}", param="logit_bias")  # fmt: skip
        out[int(key)] = bias
    return out


# ---- running --------------------------------------------------------------------------
@dataclass
class RowResult:
    """One row's outcome, as the engine reported it."""

    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]
    text: str
    finish_reason: str


def rows(plan: Plan) -> list[Any]:
    """Engine rows: every choice (prompt major), then the unsteered twins."""
    from .engine import Row

    out = []
    for pass_steer in [plan.steer, None] if plan.unsteered else [plan.steer]:
        for i in range(plan.choices):
            out.append(
                Row(
                    tokens=list(plan.prompts[i // plan.n]),
                    config=plan.row_config(i),
                    top_logprobs=plan.top_n or 0,
                    steer=pass_steer,
                )
            )
    return out


def submit(engine: Any, plan: Plan) -> Any:
    """Queue the rows; a full queue is a 429 the client may retry."""
    from .engine import QueueFull

    try:
        return engine.submit(rows(plan))
    except QueueFull as e:
        raise fmt.ApiError(
            429, f"the server is busy ({one_line(e) or 'queue full'}); retry later",
            type="rate_limit_error", code="queue_full",
        ) from None  # fmt: skip


async def next_event(events: Any) -> Any:
    """The job's next event (None at the end), waited for in a worker thread; a cancelled
    wait (timeout, client gone) abandons the thread, which the job's cancel releases."""
    return await anyio.to_thread.run_sync(next, events, None, abandon_on_cancel=True)


async def run(engine: Any, plan: Plan, deadline: float, gone: Any = None) -> list[RowResult]:
    """Every row to its end (non-streaming): the engine's final results. `gone` (an async
    callable: has the client left?) is asked every GONE_POLL seconds meanwhile; a client
    that left cancels the job, whose rows would otherwise decode to max_tokens for nobody."""
    job = submit(engine, plan)
    try:
        with anyio.fail_after(max(deadline - time.monotonic(), 0.001)):
            while not await anyio.to_thread.run_sync(job.wait, GONE_POLL,
                                                     abandon_on_cancel=True):  # fmt: skip
                if gone is not None and await gone():
                    raise fmt.ApiError(499, "the client closed the connection",
                                       code="client_closed")  # fmt: skip
        finished = job.results(0)  # the job's error, if it failed, is raised here
    except TimeoutError:
        job.cancel()
        raise timeout_error(plan) from None
    except BaseException:
        job.cancel()
        raise
    return [
        RowResult(
            list(r.tokens),
            list(r.logprobs),
            list(getattr(r, "top", None) or []),
            r.text,
            _reason(r.finish_reason),
        )  # fmt: skip
        for r in finished
    ]


def _stream_error(e: Exception) -> dict[str, Any]:
    """An error that ends a stream already under way, as OpenAI's error object."""
    from .engine import EngineClosed

    if isinstance(e, EngineClosed):
        return fmt.error_body(one_line(e), "server_error", code="shutting_down")
    if isinstance(e, GPT2LabError):
        return fmt.error_body(one_line(e))
    return fmt.error_body(f"internal error ({type(e).__name__}); this is a bug in gpt2lab",
                          "server_error")  # fmt: skip


def timeout_error(plan: Plan) -> fmt.ApiError:
    return fmt.ApiError(503, "the request took longer than this server's request timeout",
                        type="server_error", code="timeout")  # fmt: skip


def _reason(reason: str | None) -> str:
    return "stop" if reason == "stop" else "length"


@torch.inference_mode()
def prompt_logprobs(
    model: Any, ids: list[int], top_n: int, steer: Any
) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """Each prompt token's log-prob given the ones before it (None for the first), and the
    top_n tokens at each position, from one forward pass (log-softmax in float32, as
    model.score takes it)."""
    with steered(model, steer):
        logits = model(torch.tensor([ids], device=model.device))[0, :-1]
    logp = logits.float().log_softmax(-1)
    target = torch.tensor(ids[1:], device=logp.device)
    lps: list[float | None] = [None, *logp.gather(1, target[:, None])[:, 0].tolist()]
    tops: list[list[tuple[int, float]] | None] = [None]
    if top_n:
        values, index = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
        tops += [list(zip(i, v, strict=True)) for i, v in zip(index.tolist(), values.tolist(),
                                                               strict=True)]  # fmt: skip
    else:
        tops += [[] for _ in ids[1:]]
    return lps, tops


async def echo_logprobs(model: Any, plan: Plan, steer: Any) -> list[tuple[list, list]]:
    """prompt_logprobs of every prompt (in a worker thread: a forward pass)."""
    out = []
    for ids in plan.prompts:
        out.append(await anyio.to_thread.run_sync(prompt_logprobs, model, ids, plan.top_n, steer))
    return out


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: a -inf log-prob (a token banned by logit_bias or a
    filter) is sent as the most negative float, as OpenAI's servers do with -9999."""
    if value is None or math.isfinite(value):
        return value
    return -9999.0 if value < 0 else 9999.0


def _logprobs_object(model: Any, plan: Plan, p: int, echo: tuple | None,
                     result: RowResult | None) -> fmt.Logprobs:  # fmt: skip
    base = 0 if plan.echo else len(plan.prompt_texts[p])
    lp = fmt.Logprobs(model.tokenizer, plan.top_n or 0, base)
    if echo is not None:
        for t, v, top in zip(plan.prompts[p], *echo, strict=True):
            lp.add(t, _finite(v), _tops(top, plan))
    if result is not None:
        for k, (t, v) in enumerate(zip(result.tokens, result.logprobs, strict=True)):
            top = result.top[k] if k < len(result.top) else []
            lp.add(t, _finite(v), _tops(top, plan))
    return lp


def _tops(top: list | None, plan: Plan) -> list | None:
    if top is None:
        return None
    return [(t, _finite(v)) for t, v in top] if plan.top_n else []


async def complete(model: Any, engine: Any, plan: Plan, deadline: float,
                   gone: Any = None) -> dict[str, Any]:  # fmt: skip
    """A whole (non-streaming) completion response (`gone`: see `run`)."""
    want_echo_lp = plan.echo and plan.top_n is not None
    echoes = await echo_logprobs(model, plan, plan.steer) if want_echo_lp else None
    plain = (await echo_logprobs(model, plan, None)
             if want_echo_lp and plan.unsteered else None)  # fmt: skip
    if plan.max_tokens:
        results = await run(engine, plan, deadline, gone)
    else:
        empty = RowResult([], [], [], "", "length")
        results = [empty] * (plan.choices * (2 if plan.unsteered else 1))
    choices = []
    for i in range(plan.choices):
        p = i // plan.n
        choices.append(_choice(model, plan, i, p, results[i], echoes))
        if plan.unsteered:
            twin = _choice(model, plan, i, p, results[plan.choices + i], plain)
            choices[-1]["unsteered"] = {k: twin[k] for k in ("text", "logprobs", "finish_reason")}
    completion = sum(len(r.tokens) for r in results)
    return fmt.completion(plan.cid, plan.model_name, choices,
                          fmt.usage(sum(len(p) for p in plan.prompts), completion))  # fmt: skip


def _choice(model, plan: Plan, i: int, p: int, result: RowResult, echoes) -> dict[str, Any]:
    text = (plan.prompt_texts[p] if plan.echo else "") + result.text
    logprobs = None
    if plan.top_n is not None:
        echo = echoes[p] if echoes is not None else None
        logprobs = _logprobs_object(model, plan, p, echo, result).to_dict()
    return fmt.choice(i, text, result.finish_reason, logprobs)


async def stream(model: Any, engine: Any, plan: Plan, deadline: float,
                 on_tokens: Any = None) -> AsyncIterator[bytes]:  # fmt: skip
    """Server-sent events: echo chunks first, then one chunk per generated token (its
    newly final text; a stop string's text is never sent), a usage chunk when asked, and
    `data: [DONE]`. A timeout ends the stream with an error event."""
    cid, name = plan.cid, plan.model_name
    lps: list[fmt.Logprobs | None] = [None] * plan.choices
    if plan.echo:
        echoes = await echo_logprobs(model, plan, plan.steer) if plan.top_n is not None else None
        for i in range(plan.choices):
            p = i // plan.n
            logprobs = None
            if plan.top_n is not None:
                lps[i] = _logprobs_object(model, plan, p, echoes[p], None)
                logprobs = lps[i].to_dict()
            reason = None if plan.max_tokens else "length"
            yield fmt.sse(fmt.completion(cid, name, [fmt.choice(
                i, plan.prompt_texts[p], reason, logprobs)], None))  # fmt: skip
    generated = 0
    if plan.max_tokens:
        job = submit(engine, plan)
        done = False
        try:
            with anyio.fail_after(max(deadline - time.monotonic(), 0.001)):
                events = job.events()
                while (ev := await next_event(events)) is not None:
                    i = ev.row
                    logprobs = None
                    token = getattr(ev, "token", None)
                    if token is not None:
                        generated += 1
                    if plan.top_n is not None:
                        if lps[i] is None:
                            lps[i] = _logprobs_object(model, plan, i // plan.n, None, None)
                        start = len(lps[i].tokens)
                        if token is not None:
                            lps[i].add(token, _finite(ev.logprob), _tops(ev.top, plan))
                        logprobs = lps[i].to_dict(start)
                    reason = None if ev.finish_reason is None else _reason(ev.finish_reason)
                    if ev.text or token is not None or reason is not None:
                        yield fmt.sse(fmt.completion(cid, name, [
                            fmt.choice(i, ev.text or "", reason, logprobs)], None))  # fmt: skip
            done = True
        except TimeoutError:
            yield fmt.sse(timeout_error(plan).body())
            yield fmt.DONE
            return
        except Exception as e:  # noqa: BLE001 - the headers are sent: an error event, not a 500
            yield fmt.sse(_stream_error(e))
            yield fmt.DONE
            return
        finally:
            if not done:
                job.cancel()
            if on_tokens is not None:
                on_tokens(generated)
    if plan.include_usage:
        use = fmt.usage(sum(len(p) for p in plan.prompts), generated)
        yield fmt.sse(fmt.completion(cid, name, [], use))
    yield fmt.DONE
