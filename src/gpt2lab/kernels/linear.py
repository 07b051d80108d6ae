"""Linear layers at inference: the candidate kernels, and the measured choice between them.

`linear(x, weight, bias, act)` is `act(F.linear(x, weight, bias))`; every linear layer
of the model and the unembedding go through it. With autograd on, under
`torch.compile` tracing, off the CPU, or for mixed dtypes it *is* that expression.
Otherwise decoding a token is one matrix-vector product per weight, bound by how fast
the weights stream from memory, and which kernel streams fastest depends on the CPU:
so the candidates below are timed on this CPU per case (dtype, power-of-two row
bucket, weight shape, fused activation) and the fastest runs (see choose.py):

- `aten`: `F.linear` (MKL's sgemm in float32; oneDNN or ATen's GEMV in bf16, as torch
  decides), then the activation.
- `onednn`: oneDNN's matmul called directly (`torch.ops.mkldnn._linear_pointwise`, the op
  Inductor emits for linear layers on CPU) on the plain [out, in] weight, no copy or
  repacking: on the 2-core AMD EPYC 1.7-1.9x faster than MKL's sgemm at 1-16 rows, and
  in bf16 it skips `F.linear`'s copy of the bias into the output.
- `onednn_fused`: the same with the GELU applied on the float32 accumulator before the
  output is written (one pass and, in bf16, one rounding less; 12.7 -> 11.0 ms for
  gpt2-medium's c_fc at 512 rows), a little slower than unfused at one row.
- `native`: gpt2lab's own AVX-512 matrix-vector kernels for a few rows (native.py:
  `vdpbf16ps` in bf16, FMA in float32, weights streamed once over both cores).

Nothing process-wide is switched to reach a kernel (ATen's bf16 GEMV was 2x faster for
one row on AMD, but only by switching oneDNN off for every thread; not a candidate).
Weights under SMALL_WEIGHT elements (toy models) are not timed: float32 runs `aten`,
bfloat16 `onednn` where it exists; the difference there is a few microseconds.

Int8 weights (`quantize.Int8Linear`) run `int8_linear`, with its own candidates:
`native` (AVX-512 VNNI, int8 x int8 in int32, see native.py) and `torch`
(`torch._weight_int8pack_mm`, float32 accumulation, bound by its int8-to-float
conversion); where neither can take the case, the weight is dequantized on the fly
(`dequant`), the same function, slower.
"""

from __future__ import annotations

import copy
import platform
from functools import cache

import torch
import torch.nn.functional as F

from ..errors import GPT2LabError
from . import native
from .choose import chooser, copies_for, forced_for, forced_in_block, row_bucket

SMALL_WEIGHT = 1 << 16
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
NATIVE_MAX_ROWS = 16  # a matrix-vector kernel: past this the GEMMs win, no need to time it

_ONEDNN = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)

# Activations oneDNN can apply inside the matmul, as (its post-op, its algorithm), and
# the code of each in gpt2lab's native kernels.
FUSED_ACTIVATIONS = {"gelu_tanh": ("gelu", "tanh"), "gelu_erf": ("gelu", "none")}
NATIVE_ACT = {"none": 0, "gelu_tanh": 1, "gelu_erf": 2}


def _activate(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "none":
        return y
    return F.gelu(y, approximate=FUSED_ACTIVATIONS[act][1])


# ---- the candidates: (x, weight, bias, act) -> y ------------------------------------------
def _aten(x, weight, bias, act):
    return _activate(F.linear(x, weight, bias), act)


def _onednn(x, weight, bias, act):
    return _activate(torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""), act)


def _onednn_fused(x, weight, bias, act):
    post_op, algorithm = FUSED_ACTIVATIONS[act]
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post_op, [], algorithm)


@cache
def _gemv(kind: str):
    """native's kernel `kind` (or None), looked up once per process: the getter reads two
    environment switches (~4 us), and a decode step calls ~100 kernels."""
    return getattr(native, f"{kind}_gemv")()


