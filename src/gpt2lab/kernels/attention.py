"""Attention without the pattern: `attend(q, k, v, mask, scale)` = softmax(q k^T * scale,
masked) v, on the kernel measured fastest for the case (choose.py).

The model calls this when no hook needs the scores or the pattern; otherwise it computes
them explicitly with `scores` (below). Candidates, on CPU at inference:

- `sdpa`: `F.scaled_dot_product_attention` (torch's flash-attention kernel on CPU, tiled):
  always a candidate, and the only one anywhere else (autograd, GPU, tracing).
- `bmm` (bf16 prefill, one mask for the whole batch, scores under BMM_MAX): two batched
  matmuls with the mask added inside the first (`baddbmm`), softmax in place. oneDNN's
  bf16 matmuls run near peak and the mask costs no extra pass: on the AMD EPYC 5.0 ms
  per gpt2-medium layer at 512 tokens against torch's 8-9 ms. The scores are rounded to
  bf16 before the softmax (which computes in float32), as in HF's eager attention.
- `sdpa_f32` (bf16, one query: decoding): keys and values converted to float32 first.
  CPU attention for one query costs ~0.9 us per cached key in bf16, ~0.12 us in float32:
  4x faster at 1000 keys on the AMD EPYC, conversion included.
- `math` (one query, float32 or bf16): two matmuls and a softmax in float32, without
  the flash kernel's ~55 us set-up per call (which a 24-layer step pays 24 times).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .choose import chooser, forced_for, forced_in_block, row_bucket

# Most scores (batch x heads x queries x keys) `bmm` holds at once (64 MB in bf16);
# bigger prefills take torch's kernel, which works in tiles.
BMM_MAX = 1 << 25
# Cases under this many scores (toy models, the first tokens) are not timed: they take
# the last candidate (`math` for one query, `bmm` for bf16 prefill); the difference
# there is microseconds.
SMALL = 1 << 14


class AttnMask(NamedTuple):
    """Which keys each query may see: a boolean tensor [batch|1, 1, query, key] (True =
    attend), or `None` with `causal` telling whether plain causal masking applies."""

    mask: torch.Tensor | None
    causal: bool


def shared_mask(mask: AttnMask) -> tuple[bool, torch.Tensor | None]:
    """(whether every row of the batch has the same mask, that [query, key] mask or None
    for plain causal masking)."""
    if mask.mask is None:
        return True, None
    if mask.mask.dim() == 2:
        return True, mask.mask
    if mask.mask.shape[0] == 1:
        return True, mask.mask[0, 0]
    return False, None


def scores(q: torch.Tensor, k: torch.Tensor, mask: AttnMask, scale: float) -> torch.Tensor:
    """The masked attention scores [batch, head, query, key] (-inf where masked), for
    when the pattern itself is wanted."""
    B, H, T, _ = q.shape
    shared, allowed = shared_mask(mask)
    if shared:
        return _masked_scores(q, k, allowed, scale).view(B, H, T, -1)
    out = (q * scale) @ k.transpose(-1, -2)  # per-row masks (a left-padded batch)
    return out.masked_fill_(~mask.mask, float("-inf"))


def _masked_scores(q, k, allowed: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q k^T * scale with -inf where `allowed` (a [query, key] mask shared by the batch;
    None = causal) is False, as one `baddbmm` [batch * heads, query, key]: the mask is
    added inside the matmul, not by another pass over the scores."""
    B, H, T, dh = q.shape
    S = k.shape[2]
    if allowed is None:
        bias = _future_bias(T, S, q.dtype, q.device)
    else:
        bias = torch.zeros(T, S, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~allowed, float("-inf"))
    # A transposed key operand is ~1.5x slower in bmm than copying it first (1 MB).
    k_t = k.reshape(B * H, S, dh).transpose(1, 2).contiguous()
    return torch.baddbmm(bias, q.reshape(B * H, T, dh), k_t, alpha=scale)


@lru_cache(maxsize=8)
def _future_bias(T: int, S: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The causal mask as an additive [T, S] bias: 0 where a query may see a key, -inf
    where the key is later. Made once per shape (every layer of every forward asks for
    the same one); made as a normal tensor even under inference mode, so that a later
    forward recorded by autograd may use it too."""
    with torch.inference_mode(False):
        future = torch.ones(T, S, dtype=torch.bool, device=device).triu(S - T + 1)
        return torch.zeros(T, S, dtype=dtype, device=device).masked_fill_(future, float("-inf"))


# ---- the candidates: (q, k, v, mask, scale) -> z [batch, head, query, d_head] -----------
def _sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask.mask, is_causal=mask.causal, scale=scale
    )


def _sdpa_f32(q, k, v, mask, scale):
    return _sdpa(q.float(), k.float(), v.float(), mask, scale).to(q.dtype)


def _math(q, k, v, mask, scale):
    """One query (decoding): two small matmuls and a softmax, in float32. torch's
    flash-attention kernel costs ~55 us a call at a few dozen keys (its set-up, not its
    arithmetic), ~2.5 ms of a 24-layer decode step."""
    dtype = q.dtype
    if dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if mask.mask is not None:
        scores.masked_fill_(~mask.mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v).to(dtype)


def _bmm(q, k, v, mask, scale):
    B, H, T, dh = q.shape
    s = _masked_scores(q, k, shared_mask(mask)[1], scale)
    # In place: a second fresh buffer of scores costs page faults, as much as the matmul.
    torch.softmax(s, -1, out=s)
    return torch.bmm(s, v.reshape(B * H, -1, dh)).view(B, H, T, dh)


CANDIDATES = {"sdpa": _sdpa, "sdpa_f32": _sdpa_f32, "math": _math, "bmm": _bmm}


def candidates(q: torch.Tensor, k: torch.Tensor, mask: AttnMask) -> list[str]:
    """The kernels that can take this case, `sdpa` (the reference) first."""
    if (
        q.device.type != "cpu"
        or q.dtype not in (torch.bfloat16, torch.float32)
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
    ):
        return ["sdpa"]
    B, H, T, _ = q.shape
    if T == 1:
        return ["sdpa", "math"] if q.dtype == torch.float32 else ["sdpa", "sdpa_f32", "math"]
    if q.dtype != torch.bfloat16:
        return ["sdpa"]
    if shared_mask(mask)[0] and B * H * T * k.shape[2] <= BMM_MAX:
        return ["sdpa", "bmm"]
    return ["sdpa"]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttnMask, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [batch, head, query, d_head] and keys and
    values [batch, head, key, d_head]."""
    names = candidates(q, k, mask)
    if len(names) == 1:
        return _sdpa(q, k, v, mask, scale)
    B, H, T, dh = q.shape
    S = k.shape[2]
    dtype = "bfloat16" if q.dtype == torch.bfloat16 else "float32"
    forced = forced_in_block("attend", dtype)
    if B * H * T * S < SMALL and forced is None and forced_for("attend", dtype) is None:
        return CANDIDATES[names[-1]](q, k, v, mask, scale)
    key = ("attend", dtype, row_bucket(B * H), row_bucket(T), row_bucket(S), dh)
    choice = None if forced else chooser().choices.get(key)
    name = choice.name if choice is not None and choice.name in names else None
    if name is None:
        runs = {n: (lambda i, fn=CANDIDATES[n]: fn(q, k, v, mask, scale)) for n in names}
        kv_bytes = 2 * k.numel() * k.element_size()
        name = chooser().pick(key, runs, op="attend", dtype=dtype, weight_bytes=kv_bytes)
    return CANDIDATES[name](q, k, v, mask, scale)
