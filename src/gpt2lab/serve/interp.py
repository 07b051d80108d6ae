"""Inspection routes of the server (/v1/interp/...): what the explorer page draws.

Each route is a thin JSON wrapper around a public gpt2lab.interp function (the logit and
tuned lens, run_with_cache's attention pattern, neuron value read-outs, activation
patching), so the page shows exactly what the library computes. Every request body is a
typed model with unknown fields refused; anything wrong (a bad type, a layer out of range,
a prompt over the limit, a library GPT2LabError) is a 400 with an OpenAI-style error body,
never a 422 or a 500, so a client sees one error shape across the whole server. No route
takes a path: the tuned lens and steering vectors are whatever the app loaded at start-up
(`app.state.tuned_lens`, `app.state.steering`).

Payloads stay bounded for prompts up to n_ctx: the lens grid carries at most MAX_LENS_K
tokens per cell, ids with one shared id -> text table, probabilities rounded to 1e-6;
attention is sent as the causal lower triangle, and all heads at once only while that fits
MAX_ATTENTION_VALUES; patching (one forward pass per patch) takes at most
MAX_PATCH_TOKENS tokens.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from ..errors import GPT2LabError, one_line
from ..interp.lens import logit_lens, prompt_tokens
from ..interp.patching import ALIASES, SITES, patch_prompts
from ..interp.vocab_space import value_tokens
from ..steering import actadd
from ..validate import show

MAX_LENS_K = 10  # tokens per lens cell
MAX_TOP_K = 100  # next-token and neuron lists
MAX_VOCAB_K = 20  # promoted / suppressed tokens per neuron
MAX_ATTENTION_VALUES = 1 << 20  # attention weights in one response (~8 MB of JSON)
MAX_PATCH_TOKENS = 64  # patching runs n_layers x n_tokens forward passes
PATCH_BATCH = 8  # patches sharing one forward pass
DIGITS = 6  # probabilities and weights are rounded to 1e-6


# ---- errors --------------------------------------------------------------------------
class BadRequest(Exception):
    """A request the route refuses: becomes a 400 with an OpenAI-style body."""

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, status: int = 400
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_response(
    message: str, param: str | None = None, code: str | None = None, status: int = 400
) -> Response:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}; 400s are
    invalid_request_error, a 503 (no model yet) server_error."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status)


# what a field of several types wants, for errors about it
EXPECTED = {
    "prompt": "text or a list of token ids",
    "answer": "a one-token text or a token id",
    "wrong": "a one-token text or a token id",
}


def _validation_error(e: RequestValidationError) -> Response:
    """The first problem pydantic found, as one line naming the field."""
    errors = e.errors()
    if not errors:
        return error_response("the request body is not valid")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return error_response("the request body is not valid JSON", code="invalid_json")
    if first.get("type") == "missing" and not loc:
        return error_response("the request needs a JSON object body")
    if not loc and first.get("type") in ("model_attributes_type", "model_type", "dict_type"):
        return error_response("the request body must be a JSON object")
    param = loc[0] if loc else None
    message = first.get("msg", "invalid value")
    same_field = [
        err for err in errors if [str(p) for p in err.get("loc", ()) if p != "body"][:1] == loc[:1]
    ]
    if first.get("type") == "extra_forbidden":
        message = f"unknown parameter {param!r}"
    elif param in EXPECTED and len(same_field) > 1:  # a union: no single member's message fits
        message = f"{param} must be {EXPECTED[param]}, got {show(first.get('input'))}"
    elif param:
        message = f"{'.'.join(loc)}: {message}"
    return error_response(one_line(message, 300), param=param)


ERROR_BODY = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "invalid request",
        "content": {"application/json": {"schema": ERROR_BODY}},
    },
    503: {
        "description": "model still loading",
        "content": {"application/json": {"schema": ERROR_BODY}},
    },
}


class InterpRoute(APIRoute):
    """Turns validation errors, BadRequest and GPT2LabError into 400s with OpenAI's body,
    for these routes only (the app may handle the rest of the server its own way)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as e:
                return _validation_error(e)
            except BadRequest as e:
                return error_response(e.message, e.param, e.code, e.status)
            except GPT2LabError as e:
                return error_response(one_line(e, 300))

        return route


