"""gpt2lab serve: an OpenAI-compatible HTTP API with continuous batching, inspection routes
and the explorer page.

    from gpt2lab.serve import create_app, ServeSettings
    app = create_app(gpt2lab.load(), ServeSettings(port=8000))

FastAPI is imported only when the app is asked for, so the engine (serve.engine) works
without the server's extra installed."""

from __future__ import annotations

from typing import Any

__all__ = ["BackgroundServer", "ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServeSettings":
        from .settings import ServeSettings

        return ServeSettings
    if name == "BackgroundServer":
        from .background import BackgroundServer

        return BackgroundServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
