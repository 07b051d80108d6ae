"""The FastAPI app: an OpenAI-compatible completions API over one model and one Engine.

    app = create_app(model, ServeSettings(max_batch=8))   # or create_app(None, s, loader=f)
    uvicorn.run(app, host=s.host, port=s.port)

Every failure a client can cause is answered with OpenAI's error body and a 4xx (a 429
or 503 when the server is busy or still loading); pydantic's validation errors and
malformed JSON become 400s with one line naming the field, not FastAPI's 422. The
server holds no state a request can corrupt: no route reads or writes a path taken from
a request (steering vectors and the tuned lens are loaded at start-up).

Around the routes, four plain ASGI layers (outermost first): metrics (latency and
status per route template), the API key (when one is set: /v1 and /metrics need
`Authorization: Bearer KEY`), the body-size limit (413 past max_body_bytes, read
before anything parses it; 408 when it does not arrive in time), and JSON only (415
for a POST body of another media type).
"""

from __future__ import annotations

import hmac
import importlib.util
import json
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import GPT2LabError, one_line
from . import completions
from . import openai_format as fmt
from .metrics import Metrics
from .schemas import CompletionRequest, DetokenizeRequest, TokenizeRequest
from .settings import ServeSettings

OPEN_PATHS = ("/health", "/openapi.json", "/docs", "/redoc")  # no API key needed
PROTECTED_PREFIXES = ("/v1/", "/metrics", "/tokenize", "/detokenize", "/tokenizer_info")


