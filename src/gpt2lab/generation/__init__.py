"""Text generation: decoding loops over a model with a KV cache.

The model knows nothing about generation; these functions take a model and call it.
"""

from .generate import GenerationResult, generate, stream

__all__ = ["GenerationResult", "generate", "stream"]
