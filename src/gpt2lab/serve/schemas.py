"""Request bodies of the HTTP API as pydantic models (they are also the OpenAPI schema).

Every model forbids unknown fields and is strict (a string is not a number, 1 is not
true, NaN is not a temperature), because an OpenAI-compatible server that silently
ignores or coerces what it does not understand makes a client believe it got what it
asked for. The completion body is OpenAI's legacy completions schema plus gpt2lab's
decoder options (named as vLLM names them where vLLM has them) and `steering`.
Parameters OpenAI has and gpt2lab does not (suffix, best_of > 1) are declared so that
the app can refuse them by name.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

Prompt = Union[str, list[str], list[int], list[list[int]]]


def check_prompt(value: object) -> object:
    """A one-line message for a prompt of the wrong shape (pydantic's union error lists
    every alternative)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return value
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        if all(
            isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
            for v in value
        ):
            return value
    if isinstance(value, list) and not value:
        raise ValueError("prompt is an empty list: give text or at least one token id")
    raise ValueError(
        "prompt must be a string, a list of strings, a list of token ids or a list of lists "
        "of token ids"
    )


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = None


class SteeringSpec(BaseModel):
    """One steering vector: by `name` (a file of the server's --steering-dir) or inline
    `values` at `hook`; with how to apply it (see gpt2lab.steering)."""

    model_config = STRICT
    name: str | None = Field(None, description="a vector loaded from --steering-dir (file stem)")
    hook: str | None = Field(
        None, description="hook point for inline values; restricts a named vector to one hook"
    )
    values: Union[list[float], list[list[float]], None] = Field(
        None, description="inline direction [d_model] (or [n, d_model] for ActAdd)"
    )
    coefficient: float = 1.0
    operator: Literal["add", "ablate", "ablate_add", "cap"] = "add"
    positions: Union[str, int] = Field(
        "all", description="all, prompt, generated, from=k, or k (from position k)"
    )
    preserve_norm: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions."""

    model_config = STRICT
    model: str
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo (scoring)")
    temperature: float | None = Field(None, ge=0, description="default 1 (OpenAI's); 0 greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(1, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    stop: Union[str, list[str], None] = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    user: str | None = None
    # OpenAI's, not implemented: refused by name unless at their no-op values
    suffix: str | None = None
    best_of: int | None = None
    # gpt2lab's decoder options (vLLM's names where vLLM has them)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    epsilon_cutoff: float | None = Field(None, ge=0, lt=1)
    eta_cutoff: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    min_tokens: int | None = Field(None, ge=0, description="no end-of-text before this many")
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = Field(None, description="true: do not stop at <|endoftext|>")
    bad_words: list[str] | None = None
    steering: Union[SteeringSpec, list[SteeringSpec], None] = None
    return_unsteered: bool | None = Field(
        False, description="with steering: each choice also carries the unsteered continuation"
    )

    _prompt = field_validator("prompt", mode="before")(check_prompt)


class TokenizeRequest(BaseModel):
    """POST /v1/tokenize."""

    model_config = STRICT
    prompt: str
    model: str | None = None
    return_token_strs: bool | None = False
    # vLLM's flag (what lm-eval's remote tokenizer sends): GPT-2 adds no BOS/EOS, so it
    # changes nothing; "<|endoftext|>" in the text is always the special token here.
    add_special_tokens: bool | None = None


class DetokenizeRequest(BaseModel):
    """POST /v1/detokenize."""

    model_config = STRICT
    tokens: list[int]
    model: str | None = None