# ---- request bodies ------------------------------------------------------------------
Prompt = Annotated[StrictStr | list[StrictInt], Field(description="text or token ids")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptBody(_Body):
    prompt: Prompt
    prepend_bos: StrictBool = False


class TopKBody(PromptBody):
    k: StrictInt = Field(10, ge=1, le=MAX_TOP_K)


class LensBody(PromptBody):
    k: StrictInt = Field(5, ge=1, le=MAX_LENS_K)
    lens: Literal["logit", "tuned"] = "logit"


class AttentionBody(PromptBody):
    layer: StrictInt
    head: StrictInt | None = None


class NeuronBody(PromptBody):
    position: StrictInt = Field(-1, description="token position; negative counts from the end")
    layer: StrictInt | None = Field(None, description="one layer, or every layer when omitted")
    k: StrictInt = Field(10, ge=1, le=MAX_TOP_K)
    vocab_k: StrictInt = Field(5, ge=1, le=MAX_VOCAB_K)


class SteeringBody(_Body):
    positive: StrictStr
    negative: StrictStr
    hook: StrictStr | None = Field(None, description="default: the middle layer's resid_pre")


class PatchBody(_Body):
    clean: StrictStr
    corrupted: StrictStr
    answer: StrictStr | StrictInt
    wrong: StrictStr | StrictInt
    what: StrictStr = "resid_pre"


# ---- helpers -------------------------------------------------------------------------
def _model(request: Request) -> Any:
    model = getattr(request.app.state, "model", None)
    if model is None:
        raise BadRequest(
            "the model is still loading; try again shortly", None, "model_not_ready", 503
        )
    return model


def prompt_limit(request: Request, model: Any) -> int:
    """The most tokens a prompt may have: the server's max_prompt_tokens, at most n_ctx."""
    settings = getattr(request.app.state, "settings", None)
    limit = getattr(settings, "max_prompt_tokens", None)
    n_ctx = model.cfg.n_ctx
    return n_ctx if not isinstance(limit, int) or limit <= 0 else min(limit, n_ctx)


def tokens_of(request: Request, model: Any, prompt: Any, prepend_bos: bool, *,
              limit: int | None = None, param: str = "prompt") -> torch.Tensor:  # fmt: skip
    """The prompt as [pos] ids (lens.prompt_tokens: the tokenization every lens uses),
    checked against the prompt limit."""
    limit = prompt_limit(request, model) if limit is None else limit
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"{param} is not valid Unicode (a lone surrogate)", param) from None
    else:
        vocab = model.cfg.d_vocab
        bad = next((i for i in prompt if not 0 <= i < vocab), None)
        if bad is not None:
            raise BadRequest(f"token id {bad} in {param} is outside [0, {vocab})", param)
    try:
        ids = prompt_tokens(model, prompt, prepend_bos)
    except GPT2LabError as e:
        raise BadRequest(one_line(e, 300), param) from None
    if ids.numel() > limit:
        raise BadRequest(
            f"{param} has {ids.numel()} tokens, more than this route's limit of {limit}",
            param,
            "context_length_exceeded",
        )
    return ids


