"""The greedy pick from a step's logits: each row's argmax and its log-probability.

Greedy decoding needs, per step, the argmax of each row of logits and that token's
log-softmax (generation returns it). torch takes four ops for it (float, log_softmax,
argmax, gather), ~250 us at gpt2-medium's vocabulary on a decoding step, whose weight
reads have just evicted every cache: ~1% of a bf16 token on the 2-core AMD EPYC.
The native `greedy` (step_ops.cpp) reads each row twice (the maximum and its first
index, then the sum of exponentials) and writes two numbers.
"""

from __future__ import annotations

import torch

from . import native


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B] int64, log-probs [B] float32) of each row of `logits` [B, V]: the first
    index of the maximum, as `argmax`, and `log_softmax` there, NaN where the row is not
    finite (a NaN, +inf, or -inf everywhere), as torch's log_softmax gives there."""
    module = native.module_for("f32") if logits.device.type == "cpu" else None
    if module is not None and logits.dtype in (torch.float32, torch.bfloat16):
        return module.greedy(logits)
    logits = logits.float()
    ids = logits.argmax(-1)
    return ids, torch.log_softmax(logits, dim=-1).gather(1, ids[:, None]).squeeze(1)