def create_app(
    model: Any = None,
    settings: ServeSettings | None = None,
    *,
    loader: Callable[[], Any] | None = None,
    on_load_error: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app over `model`, or over what `loader()` returns, called in a background
    thread (GET /health answers 503 until it returns; every model route too). Steering
    vectors (settings.steering_dir) and the tuned lens are loaded with the model; a
    failure there is reported by /health and passed to `on_load_error` (one line)."""
    settings = settings or ServeSettings()
    if (model is None) == (loader is None):
        raise GPT2LabError("create_app takes a model or a loader, not both or neither")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine = getattr(app.state, "engine", None)
        if engine is not None:
            engine.close()

    app = FastAPI(
        title="gpt2lab",
        version=_version(),
        description="An OpenAI-compatible completions API over a GPT-2, with a look inside.",
        lifespan=lifespan,
    )
    state = app.state
    state.settings = settings
    state.model = state.engine = state.tuned_lens = None
    state.steering = {}
    state.load_error = None
    state.active_streams = 0
    state.streams_lock = threading.Lock()
    state.started = int(time.time())
    state.metrics = metrics = Metrics()
    metrics.gauge("gpt2lab_queue_length", "Requests waiting for the engine.",
                  lambda: state.engine.queue_length)  # fmt: skip
    metrics.gauge("gpt2lab_active_rows", "Rows being decoded.", lambda: state.engine.active_rows)
    metrics.gauge("gpt2lab_active_streams", "Streaming responses open.",
                  lambda: state.active_streams)  # fmt: skip
    metrics.gauge("gpt2lab_model_loaded", "1 once the model is loaded.",
                  lambda: float(state.model is not None))  # fmt: skip

    _install_errors(app)
    _routes(app)
    _mount_extras(app)
    app.add_middleware(JsonOnly)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, timeout=settings.body_timeout)
    if settings.api_key is not None:
        app.add_middleware(ApiKey, key=settings.api_key)
    app.add_middleware(Timing, metrics=metrics)

    if model is not None:
        _ready(app, model)
    else:

        def load() -> None:
            try:
                _ready(app, loader())
            except Exception as e:  # noqa: BLE001 - reported by /health, not a crash
                state.load_error = one_line(e) or type(e).__name__
                if on_load_error is not None:
                    on_load_error(state.load_error)

        threading.Thread(target=load, name="gpt2lab-load", daemon=True).start()
    return app


def _ready(app: FastAPI, model: Any) -> None:
    """Everything that needs the model: vectors, tuned lens, the engine; the model is
    published last, so a route that sees it sees the rest."""
    from .engine import Engine
    from .vectors import load_vectors

    s: ServeSettings = app.state.settings
    if s.steering_dir is not None:
        app.state.steering = load_vectors(s.steering_dir, model)
    if s.tuned_lens is not None:
        from ..interp.tuned_lens import TunedLens

        app.state.tuned_lens = TunedLens.load(s.tuned_lens, model)
    engine = Engine(model, max_batch=s.max_batch, max_queue=s.max_queue, continuous=s.continuous)
    app.state.engine = engine.start()
    app.state.model = model


def _version() -> str:
    from .. import __version__

    return __version__


def _model(request: Request) -> Any:
    """The model, or 503 while it loads (or when loading failed)."""
    state = request.app.state
    if state.model is None:
        if state.load_error:
            raise fmt.ApiError(503, f"the model failed to load: {state.load_error}",
                               type="server_error", code="model_load_failed")  # fmt: skip
        raise fmt.ApiError(503, "the model is still loading; retry in a moment",
                           type="server_error", code="model_loading")  # fmt: skip
    return state.model


# ---- routes ------------------------------------------------------------------------------
ERRORS = {
    400: {"description": "Bad request (OpenAI error body)"},
    401: {"description": "Missing or wrong API key"},
    404: {"description": "Unknown model"},
    408: {"description": "Body not received in time"},
    413: {"description": "Body too large"},
    415: {"description": "Body not sent as JSON"},
    429: {"description": "Queue full or too many streams"},
    503: {"description": "Loading, shutting down or timed out"},
}


def _routes(app: FastAPI) -> None:
    @app.get("/health", tags=["server"])
    def health(request: Request) -> JSONResponse:
        """200 once the model is loaded; 503 while loading (or if loading failed)."""
        state = request.app.state
        if state.model is not None:
            return JSONResponse({"status": "ok"})
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics", tags=["server"], response_class=PlainTextResponse)
    def prometheus(request: Request) -> PlainTextResponse:
        """Prometheus text format: requests, tokens, latency, queue length."""
        return PlainTextResponse(
            request.app.state.metrics.render(), media_type="text/plain; version=0.0.4"
        )

    @app.get("/v1/models", tags=["openai"], responses=ERRORS)
    def models(request: Request) -> dict:
        """The one model served, with its sizes."""
        return {"object": "list", "data": [_model_card(request)]}

    @app.get("/v1/models/{model_id:path}", tags=["openai"], responses=ERRORS)
    def model_info(model_id: str, request: Request) -> dict:
        """The model by its id; an HF repo id (owner/name, the default name for
        `--model owner/name`) holds a slash, as in vLLM's ids."""
        card = _model_card(request)
        if model_id != card["id"]:
            raise fmt.ApiError(404, f"the model {model_id!r} does not exist here",
                               param="model", code="model_not_found")  # fmt: skip
        return card

    @app.post("/v1/completions", tags=["openai"], responses=ERRORS)
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        """OpenAI's completions (text, ids or batches; n, logprobs, echo, stream, seed...)
        plus gpt2lab's decoder options and steering."""
        state = request.app.state
        model = _model(request)
        s: ServeSettings = state.settings
        plan = completions.plan(model, s, body, state.steering)
        deadline = time.monotonic() + s.request_timeout
        prompt_tokens = sum(len(p) for p in plan.prompts)
        if not plan.stream:
            result = await completions.complete(model, state.engine, plan, deadline,
                                                request.is_disconnected)  # fmt: skip
            state.metrics.tokens(prompt_tokens, result["usage"]["completion_tokens"])
            return JSONResponse(result)
        with state.streams_lock:
            if state.active_streams >= s.max_streams:
                raise fmt.ApiError(
                    429, f"too many streams open (limit {s.max_streams}); retry later",
                    type="rate_limit_error", code="too_many_streams",
                )  # fmt: skip
            state.active_streams += 1

        def release() -> None:
            with state.streams_lock:
                state.active_streams -= 1

        events = completions.stream(
            model, state.engine, plan, deadline,
            on_tokens=lambda n: state.metrics.tokens(prompt_tokens, n),
        )  # fmt: skip
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return EventStream(events, release, media_type="text/event-stream", headers=headers)

    @app.get("/tokenizer_info", tags=["tokens"], responses=ERRORS)
    def tokenizer_info(request: Request) -> dict:
        """vLLM's tokenizer description: with it and /tokenize, lm-eval's
        `local-completions` (tokenizer_backend auto or remote) uses this server's
        tokenizer instead of fetching one from a hub."""
        model = _model(request)
        eot = model.tokenizer.decode([model.tokenizer.eot_token])
        return {"tokenizer_class": "GPT2Tokenizer", "eos_token": eot, "bos_token": eot,
                "pad_token": None, "model_max_length": model.cfg.n_ctx,
                "vocab_size": model.cfg.d_vocab}  # fmt: skip

    @app.post("/v1/tokenize", tags=["tokens"], responses=ERRORS)
    @app.post("/tokenize", tags=["tokens"], responses=ERRORS)
    def tokenize(body: TokenizeRequest, request: Request) -> dict:
        """Token ids of a text; "<|endoftext|>" is the special token, as in HF's and
        vLLM's tokenizers (vLLM serves this at /tokenize too)."""
        model = _model(request)
        _check_model_name(request, body.model)
        ids = model.tokenizer.encode(body.prompt, allow_special=True)
        out = {"tokens": ids, "count": len(ids), "max_model_len": model.cfg.n_ctx}
        if body.return_token_strs:
            out["token_strs"] = [fmt.token_string(model.tokenizer, t) for t in ids]
        return out

    @app.post("/v1/detokenize", tags=["tokens"], responses=ERRORS)
    @app.post("/detokenize", tags=["tokens"], responses=ERRORS)
    def detokenize(body: DetokenizeRequest, request: Request) -> dict:
        """The text of token ids."""
        model = _model(request)
        _check_model_name(request, body.model)
        vocab = model.cfg.d_vocab
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise fmt.ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})",
                               param="tokens")  # fmt: skip
        return {"prompt": model.tokenizer.decode(body.tokens)}

    @app.get("/v1/steering", tags=["gpt2lab"], responses=ERRORS)
    def steering_vectors(request: Request) -> dict:
        """The steering vectors a request may name (loaded from --steering-dir)."""
        from .vectors import describe

        _model(request)
        return {"object": "list", "data": describe(request.app.state.steering)}