def token_table(model: Any, ids: list[int]) -> tuple[str, list[dict[str, Any]]]:
    """The decoded text and, per token, its id, text and [start, end) offsets in that text
    (Python string indices, i.e. code points). A token that ends inside a multi-byte
    character ends where that character starts; the next token starts there too."""
    tok = model.tokenizer
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces, rows, offset = [], [], 0
    for i in ids:
        piece = decoder.decode(tok.token_bytes(i))
        pieces.append(piece)
        rows.append({"id": i, "text": tok.id_to_str(i), "start": offset})
        offset += len(piece)
    pieces.append(decoder.decode(b"", final=True))
    offset += len(pieces[-1])
    for n, row in enumerate(rows):
        row["end"] = rows[n + 1]["start"] if n + 1 < len(rows) else offset
    return "".join(pieces), rows


def rounded(t: torch.Tensor) -> list:
    """A tensor as nested lists rounded to DIGITS decimals (short JSON), NaN as None."""
    scale = 10.0**DIGITS
    values = (t.double() * scale).round() / scale
    out = values.tolist()
    if bool(torch.isnan(values).any()):
        return _nan_to_none(out)
    return out


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _check_layer(model: Any, layer: int, param: str = "layer") -> int:
    n = model.cfg.n_layers
    if not 0 <= layer < n:
        raise BadRequest(f"{param} must be in [0, {n - 1}], got {layer}", param)
    return layer


# ---- the routes ----------------------------------------------------------------------
def info(request: Request) -> dict[str, Any]:
    """What the page needs to build its controls: the model's shape, the limits, whether
    a tuned lens is loaded, the named steering vectors and the patching sites."""
    model = _model(request)
    cfg = model.cfg
    steering = getattr(request.app.state, "steering", None) or {}
    return {
        "model": {
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
            "d_model": cfg.d_model,
            "d_mlp": cfg.d_mlp,
            "n_ctx": cfg.n_ctx,
            "d_vocab": cfg.d_vocab,
        },  # fmt: skip
        "max_prompt_tokens": prompt_limit(request, model),
        "tuned_lens": getattr(request.app.state, "tuned_lens", None) is not None,
        "steering": [
            {"name": name, "hooks": list(getattr(v, "hooks", []))}
            for name, v in sorted(steering.items())
        ],
        "patch_sites": [*SITES, *ALIASES],
        "limits": {
            "lens_k": MAX_LENS_K,
            "top_k": MAX_TOP_K,
            "vocab_k": MAX_VOCAB_K,
            "attention_values": MAX_ATTENTION_VALUES,
            "patch_tokens": MAX_PATCH_TOKENS,
        },  # fmt: skip
    }


def tokens(body: PromptBody, request: Request) -> dict[str, Any]:
    """The prompt's tokens: ids, texts and character offsets into the decoded text."""
    model = _model(request)
    ids = tokens_of(request, model, body.prompt, body.prepend_bos).tolist()
    text, rows = token_table(model, ids)
    return {"text": text, "n_tokens": len(ids), "tokens": rows}


def next_token(body: TopKBody, request: Request) -> dict[str, Any]:
    """The model's distribution over the token after the prompt: the top k."""
    model = _model(request)
    ids = tokens_of(request, model, body.prompt, body.prepend_bos)
    with torch.no_grad():
        logits = model(ids[None])[0, -1].float()
    logp = logits.log_softmax(-1)
    top_logp, top_ids = logp.topk(min(body.k, logp.numel()))
    _, rows = token_table(model, ids.tolist())
    tok = model.tokenizer
    return {
        "tokens": rows,
        "top": [
            {
                "id": i,
                "text": tok.id_to_str(i),
                "prob": round(math.exp(lp), DIGITS),
                "logprob": round(lp, DIGITS),
            }
            for i, lp in zip(top_ids.tolist(), top_logp.tolist(), strict=True)
        ],  # fmt: skip
    }