def _native(x, weight, bias, act):
    gemv = _gemv("f32") if x.dtype == torch.float32 else _gemv("bf16")
    K = x.shape[-1]
    b = bias if bias is not None else x.new_empty(0)
    y = gemv(x.reshape(-1, K).contiguous(), weight, b, NATIVE_ACT[act])
    return y.view(*x.shape[:-1], weight.shape[0])


def _native_supports(kind: str, in_features: int) -> bool:
    """Whether native kernel `kind` takes this width and runs here (built on first ask)."""
    return native.gemv_supports(kind, in_features) and _gemv(kind) is not None


CANDIDATES = {"aten": _aten, "onednn": _onednn, "onednn_fused": _onednn_fused, "native": _native}


def _onednn_usable() -> bool:
    return _ONEDNN and torch.backends.mkldnn.enabled  # (the user's switch, only read)


def candidates(x: torch.Tensor, weight: torch.Tensor, act: str) -> list[str]:
    """The kernels that can take this case, the reference (`aten`) first."""
    names = ["aten"]
    if x.dtype not in (torch.float32, torch.bfloat16):
        return names
    if _onednn_usable():
        names.append("onednn")
        if act != "none":
            names.append("onednn_fused")
    rows = x.numel() // x.shape[-1]
    if rows <= NATIVE_MAX_ROWS and weight.is_contiguous():
        kind = "f32" if x.dtype == torch.float32 else "bf16"
        if _native_supports(kind, x.shape[-1]):
            names.append("native")
    return names


