"""OpenAI's response shapes: error bodies, completion choices, logprobs, usage, SSE chunks.

Kept apart from the request handling so that the wire format, which clients parse
(the openai SDK, lm-evaluation-harness' `local-completions`), is written in one place.
lm-eval reads `choices[i].logprobs.token_logprobs[ctxlen:-1]` and compares each with
`max(top_logprobs[j].values())` to decide greediness, so prompt positions and the
generated ones share one list, the first prompt token's entry is null, and every
top_logprobs dict holds the most likely tokens of its position (and, as OpenAI's, the
chosen token: up to N + 1 entries).
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from typing import Any


class ApiError(Exception):
    """An error answered with an HTTP status and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002  (OpenAI's field name)
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code,
        )  # fmt: skip

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str,
    type: str = "invalid_request_error",  # noqa: A002
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def token_string(tokenizer: Any, token: int) -> str:
    """A token as OpenAI shows it: its text, or `bytes:\\xe2\\x80` when its bytes are not
    whole UTF-8 characters (two such tokens would otherwise both read U+FFFD and collide
    as keys of a top_logprobs dict)."""
    data = tokenizer.token_bytes(token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class Logprobs:
    """One choice's `logprobs` object, built token by token.

    `text_offset` is the character offset of each token in the choice's text (with echo)
    or, without echo, counted from the end of the prompt text, as OpenAI counts it."""

    def __init__(self, tokenizer: Any, top_n: int, base_offset: int = 0):
        self.tokenizer, self.top_n = tokenizer, top_n
        self.chars = base_offset
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        self.tokens.append(token_string(self.tokenizer, token))
        self.token_logprobs.append(None if logprob is None else float(logprob))
        if top is None:
            self.top_logprobs.append(None)
        else:
            entry: dict[str, float] = {}
            for t, lp in top[: self.top_n]:
                entry.setdefault(token_string(self.tokenizer, int(t)), float(lp))
            if logprob is not None:  # as OpenAI: the chosen token is always there too, so
                # a dict holds up to N + 1 entries (one with logprobs=0)
                entry.setdefault(self.tokens[-1], float(logprob))
            self.top_logprobs.append(entry)
        self.text_offset.append(self.chars)
        self.chars += len(self._utf8.decode(self.tokenizer.token_bytes(token)))

    def to_dict(self, start: int = 0) -> dict[str, Any]:
        """The object, or only the entries added since index `start` (a stream chunk)."""
        return {
            "tokens": self.tokens[start:],
            "token_logprobs": self.token_logprobs[start:],
            "top_logprobs": self.top_logprobs[start:],
            "text_offset": self.text_offset[start:],
        }


def completion_id() -> str:
    return "cmpl-" + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def choice(
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: dict[str, Any] | None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        **extra,
    }


def completion(
    cid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int] | None
) -> dict[str, Any]:
    """A whole completion response (or one stream chunk, with `use` None)."""
    body = {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if use is not None:
        body["usage"] = use
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: {...}\\n\\n` (or `data: [DONE]\\n\\n`)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


DONE = sse("[DONE]")
