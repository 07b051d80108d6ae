"""Every speed path of the model, and the measured choice between them.

The model (model.py) keeps the math; what runs each step of it on this machine lives here:
- linear.py: linear layers and int8 layers; each case's candidate kernels (torch's
  ATen and oneDNN paths, gpt2lab's native ones) and the call that picks one.
- attention.py: `attend(q, k, v, mask, scale)` when no hook needs the pattern, and
  `scores` when one does.
- choose.py: the choice by measurement: candidates timed on first use on this CPU, the
  winner kept per process and in a cache file; `force` and GPT2LAB_KERNELS override it.
- native.py (+ .cpp): gpt2lab's own C++ kernels, compiled on first use, each with a
  fallback when it cannot be built.
"""

from .choose import Choice, chooser, force
from .native import NAME, _build, _build_lock, cpu_has_vnni, int8_gemv  # noqa: F401

__all__ = ["Choice", "chooser", "force"]
