"""A whole decoding step in one native call: one new token of each sequence of a small
batch without padding, from its id to its logits.

An eager step at batch 1 reads each weight once and runs ~40 small torch ops per layer
around those reads (LayerNorms, the cache write, attention over the cache, residual
adds, Python between them): 3-14 ms a token at gpt2-medium size on the 2-core AMD EPYC,
10-17% of a float32 or bf16 step. `step.cpp` runs the embeddings, all the blocks, the
final LayerNorm and the unembedding in one OpenMP region on gpt2lab's own
matrix-vector kernels instead. Even the ~20 torch ops around the blocks count: each
costs 20-90 us right after the weights have streamed through (and evicted) the caches,
~1 ms a token in all (bf16, gpt2-medium). The model calls `plan(...)` first; where it
returns a runner, the runner's logits are the forward's result.

It applies only where nothing could tell the difference:
- one new token for each of at most MAX_ROWS sequences, with a KV cache, no padding (no
  key mask), all blocks, logits asked for (return_type "logits");
- no hook of the model attached or in a `hooks()` block, writes-only ones (steering)
  included; autograd off, not tracing, CPU;
- the model's own modules, unreplaced: LayerNorms with a live scale (not LN-free),
  `Linear` layers all float32 or all bf16, or `Int8Linear` layers all with bf16
  activations (then the unembedding runs on its int8 copy); embeddings of the
  activation type; a GELU the kernels fuse; d_head a multiple of 16 (at most 128);
- the native kernels built on this CPU (AVX-512; BF16 for bf16, VNNI for int8).
Then whether it runs is the chooser's case ("step", kind, row bucket, layers, d_model,
d_mlp): the eager and the native step are each timed on a scratch cache on first use, the
faster kept (choose.py); `GPT2LAB_KERNELS=step=eager` (or `kernels.force("step",
"eager")`) keeps the eager one.

The runner is built once per KV cache (a generation makes one), holding the model's
weight tensors themselves: in-place edits of the weights are seen; weights replaced by
other tensors are seen by the next cache.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..hooks import any_hook
from . import native
from .choose import chooser, force, forced_for, row_bucket
from .linear import NATIVE_MAX_ROWS as MAX_ROWS  # the kernels' range: beyond, GEMMs win

KINDS = {"f32": (0, torch.float32), "bf16": (1, torch.bfloat16), "int8": (2, torch.bfloat16)}
ACTS = {"gelu_tanh": 1, "gelu_erf": 2}


def plan(model, cache, B: int, T: int, key_mask, stop_at_layer, return_type) -> Callable | None:
    """The native runner `(tokens, position_ids, cache) -> logits` for this forward call,
    or None to run it eagerly (see the module docstring)."""
    if cache is None or T != 1 or B > MAX_ROWS or key_mask is not None or stop_at_layer is not None:
        return None
    if return_type != "logits":
        return None
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or any_hook(model):
        return None
    held = cache.__dict__.get("_native_step")
    if held is None or held[0]() is not model or (held[1] is not None and not held[1].holds(model)):
        held = (weakref.ref(model), _build(model, cache))
        cache._native_step = held
    runner = held[1]
    if runner is None or not runner.takes(cache):
        return None
    forced = forced_for("step", runner.kind)
    if forced in ("eager", "native"):
        return runner if forced == "native" else None
    return runner if _decide(model, runner, B) == "native" else None


class Runner:
    """The compiled step for one model, and the call the model makes."""

    def __init__(self, step, kind: str, shape: tuple, head: tuple, int8_layer):
        self.step, self.kind, self.shape = step, kind, shape
        self.dtype = KINDS[kind][1]
        self.head, self.int8_layer = head, int8_layer

    def holds(self, model) -> bool:
        """Whether the embeddings, final LayerNorm and unembedding are still the tensors
        it holds (weight processing replaces them; an int8 model's copy of the
        unembedding is remade when its source is edited): if not, it is built again."""
        head = _head(model)
        if any(a is not b for a, b in zip(head, self.head, strict=True)):
            return False
        return self.int8_layer is None or _int8_unembed(model, head) is self.int8_layer

    def takes(self, cache) -> bool:
        """Whether the cache's tensors are still ones the step reads (beam search replaces
        them by reordered copies; a caller could put anything there)."""
        k, v = cache.k, cache.v
        return (
            k.dtype == self.dtype and v.dtype == self.dtype and k.is_contiguous()
            and v.is_contiguous() and k.device.type == "cpu" and v.shape == k.shape
        )  # fmt: skip

    def key(self, rows: int) -> tuple:
        return ("step", self.kind, row_bucket(rows), *self.shape)

    def __call__(self, tokens: torch.Tensor, position_ids, cache) -> torch.Tensor:
        """Logits [B, 1, d_vocab] for tokens [B, 1] at `position_ids` [B, 1] (None: the
        cache's next position)."""
        B = tokens.shape[0]
        positions = _NONE if position_ids is None else position_ids.expand(B, 1).reshape(B)
        return self.step.run(tokens.reshape(B), positions, cache.k, cache.v, cache.length).view(
            B, 1, -1
        )


_NONE = torch.empty(0, dtype=torch.long)  # no positions: the cache's next one


def _build(model, cache) -> Runner | None:
    """The runner for `model`, or None where the step does not apply to it."""
    from ..model import LayerNorm, Linear, Unembed
    from ..quantize import Int8Linear

    cfg = model.cfg
    act = ACTS.get(model.blocks[0].mlp.fused_act or "")
    d_head = cfg.d_model // cfg.n_heads
    if act is None or cfg.n_heads * d_head != cfg.d_model or d_head % 16 or d_head > 128:
        return None
    layers = [
        m for b in model.blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)
    ]
    if all(type(m) is Int8Linear for m in layers):
        kind = "int8"
    elif all(type(m) is Linear for m in layers) and model.dtype in (torch.float32, torch.bfloat16):
        kind = "f32" if model.dtype == torch.float32 else "bf16"
    else:
        return None
    dtype = KINDS[kind][1]
    norms = [n for b in model.blocks for n in (b.ln1, b.ln2)] + [model.ln_final]
    if any(type(n) is not LayerNorm or n.fixed_scale is not None for n in norms):
        return None
    if type(model.wte) is not nn.Embedding or type(model.wpe) is not nn.Embedding:
        return None
    if type(model.unembed) is not Unembed:
        return None
    head = _head(model)
    int8_layer = _int8_unembed(model, head) if kind == "int8" else None
    if kind == "int8" and int8_layer is None:
        return None
    if int8_layer is not None:
        unembed = _linear_tensors(int8_layer, dtype)
    else:
        weight, bias = head[4:]
        unembed = [weight, bias if bias is not None else torch.empty(0, dtype=dtype)]
        unembed += [torch.empty(0), torch.empty(0)]
    Step = native.step_class(kind)
    if Step is None:
        return None
    tensors = []
    for block in model.blocks:
        tensors += [block.ln1.weight, block.ln1.bias, block.ln2.weight, block.ln2.bias]
        for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            tensors += _linear_tensors(m, dtype)
    try:
        step = Step(KINDS[kind][0], act, cfg.layer_norm_eps, [b.attn.scale for b in model.blocks],
                    [t.detach() for t in tensors],
                    [t.detach() for t in [*head[:4], *unembed]])  # fmt: skip
    except RuntimeError:  # shapes or dtypes the kernels do not take (step.cpp checks)
        return None
    return Runner(step, kind, (cfg.n_layers, cfg.d_model, cfg.d_mlp), head, int8_layer)