def _fast_case(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and x.dtype == weight.dtype
        and (bias is None or bias.dtype == x.dtype)
        and not torch.compiler.is_compiling()
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str = "none",
    *,
    int8=None,
) -> torch.Tensor:
    """`act(F.linear(x, weight, bias))` on the kernel measured fastest for this case (see
    the module docstring); `act` is "none" or a key of FUSED_ACTIVATIONS. `int8`: a
    `quantize.Int8Copy` of `weight` that may run instead, where measured faster (an
    int8 model's unembedding)."""
    if act != "none" and act not in FUSED_ACTIVATIONS:
        raise GPT2LabError(
            f"linear: unknown activation {act!r} (known: {', '.join(FUSED_ACTIVATIONS)})"
        )
    if not _fast_case(x, weight, bias):
        return _aten(x, weight, bias, act)
    if int8 is not None:
        return _dense_or_int8(x, weight, bias, act, int8)
    dtype = DTYPE_NAMES.get(x.dtype) or str(x.dtype).removeprefix("torch.")
    if weight.numel() < SMALL_WEIGHT and forced_for("linear", dtype) is None:
        small = _onednn if x.dtype == torch.bfloat16 and _onednn_usable() else _aten
        return small(x, weight, bias, act)
    N, K = weight.shape
    key = ("linear", dtype, row_bucket(x.numel() // K), N, K, act)
    name = _decided(key, "linear", dtype)
    if name is None:
        nbytes = weight.numel() * weight.element_size()
        weights = _copies(weight, nbytes, key[2])
        runs = {n: _bound(CANDIDATES[n], x, weights, bias, act) for n in candidates(x, weight, act)}
        name = chooser().pick(key, runs, op="linear", dtype=dtype, weight_bytes=nbytes,
                              copies=len(weights))  # fmt: skip
    return CANDIDATES[name](x, weight, bias, act)


def _copies(weight, nbytes: int, rows: int) -> list:
    """The weight and, for a memory-bound case (few rows), copies of it to time over (see
    choose.py: as decoding streams one weight after another, never a cached one)."""
    n = copies_for(nbytes) if rows <= NATIVE_MAX_ROWS else 1
    return [weight] + [copy.deepcopy(weight) for _ in range(n - 1)]


def _bound(fn, x, weights, *rest):
    return lambda i: fn(x, weights[i], *rest)


def _decided(key: tuple, op: str, dtype: str) -> str | None:
    """The answer without building candidates, when one is already known (the common
    case: every call after the first of its kind); None to decide now."""
    if forced_in_block(op, dtype) is not None:
        return None
    choice = chooser().choices.get(key)
    return None if choice is None else choice.name


def _dense_or_int8(x, weight, bias, act, int8) -> torch.Tensor:
    """The product on `weight` itself or on its int8 copy, whichever is faster here."""
    dtype = DTYPE_NAMES.get(x.dtype) or str(x.dtype).removeprefix("torch.")
    N, K = weight.shape
    key = ("dense_or_int8", dtype, row_bucket(x.numel() // K), N, K, act)
    runs = {
        "dense": lambda i: linear(x, weight, bias, act),
        "int8": lambda i: int8_linear(x, int8.of(weight, bias), act),
    }
    name = _decided(key, "dense_or_int8", dtype)
    if name is None:  # (the unembedding: bigger than any cache, so no copies needed)
        name = chooser().pick(key, runs, op="dense_or_int8", dtype=dtype,
                              weight_bytes=weight.numel() * weight.element_size())  # fmt: skip
    return runs[name](0)


# ---- int8 weights ---------------------------------------------------------------------
def _has_pack_mm(device: torch.device, dtype: torch.dtype, in_features: int) -> bool:
    """Whether torch's int8 kernel can take this layer. It computes wrong results for an
    input width that is not a multiple of 16, and crashes the process for an odd one
    (torch 2.13, CPU): such layers (toy models) take the dequantizing path."""
    return (
        hasattr(torch, "_weight_int8pack_mm")
        and device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16, torch.float32)
        and in_features % 16 == 0
    )


def _int8_torch(x, layer, act):
    K = layer.in_features
    y = torch._weight_int8pack_mm(x.reshape(-1, K).contiguous(), layer.q_weight, layer.scales)
    if layer.bias is not None:
        y += layer.bias
    return _activate(y, act).view(*x.shape[:-1], layer.out_features)


def _int8_native(x, layer, act):
    scales, bias = layer.float32_params()
    y = _gemv("int8")(
        x.reshape(-1, layer.in_features).contiguous(), layer.q_weight, layer.q_sum, scales,
        bias, NATIVE_ACT[act],
    )  # fmt: skip
    return y.view(*x.shape[:-1], layer.out_features)


def _int8_dequant(x, layer, act):
    return _activate(F.linear(x, layer.weight, layer.bias), act)


INT8_CANDIDATES = {"dequant": _int8_dequant, "torch": _int8_torch, "native": _int8_native}


def int8_candidates(x: torch.Tensor, layer) -> list[str]:
    """The int8 kernels that can take this case; `dequant` only when nothing else can."""
    names = []
    if _has_pack_mm(x.device, x.dtype, layer.in_features):
        names.append("torch")
    if (
        x.dtype == torch.bfloat16  # float32 compute: the exact path, kept for checks
        and _native_supports("int8", layer.in_features)
    ):
        names.append("native")
    return names or ["dequant"]


def int8_linear(x: torch.Tensor, layer, act: str = "none") -> torch.Tensor:
    """`layer(x)` for an `Int8Linear` (x already in its compute dtype), on the int8
    kernel measured fastest for this case."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return _int8_dequant(x, layer, act)
    names = int8_candidates(x, layer)
    if len(names) == 1:
        return INT8_CANDIDATES[names[0]](x, layer, act)
    dtype = DTYPE_NAMES.get(x.dtype) or str(x.dtype).removeprefix("torch.")
    N, K = layer.out_features, layer.in_features
    key = ("int8", dtype, row_bucket(x.numel() // K), N, K, act)
    name = _decided(key, "int8", dtype)
    if name is None or name not in names:
        layers = _copies(layer, N * K, key[2])
        runs = {n: _bound(INT8_CANDIDATES[n], x, layers, act) for n in names}
        name = chooser().pick(key, runs, op="int8", dtype=dtype, weight_bytes=N * K,
                              copies=len(layers))  # fmt: skip
    return INT8_CANDIDATES[name](x, layer, act)
