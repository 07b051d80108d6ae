"""gpt2lab: GPT-2, open all the way.

import gpt2lab as gl
model = gl.load("gpt2-medium")   # or gl.load("bundled"), the tiny model shipped inside
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
    """Load a GPT-2 checkpoint: a local directory in HF's layout, "bundled" (or no name)
    for the tiny model shipped with gpt2lab, a preset (gpt2, gpt2-medium, gpt2-large,
    gpt2-xl) or an HF repo id, downloaded with the `[hub]` extra (see checkpoint.resolve).
    A training run's out_dir or `.pt` checkpoint is refused, naming its best/ and final/.

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