def lens(body: LensBody, request: Request) -> dict[str, Any]:
    """The logit lens (or the loaded tuned lens): rows (embeddings, then each block's
    output) x positions, each cell the top-k ids and probabilities; `strings` maps every
    id shown to its text; `entropy` is each cell's entropy in nats."""
    model = _model(request)
    ids = tokens_of(request, model, body.prompt, body.prepend_bos)
    if body.lens == "tuned":
        tuned = getattr(request.app.state, "tuned_lens", None)
        if tuned is None:
            raise BadRequest(
                "no tuned lens is loaded: start the server with a tuned lens to use lens "
                "'tuned', or ask for lens 'logit'",
                "lens",
            )
        result = tuned.apply(ids, k=body.k)
    else:
        result = logit_lens(model, ids, k=body.k)
    _, rows = token_table(model, ids.tolist())
    tok = model.tokenizer
    strings = {str(i): tok.id_to_str(i) for i in result.top_ids.unique().tolist()}
    return {
        "lens": result.lens,
        "rows": result.labels,
        "k": result.k,
        "tokens": rows,
        "top_ids": result.top_ids.tolist(),
        "top_probs": rounded(result.top_probs),
        "entropy": rounded(result.entropy),
        "strings": strings,
    }


def attention(body: AttentionBody, request: Request) -> dict[str, Any]:
    """The attention pattern of one layer (one head, or all heads while the answer stays
    under MAX_ATTENTION_VALUES): pattern[h][q] lists the weights of query position q over
    key positions 0..q (the causal lower triangle; the rest is zero)."""
    model = _model(request)
    cfg = model.cfg
    layer = _check_layer(model, body.layer)
    if body.head is not None and not 0 <= body.head < cfg.n_heads:
        raise BadRequest(f"head must be in [0, {cfg.n_heads - 1}], got {body.head}", "head")
    ids = tokens_of(request, model, body.prompt, body.prepend_bos)
    heads = list(range(cfg.n_heads)) if body.head is None else [body.head]
    n = ids.numel()
    if len(heads) * n * (n + 1) // 2 > MAX_ATTENTION_VALUES:
        raise BadRequest(
            f"all {cfg.n_heads} heads over {n} tokens is too many attention weights for one "
            "response: ask for one head at a time",
            "head",
        )
    name = f"blocks.{layer}.attn.hook_pattern"
    with torch.no_grad():
        _, cache = model.run_with_cache(ids[None], names_filter=name, stop_at_layer=layer + 1)
    pattern = cache[name][0, heads].float().cpu()  # [heads, q, k]
    full = rounded(pattern)
    _, rows = token_table(model, ids.tolist())
    return {
        "layer": layer,
        "heads": heads,
        "tokens": rows,
        "pattern": [[row[: q + 1] for q, row in enumerate(head)] for head in full],
    }


