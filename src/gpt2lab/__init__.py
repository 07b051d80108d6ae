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


def load(
    name_or_path=None,
    *,
    dtype=None,
    device=None,
    quantize=None,
    process=False,
    default_prepend_bos=False,
    default_padding_side="left",
):
    """Load a GPT-2 checkpoint: a local directory in HF's layout, "bundled" (or no name)
    for the tiny model shipped with gpt2lab, a preset (gpt2, gpt2-medium, gpt2-large,
    gpt2-xl) or an HF repo id, downloaded with the `[hub]` extra (see checkpoint.resolve).
    A training run's out_dir or `.pt` checkpoint is refused, naming its best/ and final/.

    `quantize="int8"` for int8 weights; `process=True` to fold LayerNorms and centre the
    weights for interpretability (gpt2lab.interp.processing). `default_prepend_bos` and
    `default_padding_side` (TransformerLens' names) set how the model tokenizes text when
    a call does not say: gpt2lab's defaults are no BOS and left padding (TransformerLens'
    are True and "right")."""
    from .checkpoint import load as _load
    from .validate import show

    if not isinstance(default_prepend_bos, bool):
        raise GPT2LabError(
            f"default_prepend_bos must be True or False, got {show(default_prepend_bos)}"
        )
    if not isinstance(default_padding_side, str) or default_padding_side not in ("left", "right"):
        raise GPT2LabError(
            f"default_padding_side must be 'left' or 'right', got {show(default_padding_side)}"
        )
    model = _load(name_or_path, dtype=dtype, device=device, quantize=quantize, process=process)
    model.default_prepend_bos = default_prepend_bos
    model.default_padding_side = default_padding_side
    return model


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
