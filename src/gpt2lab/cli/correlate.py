"""`gpt2lab neurons correlate A B --data DIR`: cross-model neuron correlations."""

from __future__ import annotations

from . import neurons_app  # noqa: F401
