"""`gpt2lab steer make|sweep`: steering vectors from the command line."""

from __future__ import annotations

from . import steer_app  # noqa: F401
