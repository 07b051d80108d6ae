"""The server's settings: what `gpt2lab serve` takes on its command line.

One frozen dataclass, so that the app, the CLI and the tests agree on every limit and
its default; the limits exist so that one request cannot take the server down (a huge
prompt, a huge body, thousands of choices, a stream that never ends)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import GPT2LabError


@dataclass(frozen=True)
class ServeSettings:
    """Where to listen, who may call, and the limits each request is held to."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key: str | None = None  # requests must send `Authorization: Bearer KEY`
    model_name: str = "gpt2lab"  # the `model` requests must name
    max_batch: int = 8  # rows decoded together (the engine's batch)
    max_queue: int = 64  # rows waiting for a place in the batch; more: 429
    continuous: bool = True  # False: one request at a time
    max_prompt_tokens: int = 1024  # per prompt (also bounded by the model's context)
    max_tokens_cap: int = 512  # the largest max_tokens a request may ask for
    max_choices: int = 32  # prompts x n (x 2 with return_unsteered) per request
    max_body_bytes: int = 1_000_000  # request bodies larger than this: 413
    max_streams: int = 16  # concurrent streaming responses; more: 429
    request_timeout: float = 300.0  # seconds a request may take; then 503 (or an error event)
    body_timeout: float = 30.0  # seconds for a request's body to arrive; then 408
    steering_dir: str | None = None  # *.safetensors / *.gguf vectors, by file stem
    tuned_lens: str | None = None  # a tuned lens folder for /v1/interp

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_tokens_cap",
                     "max_choices", "max_body_bytes", "max_streams"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GPT2LabError(f"{name} must be a whole number >= 1, got {value!r}")
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise GPT2LabError(f"port must be in [0, 65535], got {self.port!r}")
        for name in ("request_timeout", "body_timeout"):
            timeout = getattr(self, name)
            if (
                not isinstance(timeout, (int, float))
                or isinstance(timeout, bool)
                or not timeout > 0
            ):
                raise GPT2LabError(f"{name} must be a number of seconds > 0, got {timeout!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise GPT2LabError("api_key must be a non-empty string (or None for no key)")

    def replace(self, **changes) -> ServeSettings:
        return dataclasses.replace(self, **changes)
