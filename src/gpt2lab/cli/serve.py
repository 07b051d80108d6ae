"""`gpt2lab serve`: the OpenAI-compatible HTTP API (and explorer page) over one model.

The port is bound at once and the model loads in the background (GET /health answers
503 until it is ready); a model that fails to load stops the server with the usual
one-line error. What can be checked without loading (the model's name, the folders
given) is checked before anything starts."""

from __future__ import annotations

import typer

from .core import app
from .options import (
    device_option,
    dtype_option,
    load_model,
    model_option,
    threads_option,
    use_threads,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command()
def serve(
    model: str | None = model_option(),
    dtype: str = dtype_option(int8=True),
    device: str = device_option(),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="address to listen on (loopback only unless told otherwise)"
    ),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free one)"),
    served_name: str | None = typer.Option(
        None, "--served-name", help="the model name requests give (default: --model, or bundled)"
    ),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="rows decoded together"),
    one_at_a_time: bool = typer.Option(
        False, "--one-at-a-time", help="serve one request at a time (no continuous batching)"
    ),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="GPT2LAB_API_KEY",
        help="require 'Authorization: Bearer KEY' on /v1 and /metrics (or $GPT2LAB_API_KEY)",
    ),  # fmt: skip
    steering_dir: str | None = typer.Option(
        None, "--steering-dir", help="folder of steering vectors that requests name by file stem"
    ),
    tuned_lens: str | None = typer.Option(
        None, "--tuned-lens", help="tuned lens folder (from `gpt2lab lens-train`) for /v1/interp"
    ),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="requests waiting; more: 429"),
    max_prompt_tokens: int = typer.Option(
        1024, "--max-prompt-tokens", min=1, help="tokens per prompt (at most the context)"
    ),
    max_tokens_cap: int = typer.Option(
        512, "--max-tokens-cap", min=1, help="the largest max_tokens a request may ask for"
    ),
    max_choices: int = typer.Option(32, "--max-choices", min=1, help="prompts x n per request"),
    max_body_bytes: int = typer.Option(
        1_000_000, "--max-body-bytes", min=1, help="largest request body; more: 413"
    ),
    max_streams: int = typer.Option(
        16, "--max-streams", min=1, help="concurrent streaming responses; more: 429"
    ),
    request_timeout: float = typer.Option(
        300.0, "--request-timeout", min=0.001, help="seconds a request may take; then 503"
    ),
    body_timeout: float = typer.Option(
        30.0, "--body-timeout", min=0.001, help="seconds to wait for a request body; then 408"
    ),
    max_connections: int = typer.Option(
        256, "--max-connections", min=1, help="open connections at once; more: 503"
    ),
    threads: int | None = threads_option(),
) -> None:
    """Serve the model over HTTP: OpenAI's /v1/completions (with gpt2lab's decoder options
    and steering), /v1/models, /v1/tokenize, /v1/detokenize, /v1/interp/..., /health,
    /metrics and the explorer page at /."""
    from pathlib import Path

    import uvicorn

    from .. import checkpoint
    from ..errors import GPT2LabError, one_line
    from ..serve import ServeSettings, create_app

    use_threads(threads)
    if dtype not in ("float32", "bfloat16", "float16", "int8"):
        raise GPT2LabError(f"--dtype must be float32, bfloat16, float16 or int8, got {dtype!r}")
    checkpoint.resolve(model)  # a wrong name fails now, not after the port is bound
    for option, path in (("--steering-dir", steering_dir), ("--tuned-lens", tuned_lens)):
        if path is not None and not Path(path).exists():
            raise GPT2LabError(f"{option} {path} does not exist")
    settings = ServeSettings(
        host=host, port=port, api_key=api_key, model_name=served_name or model or "bundled",
        max_batch=max_batch, max_queue=max_queue, continuous=not one_at_a_time,
        max_prompt_tokens=max_prompt_tokens, max_tokens_cap=max_tokens_cap,
        max_choices=max_choices, max_body_bytes=max_body_bytes, max_streams=max_streams,
        request_timeout=request_timeout, steering_dir=steering_dir, tuned_lens=tuned_lens,
        body_timeout=body_timeout,
    )  # fmt: skip
    if host not in LOOPBACK and api_key is None:
        typer.echo(
            f"gpt2lab: warning: listening on {host} without --api-key: anyone who can reach "
            "this address can use the model",
            err=True,
        )
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def load():
        return load_model(model, dtype=dtype, device=device)

    def failed(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    sock = _listen(host, port)  # a port in use fails here, in one line, before loading
    application = create_app(None, settings, loader=load, on_load_error=failed)
    # limit_concurrency bounds open connections (uvicorn answers 503 past it): a client
    # that holds connections open (slow headers) cannot take the server's memory.
    config = uvicorn.Config(application, log_level="info", limit_concurrency=max_connections)
    server = uvicorn.Server(config)
    if failure:  # failed before the server existed
        raise GPT2LabError(failure[0])
    bound = sock.getsockname()
    typer.echo(
        f"gpt2lab: serving on http://{host}:{bound[1]}/ (explorer page), API at /v1", err=True
    )
    with sock:
        server.run(sockets=[sock])
    if failure:
        raise GPT2LabError(one_line(failure[0]))


def _listen(host: str, port: int):
    """A listening socket on host:port, or one line saying why not (in use, no such
    address, no permission)."""
    import socket

    from ..errors import GPT2LabError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise GPT2LabError(f"--host {host}: {e.strerror or e}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise GPT2LabError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