class EventStream(StreamingResponse):
    """A streaming response that gives its stream slot back however it ends: finished,
    failed, or the client gone before the first byte (when the body generator never
    starts, its own `finally` would never run)."""

    def __init__(self, content: Any, release: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
            await self.body_iterator.aclose()  # a started stream cancels its engine job


def _check_model_name(request: Request, name: str | None) -> None:
    served = request.app.state.settings.model_name
    if name is not None and name != served:
        raise fmt.ApiError(404, f"the model {name!r} does not exist here; this server serves "
                           f"{served!r}", param="model", code="model_not_found")  # fmt: skip


def _model_card(request: Request) -> dict:
    model = _model(request)
    cfg = model.cfg
    state = request.app.state
    return {
        "id": state.settings.model_name,
        "object": "model",
        "created": state.started,
        "owned_by": "gpt2lab",
        "meta": {
            "n_ctx": cfg.n_ctx,
            "d_model": cfg.d_model,
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
            "d_mlp": cfg.d_mlp,
            "vocabulary": cfg.d_vocab,
            "parameters": cfg.n_params,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(model.device),
        },
    }


def _mount_extras(app: FastAPI) -> None:
    """The inspection routes (/v1/interp) and the explorer page (/), when present."""
    if importlib.util.find_spec(f"{__package__}.interp") is not None:
        from .interp import router

        app.include_router(router(), prefix="/v1/interp")
    static = Path(__file__).with_name("static")
    if (static / "index.html").is_file():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=static), name="static")

        @app.get("/", include_in_schema=False)
        def index() -> Response:
            from fastapi.responses import FileResponse

            return FileResponse(static / "index.html", media_type="text/html")


