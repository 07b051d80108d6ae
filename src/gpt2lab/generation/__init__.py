"""Text generation: decoding loops over a model with a KV cache.

The model knows nothing about generation; these functions take a model and call it.
Every entry point turns its options into one `GenerationConfig` and decodes with
`generate_tokens`.
"""

from .config import GenerationConfig
from .generate import GenerationResult, generate, generate_tokens, stream

__all__ = ["GenerationConfig", "GenerationResult", "generate", "generate_tokens", "stream"]
