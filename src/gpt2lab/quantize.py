"""Int8 weight-only quantization: the weight format, not the kernels (those, and the
measured choice between them, are in `gpt2lab.kernels.linear`).

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
- Activations: bfloat16. `Int8Linear` runs on the int8 kernel measured fastest for
  the case (kernels/linear.py): gpt2lab's AVX-512 VNNI kernel (each row of x becomes
  two int8 halves, 16 bits over the row's range, finer than bf16; products int8 x int8
  summed in int32; `y = s_x * s_i * sum + b` in float32, rounded once to bf16) or
  torch's `_weight_int8pack_mm` (float32 accumulation, bf16 output, bias added in bf16).
  With float32 activations only torch's kernel runs: the exact path, kept for checks
  (it is several times slower than a dense float32 GEMV on CPU). Where neither kernel
  can take a layer (toy widths, other devices) the weight is dequantized on the fly,
  `F.linear(x, q * s, b)`: the same function, slower.
- The unembedding (tied to `wte`) reads 103 MB of bf16 weights per token, a quarter of
  an int8 gpt2-medium step: an int8 copy of it (`Int8Copy`, +51 MB) is a candidate
  next to the bf16 product, and the faster one runs per row bucket (measured, see
  kernels/linear.py). The token and position embeddings and LayerNorms stay bf16;
  logits are bf16, and generation converts them to float32 before the softmax.

Hook points live in the blocks, not in the linear modules, so every hook still
fires; `c_attn.weight` and friends (and so `W_Q`, `W_O`, `hook_result`, ...) return
the dequantized weight. A quantized model cannot be saved (quantization is applied
on load instead) nor quantized again.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import GPT2LabError
from .kernels.linear import int8_linear

QUANTIZE_MODES = ("int8",)
LINEAR_NAMES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (q int8 [out, in], scales float32 [out])."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


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

    fuses_act = True  # the MLP may hand its GELU to the kernel

    def forward(self, x: torch.Tensor, act: str = "none") -> torch.Tensor:
        return int8_linear(x.to(self.scales.dtype), self, act)

    def float32_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, bias) in float32, as the native kernel takes them (bias empty when
        there is none); made once, again if either tensor is replaced or edited."""
        stamp = tuple(_stamp(t) for t in (self.scales, self.bias))
        if getattr(self, "_f32_stamp", None) != stamp:
            bias = self.bias.float() if self.bias is not None else self.scales.new_empty(0).float()
            self._f32 = (self.scales.float().contiguous(), bias.contiguous())
            self._f32_stamp = stamp
        return self._f32

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
    model.unembed.int8_copy = Int8Copy()
    return model


def _stamp(t: torch.Tensor | None) -> tuple | None:
    """What changes when a tensor is replaced or edited in place (inference-mode tensors
    keep no version counter: those are only edited inside inference mode, by no one)."""
    if t is None:
        return None
    try:
        version = t._version
    except RuntimeError:
        version = -1
    return (t.data_ptr(), version, tuple(t.shape))


class Int8Copy:
    """An int8 copy of a weight owned elsewhere: the unembedding, tied to the token
    embedding (which must stay float for the lookup). Made on first use and again
    whenever the source weight is replaced or edited in place (its version counter
    moves), so an edit of W_E or W_U is never silently ignored."""

    def __init__(self) -> None:
        self.layer: Int8Linear | None = None
        self.stamp: tuple | None = None

    def of(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        stamp = tuple(_stamp(t) for t in (weight, bias))
        if stamp != self.stamp:
            with torch.inference_mode(False):  # plain tensors, whichever mode calls first
                q, scales = quantize_weight(weight)
                self.layer = Int8Linear(q, scales, bias, weight.dtype)
            self.stamp = stamp
        return self.layer


def quantize(model, mode: str | None, dtype: torch.dtype | None = None):
    """Apply quantization `mode` ("int8" or None) to `model`; returns it."""
    if mode is None:
        return model
    if mode not in QUANTIZE_MODES:
        raise GPT2LabError(
            f"unknown quantization {mode!r} (supported: {', '.join(QUANTIZE_MODES)})"
        )
    return quantize_int8(model, dtype or torch.bfloat16)
