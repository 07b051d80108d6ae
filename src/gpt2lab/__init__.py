"""gpt2lab: GPT-2, open all the way.

import gpt2lab as gl
model = gl.load("gpt2-medium")
model.generate("The capital of France is", max_new_tokens=20)
"""

from .config import GPT2Config
from .errors import GPT2LabError
from .memory import keep_freed_memory
from .model import GPT2, KVCache
from .tokenizer import Tokenizer

keep_freed_memory()  # freed activations stay in the heap for reuse (see gpt2lab.memory)

__version__ = "0.1.0"


def load(name_or_path=None, *, dtype=None, device=None, quantize=None, process=False):
    """Load a GPT-2 checkpoint by preset name, local directory or HF repo id (see checkpoint.load).

    `quantize="int8"` for int8 weights; `process=True` to fold LayerNorms and centre the
    weights for interpretability (gpt2lab.interp.processing)."""
    from .checkpoint import load as _load

    return _load(name_or_path, dtype=dtype, device=device, quantize=quantize, process=process)


__all__ = [
    "GPT2",
    "GPT2Config",
    "GPT2LabError",
    "KVCache",
    "Tokenizer",
    "keep_freed_memory",
    "load",
    "__version__",
]
