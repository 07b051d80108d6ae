"""`gpt2lab neurons stats|top|show`: neuron statistics over a corpus and neuron cards."""

from __future__ import annotations

from . import neurons_app  # noqa: F401