def _head(model) -> tuple:
    """The tensors around the blocks: wte, wpe, ln_final's weight and bias, and the
    unembedding's weight (the tied wte, or its own after weight processing) and bias."""
    u = model.unembed
    weight = model.wte.weight if u.weight is None else u.weight
    return (model.wte.weight, model.wpe.weight, model.ln_final.weight, model.ln_final.bias,
            weight, u.bias)  # fmt: skip


def _int8_unembed(model, head: tuple):
    """The int8 copy (quantize.Int8Copy) of the unembedding in `head` (`_head(model)`) of
    an int8 model, or None."""
    int8_copy = model.unembed.int8_copy
    return None if int8_copy is None else int8_copy.of(*head[4:])


def _linear_tensors(m, dtype: torch.dtype) -> list[torch.Tensor]:
    """(weight, bias, row sums, scales) as step.cpp takes a linear layer."""
    empty = torch.empty(0)
    if hasattr(m, "q_weight"):  # Int8Linear
        scales, bias = m.float32_params()
        return [m.q_weight, bias, m.q_sum, scales]
    bias = m.bias if m.bias is not None else torch.empty(0, dtype=dtype)
    return [m.weight, bias, empty, empty]


def _decide(model, runner: Runner, rows: int) -> str:
    """Which step runs this runner's case at `rows` rows, "native" or "eager": known
    after the first ask (this process's, or the cache file's: then nothing is timed)."""
    key = runner.key(rows)
    choice = chooser().choices.get(key)
    if choice is not None:
        return choice.name
    scratch = None
    first = torch.zeros(rows, 1, dtype=torch.long)

    def ready():  # a one-token cache whose position 1 every timed run writes
        nonlocal scratch
        if scratch is None:
            scratch = model.new_cache(rows, 2)
            with force("step", "eager"):
                model(first, cache=scratch)
        return scratch

    def eager(_copy: int) -> None:  # the whole forward call, as the native step
        cache = ready()
        cache.length = 1
        with force("step", "eager"):
            model(first, cache=cache)

    def fast(_copy: int) -> None:
        cache = ready()
        runner.step.run(first[:, 0], _NONE, cache.k, cache.v, 1)

    weights = sum(t.numel() * t.element_size() for t in model.blocks.parameters())
    weights += sum(t.numel() * t.element_size() for t in model.blocks.buffers())
    unembed = runner.int8_layer.q_weight if runner.int8_layer is not None else runner.head[4]
    weights += unembed.numel() * unembed.element_size()
    return chooser().pick(key, {"eager": eager, "native": fast}, op="step", dtype=runner.kind,
                          weight_bytes=weights)  # fmt: skip
