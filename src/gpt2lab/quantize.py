"""Fast CPU inference: the matmul kernel for each case, and int8 weight-only quantization.

`linear(x, weight, bias)` is `F.linear` on the fastest kernel this CPU has when no
gradient is needed; every linear layer of the model and the unembedding go through it.
Decoding a token is one matrix-vector product per weight, bound by how fast the
weights stream from memory, and `F.linear`'s default kernels fall well short of that.
Measured on the 2-core AVX-512 machine (the 96 block weights of a gpt2-medium step):
- float32: MKL's sgemm (what `F.linear` calls) takes 1.7-1.9x as long as oneDNN's
  matmul on the very same [out, in] weight at 1-16 rows (73 vs 42 ms at one row; the
  50257-row unembedding 12 vs 5 ms), and still 1.2-1.3x at hundreds of rows. So
  float32 inference runs on oneDNN (`torch.ops.mkldnn._linear_pointwise`, the op
  Inductor emits for linear layers on CPU): no copy or repacking of the weights,
  float32 accumulation in another order (results differ from MKL's in the last bits).
- bfloat16: oneDNN, called directly (as for float32), which skips `F.linear`'s copy
  of the bias into the output and lets the MLP's GELU run inside the matmul. One row
  also runs on oneDNN: ATen's own bf16 GEMV was 2-2.5x faster for one row on the AMD
  machine (17 vs 38 ms per step) but is only reachable by switching oneDNN off
  process-wide, which changes what every other thread computes; on the Intel
  (Sapphire Rapids) machine no torch path was faster. A native bf16 kernel chosen by
  measurement is the way to recover that speed (see gpt2lab.kernels).
Anything else (autograd on, other devices or dtypes, `torch.compile` tracing, no
oneDNN, or oneDNN switched off by the user) is plain `F.linear`.

`quantize_int8(model)` replaces the four linear layers of every block (`attn.c_attn`,
`attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`) with `Int8Linear` and moves everything
else (embeddings, LayerNorms, biases, the tied unembedding, the KV cache) to
bfloat16. `gpt2lab.load(path, quantize="int8")` does the same at load time;
`gpt2lab generate --dtype int8` on the command line.

Numerics
- Weights: per-output-channel (per row of the [out, in] weight) symmetric int8.
  For row i, `s_i = max_j |w_ij| / 127` (computed in float32 from the float32
  weights; an all-zero row gets `s_i = 1`), `q_ij = clamp(round(w_ij / s_i), -127, 127)`
  with round-half-to-even. So `|w_ij - q_ij * s_i| <= s_i / 2`: at most 0.4% of the
  row's largest weight. The value -128 is never used, so the grid is symmetric.
- The scales are then stored in the compute dtype (bfloat16), which rounds each
  `s_i` by a relative 2**-9 at most: a per-row gain error, far below the bf16
  rounding of the activations themselves.
- Activations: bfloat16. Decoding (at most KERNEL_MAX_ROWS rows, bf16/fp16 compute,
  no autograd) runs gpt2lab's AVX-512 VNNI kernel (gpt2lab/kernels): each row of x is
  turned into two int8 halves (16 bits over the row's range, finer than bf16), the
  products are int8 x int8 summed in int32, then `y = s_x * s_i * sum + b` in float32
  and rounded to bf16. It reads each weight once as one byte: ~13 ms for a
  gpt2-medium step's block weights here, against ~18 ms for torch's kernel below.
- Otherwise (prefill, no kernel): `y = (x @ q.T) * s + b`, computed by
  `torch._weight_int8pack_mm(x, q, s)` (float32 accumulation inside the kernel,
  bf16 output) plus the bias in bf16. That kernel reads 1 byte per weight, but it is
  bound by its own int8-to-float conversion (about 9 G weights/s per core here), not
  by memory: at one row no faster than `linear`'s bf16 GEMV over twice the bytes.
  With float32 activations the same kernel is several times *slower* than a dense
  float32 GEMV on CPU, so the quantized model computes in bf16; hand
  `dtype=torch.float32` only for checks (it never takes the VNNI kernel).
  Where torch's kernel is missing (older torch, non-CPU devices) the weight is
  dequantized on the fly, `F.linear(x, q * s, b)`: the same function, just slower.
- The unembedding (tied to `wte`) stays bf16 (not quantized), as do the position
  embeddings and LayerNorms; logits are therefore bf16, and generation converts them
  to float32 before the softmax. (With torch's int8 kernel an int8 copy of the
  unembedding decoded no faster, 3.2 vs 3.3 ms per token, for 51 MB more memory;
  with the VNNI kernel it might save ~1 ms per token: not done.)

Hook points live in the blocks, not in the linear modules, so every hook still
fires; `c_attn.weight` and friends (and so `W_Q`, `W_O`, `hook_result`, ...) return
the dequantized weight. A quantized model cannot be saved (quantization is applied
on load instead) nor quantized again.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import GPT2LabError

QUANTIZE_MODES = ("int8",)
# Up to this many rows (decoding, small batches) int8 layers use the VNNI kernel of
# gpt2lab.kernels; it reads the weights once per call, so it wins while the rows' own
# work is small (1.4-1.7x torch's kernel at 1-8 rows here); prefill takes torch's.
KERNEL_MAX_ROWS = 8
LINEAR_NAMES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# oneDNN's matmul on a plain (unpacked) weight: measured on x86 only. A call costs ~15 us
# more than MKL's, so small weights (a toy model's 192 x 64) stay on MKL.
_ONEDNN = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)
ONEDNN_MIN_WEIGHT = 1 << 16


# Activations oneDNN can apply inside the matmul, as (its post-op, its algorithm).
FUSED_ACTIVATIONS = {"gelu_tanh": ("gelu", "tanh"), "gelu_erf": ("gelu", "none")}


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, act: str = "none"
) -> torch.Tensor:
    """`act(F.linear(x, weight, bias))`, on the fastest CPU kernel when no gradient is
    needed (see the module docstring); with autograd on, or anywhere else, exactly
    `F.linear` followed by the activation.

    `act` is "none" or a key of FUSED_ACTIVATIONS. On oneDNN the activation runs on the
    float32 accumulator before the output is written: one pass less over the [rows,
    d_mlp] output, and in bf16 one rounding less (12.7 -> 11.0 ms for gpt2-medium's
    c_fc at 512 rows).
    """
    if act != "none" and act not in FUSED_ACTIVATIONS:
        raise GPT2LabError(
            f"linear: unknown activation {act!r} (known: {', '.join(FUSED_ACTIVATIONS)})"
        )
    if (
        _ONEDNN
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and x.dtype == weight.dtype
        and (bias is None or bias.dtype == x.dtype)
        and torch.backends.mkldnn.enabled
        and not torch.compiler.is_compiling()
    ):
        one_row = x.numel() == x.shape[-1]
        if (x.dtype == torch.float32 and weight.numel() >= ONEDNN_MIN_WEIGHT) or (
            x.dtype == torch.bfloat16
        ):
            if act == "none" or one_row:  # one row: oneDNN's fused GELU is ~6% slower
                y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
                return _activate(y, act)
            post_op, algorithm = FUSED_ACTIVATIONS[act]
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post_op, [], algorithm)
    return _activate(F.linear(x, weight, bias), act)


def _activate(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "none":
        return y
    return F.gelu(y, approximate=FUSED_ACTIVATIONS[act][1])


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (q int8 [out, in], scales float32 [out])."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


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


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight [out, in] and a per-output-channel scale [out].

    Computes `x @ (q * scales).T + bias` in the dtype of `scales` (bf16 by default);
    inputs of another dtype are cast to it.
    """

    def __init__(
        self,
        q: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2 or scales.shape != (q.shape[0],):
            raise GPT2LabError(
                f"Int8Linear needs an int8 [out, in] weight and [out] scales, got "
                f"{q.dtype} {tuple(q.shape)} and {tuple(scales.shape)}"
            )
        self.out_features, self.in_features = q.shape
        self.register_buffer("q_weight", q.contiguous())
        self.register_buffer("scales", scales.to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        # The VNNI kernel (gpt2lab.kernels) also takes the row sums of q. Not saved.
        self.register_buffer("q_sum", q.sum(1, dtype=torch.int32), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        q, scales = quantize_weight(linear.weight)
        return cls(q, scales, linear.bias, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] (a new tensor; editing it changes nothing)."""
        return self.q_weight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.scales.dtype
        x = x.to(dtype)
        rows = x.numel() // self.in_features
        if (
            rows <= KERNEL_MAX_ROWS
            and dtype in (torch.bfloat16, torch.float16)  # float32: the exact path, for checks
            and x.device.type == "cpu"
            and self.in_features % 64 == 0
            and not torch.is_grad_enabled()
            and (gemv := kernels.int8_gemv()) is not None
        ):
            x2 = x.reshape(rows, self.in_features).float().contiguous()
            bias = self.bias.float() if self.bias is not None else self.q_sum.new_empty(0).float()
            y = gemv(x2, self.q_weight, self.q_sum, self.scales.float(), bias)
            return y.to(dtype).view(*x.shape[:-1], self.out_features)
        if _has_pack_mm(x.device, dtype, self.in_features):
            shape = x.shape
            y = torch._weight_int8pack_mm(
                x.reshape(-1, self.in_features).contiguous(), self.q_weight, self.scales
            )
            if self.bias is not None:
                y += self.bias
            return y.view(*shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, int8 weight, {self.scales.dtype} activations"
        )


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def quantize_int8(model, dtype: torch.dtype = torch.bfloat16):
    """Quantize `model`'s block linear layers to int8 in place (see the module docstring);
    everything else moves to `dtype`. Returns the model."""
    if is_quantized(model):
        raise GPT2LabError("the model is already quantized; load it again to re-quantize")
    if not dtype.is_floating_point:
        raise GPT2LabError(f"the compute dtype of an int8 model must be a float type, not {dtype}")
    for block in model.blocks:
        for name in LINEAR_NAMES:
            parent_name, attr = name.split(".")
            parent = getattr(block, parent_name)
            linear = getattr(parent, attr)
            if not isinstance(linear, nn.Linear):
                raise GPT2LabError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
            setattr(parent, attr, Int8Linear.from_linear(linear, dtype))
    model.to(dtype)  # embeddings, LayerNorms; int8 buffers keep their dtype
    return model


def quantize(model, mode: str | None, dtype: torch.dtype | None = None):
    """Apply quantization `mode` ("int8" or None) to `model`; returns it."""
    if mode is None:
        return model
    if mode not in QUANTIZE_MODES:
        raise GPT2LabError(
            f"unknown quantization {mode!r} (supported: {', '.join(QUANTIZE_MODES)})"
        )
    return quantize_int8(model, dtype or torch.bfloat16)