def neurons(body: NeuronBody, request: Request) -> dict[str, Any]:
    """The MLP neurons most active (mlp.hook_post) at one position, over one layer or all,
    each with the tokens its output weight promotes and suppresses (value_tokens:
    W_out[layer][neuron] @ W_U; a negative activation swaps the two lists' roles)."""
    model = _model(request)
    cfg = model.cfg
    ids = tokens_of(request, model, body.prompt, body.prepend_bos)
    n = ids.numel()
    if not -n <= body.position < n:
        raise BadRequest(
            f"position must be in [{-n}, {n - 1}] for this {n}-token prompt, got {body.position}",
            "position",
        )
    position = body.position % n
    layers = list(range(cfg.n_layers)) if body.layer is None else [_check_layer(model, body.layer)]
    names = [f"blocks.{layer}.mlp.hook_post" for layer in layers]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids[None], names_filter=names, stop_at_layer=layers[-1] + 1)
    acts = torch.stack([cache[name][0, position].float().cpu() for name in names])  # [L, d_mlp]
    values, flat = acts.reshape(-1).topk(min(body.k, acts.numel()))
    found = []
    for value, index in zip(values.tolist(), flat.tolist(), strict=True):
        layer, neuron = layers[index // cfg.d_mlp], index % cfg.d_mlp
        view = value_tokens(model, layer, neuron, k=body.vocab_k)

        def scores(items: list) -> list[dict[str, Any]]:
            return [{"id": s.id, "text": s.token, "score": round(s.score, DIGITS)} for s in items]

        found.append({
            "layer": layer, "neuron": neuron, "activation": round(value, DIGITS),
            "promotes": scores(view.top), "suppresses": scores(view.bottom),
        })  # fmt: skip
    _, rows = token_table(model, ids.tolist())
    return {"position": position, "token": rows[position], "layers": layers, "neurons": found}


def patching(body: PatchBody, request: Request) -> dict[str, Any]:
    """Activation patching of a clean/corrupted text pair (interp.patching.patch_prompts):
    each site's clean activation patched into the corrupted run, scored by the normalised
    logit difference answer - wrong at the last position (0 = corrupted, 1 = clean)."""
    model = _model(request)
    limit = min(MAX_PATCH_TOKENS, prompt_limit(request, model))
    for param in ("clean", "corrupted"):
        tokens_of(request, model, getattr(body, param), model.default_prepend_bos,
                  limit=limit, param=param)  # fmt: skip
    for param in ("answer", "wrong"):
        value = getattr(body, param)
        if isinstance(value, int) and not 0 <= value < model.cfg.d_vocab:
            raise BadRequest(f"{param} {value} is outside [0, {model.cfg.d_vocab})", param)
    if body.what not in SITES and body.what not in ALIASES:
        choices = ", ".join([*SITES, *ALIASES])
        raise BadRequest(f"what must be one of: {choices}; got {body.what!r}", "what")
    result = patch_prompts(
        model, body.clean, body.corrupted, body.answer, body.wrong,
        what=body.what, batch=PATCH_BATCH, progress=False,
    )  # fmt: skip
    return {
        "what": result.what,
        "dims": list(result.dims),
        "labels": result.labels,
        "values": rounded(result.values),
        "note": result.note,
        "clean_logit_diff": result.extra.get("clean_logit_diff"),
        "corrupted_logit_diff": result.extra.get("corrupted_logit_diff"),
    }


def steering_vector(body: SteeringBody, request: Request) -> dict[str, Any]:
    """An ActAdd steering vector (steering.actadd: act(positive) - act(negative) at each
    position) for the page's playground, which sends it back inline in a completion's
    `steering` ({"hook", "values", "coefficient"})."""
    model = _model(request)
    hook = body.hook or f"blocks.{model.cfg.n_layers // 2}.hook_resid_pre"
    limit = prompt_limit(request, model)
    for param in ("positive", "negative"):
        tokens_of(request, model, getattr(body, param), False, limit=limit, param=param)
    vector = actadd(model, body.positive, body.negative, hooks=hook)
    values = vector.directions[hook]
    return {
        "hook": hook,
        "method": "actadd",
        "shape": list(values.shape),
        "values": values.tolist(),
    }


def router() -> APIRouter:
    """The inspection routes, to mount under /v1/interp. Handlers are plain functions, so
    FastAPI runs them in its thread pool and the event loop keeps serving meanwhile."""
    r = APIRouter(route_class=InterpRoute, tags=["interp"], responses=ERRORS)
    add = r.add_api_route
    add("/info", info, methods=["GET"], summary="model shape and inspection limits")
    add("/tokens", tokens, methods=["POST"], summary="tokens, ids and character offsets")
    add("/next_token", next_token, methods=["POST"], summary="next-token top-k")
    add("/lens", lens, methods=["POST"], summary="logit / tuned lens grid")
    add("/attention", attention, methods=["POST"], summary="attention pattern of a layer")
    add("/neurons", neurons, methods=["POST"], summary="top neurons at a position")
    add("/steering_vector", steering_vector, methods=["POST"], summary="ActAdd vector")
    add("/patching", patching, methods=["POST"], summary="activation patching")
    return r


__all__ = ["MAX_ATTENTION_VALUES", "MAX_PATCH_TOKENS", "router"]