# ---- errors ------------------------------------------------------------------------------
def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(fmt.ApiError)
    async def api_error(request: Request, e: fmt.ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(GPT2LabError)
    async def user_error(request: Request, e: GPT2LabError) -> JSONResponse:
        from .engine import EngineClosed, QueueFull

        if isinstance(e, QueueFull):
            return _error(429, one_line(e), "rate_limit_error", code="queue_full")
        if isinstance(e, EngineClosed):
            return _error(503, one_line(e), "server_error", code="shutting_down")
        return _error(400, one_line(e) or "invalid request")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = validation_message(e.errors())
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        message = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        return _error(e.status_code, one_line(message), kind, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        if type(e).__name__ == "OutOfMemoryError" or isinstance(e, MemoryError):
            return _error(503, "out of memory; try a shorter prompt or fewer choices",
                          "server_error", code="out_of_memory")  # fmt: skip
        return _error(500, f"internal error ({type(e).__name__}); this is a bug in gpt2lab",
                      "server_error")  # fmt: skip


def _error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    return JSONResponse(fmt.error_body(message, kind, param, code), status_code=status,
                        headers=headers)  # fmt: skip


def _is_json(content_type: str) -> bool:
    """application/json or application/*+json, as FastAPI decides whether to parse."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))  # fmt: skip


BRANCH_NAMES = {"str", "int", "float", "bool", "list", "dict", "SteeringSpec", "StreamOptions"}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's first error as one line: `field: what is wrong` (and the field)."""
    if not errors:
        return "invalid request", None
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    # a union's branch names (str, list[int], SteeringSpec...) are pydantic's, not the client's
    loc = [x for x in loc if not any(c in x for c in "[]()") and x not in BRANCH_NAMES]
    field = ".".join(loc) or None
    kind, msg = err.get("type", ""), str(err.get("msg", "invalid value"))
    if kind == "json_invalid":
        ctx = err.get("ctx") or {}
        detail = ctx.get("error", "")
        return one_line(f"the body is not valid JSON ({detail})" if detail else
                        "the body is not valid JSON"), None  # fmt: skip
    if kind == "extra_forbidden":
        return f"unrecognized request argument: {field}", field
    if kind == "missing" and not loc:
        return "the request needs a JSON body", None
    if not loc and kind in ("model_attributes_type", "model_type", "dict_type"):
        return "the request body must be a JSON object", None
    if kind == "missing":
        return f"{field} is required", field
    msg = msg.removeprefix("Value error, ")
    if field and not msg.startswith(field.split(".")[-1]):
        msg = f"{field}: {msg}"
    return one_line(msg, 300), field


# ---- ASGI layers -------------------------------------------------------------------------
class BodyLimit:
    """413 for a body over `limit` bytes (by Content-Length, or counted as it arrives),
    before any route parses it; 408 for a body not all there within `timeout` seconds
    (a client that stops short of its Content-Length would hold the request forever)."""

    def __init__(self, app: Any, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = _error(413, f"the request body is over this server's limit of "
                         f"{self.limit} bytes", code="request_too_large")  # fmt: skip
        if length is not None:
            try:
                if int(length) > self.limit:
                    return await too_big(scope, receive, send)
            except ValueError:
                return await _error(400, "bad Content-Length header")(scope, receive, send)
        body, more = bytearray(), True
        try:
            with anyio.fail_after(self.timeout):  # a body trickled in (or never finished)
                while more:
                    message = await receive()
                    if message["type"] != "http.request":
                        break  # a disconnect: let the app see it
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > self.limit:
                        return await too_big(scope, receive, send)
        except TimeoutError:
            slow = _error(408, f"the request body did not arrive within {self.timeout:g} s",
                          code="request_timeout", headers={"Connection": "close"})  # fmt: skip
            return await slow(scope, receive, send)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class JsonOnly:
    """415 for a POST whose Content-Type is not JSON: every body here is JSON, and FastAPI
    reads only JSON media types as JSON (`curl -d` sends a form type, which got pydantic's
    "Input should be a valid dictionary"); a cross-site form post is refused here too."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            kind = dict(scope.get("headers") or []).get(b"content-type", b"")
            kind = kind.decode("latin-1")
            if kind and not _is_json(kind):
                refused = _error(415, f"send the body as JSON with 'Content-Type: "
                                 f"application/json' (got {one_line(kind, 60)!r})",
                                 code="unsupported_media_type")  # fmt: skip
                return await refused(scope, receive, send)
        await self.app(scope, receive, send)


class ApiKey:
    """401 for /v1/... and /metrics without `Authorization: Bearer KEY`."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(PROTECTED_PREFIXES):
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                message = ("missing API key: send 'Authorization: Bearer KEY'" if not given
                           else "incorrect API key")  # fmt: skip
                response = _error(401, message, code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class Timing:
    """Counts every answered request by method, route template and status, with its time."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        status = 500

        async def record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "other"
            self.metrics.request(scope.get("method", "?"), path, status, time.monotonic() - start)
