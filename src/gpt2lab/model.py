"""The GPT-2 transformer: embeddings, pre-LN blocks, tied unembedding.

Read top to bottom: `LayerNorm`, `Attention`, `MLP`, `Block`, then `GPT2.forward`.
Weights are stored fused and in `nn.Linear` layout (as nanoGPT does) because that is
what the fast kernels want; TransformerLens-shaped per-head views (`W_Q`, `W_O`, ...)
are derived on demand. Every activation a researcher may want passes through a
`HookPoint` with its TransformerLens name; attention only materialises its scores
and pattern when a hook asks for them, otherwise it runs through
`F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import copy
import math
import weakref
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPT2Config
from .errors import GPT2LabError
from .hooks import HookedModule, HookPoint, hooked, where_tokens_are
from .inputs import TOKEN_DTYPES, check_padding_side, check_prepend_bos, from_texts
from .inputs import left_pad as left_pad  # (re-exported: older imports take it from here)
from .kernels.attention import AttnMask, attend
from .kernels.attention import scores as attention_scores
from .kernels.linear import linear
from .kernels.step import plan as decode_step
from .validate import check_memory, integer, show

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


def activation(name: str):
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return partial(F.gelu, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    if name in ("silu", "swish"):
        return F.silu
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    raise GPT2LabError(f"activation {name!r} is not supported")


class Output(NamedTuple):
    """`model(tokens, return_type="both")`: logits and loss (TransformerLens' Output)."""

    logits: torch.Tensor
    loss: torch.Tensor


class KVCache:
    """Preallocated keys and values for incremental decoding.

    Memory for `max_len` positions is reserved once, so decoding never reallocates or
    concatenates. `key_mask` remembers which cached positions hold real tokens (False
    for left padding), so later steps need only the new tokens' mask.
    """

    def __init__(self, cfg: GPT2Config, batch: int, max_len: int, *, dtype=None, device=None):
        batch = integer("KV cache batch", batch, 1)
        max_len = integer("KV cache max_len", max_len, 1)
        if max_len > cfg.n_ctx:
            raise GPT2LabError(f"KV cache of {max_len} positions exceeds the context ({cfg.n_ctx})")
        shape = (cfg.n_layers, batch, cfg.n_heads, max_len, cfg.d_head)
        itemsize = (dtype or torch.get_default_dtype()).itemsize
        check_memory(
            f"a KV cache of batch {batch} x {max_len} positions",
            2 * math.prod(shape) * itemsize + batch * max_len,
            device,
            hint="use a smaller batch, fewer beams or fewer positions",
        )
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.key_mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.has_padding = False
        self.length = 0
        self.prompt_end = 0  # how many of the cached positions the first call filled

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values for `layer`; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Select/duplicate batch rows (beam search)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.key_mask = self.key_mask.index_select(0, index)


class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens' `hook_scale` and `hook_normalized` (the centred
    input divided by its scale, before the affine weight and bias, as in TransformerLens).

    The fused kernel runs unless a hook is attached; then the same math runs step by
    step so the scale and the normalised output can be read or replaced. With
    `fixed_scale` set (LayerNorm removal) the live std is replaced by that constant:
    the layer only centres and applies an affine map, a linear function of its input.
    """

    def __init__(self, d: int, eps: float, fixed_scale: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = eps
        self.fixed_scale = fixed_scale
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: torch.Tensor, step_by_step: bool = False) -> torch.Tensor:
        if self.fixed_scale is None and not (
            step_by_step or self.hook_scale.fns or self.hook_normalized.fns
        ):
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        x = x - x.mean(-1, keepdim=True)  # (torch.var_mean is 5x slower here)
        if self.fixed_scale is None:
            scale = (x.square().mean(-1, keepdim=True) + self.eps).sqrt()
        else:
            scale = torch.full_like(x[..., :1], self.fixed_scale)
        scale = self.hook_scale(scale)
        return torch.addcmul(self.bias, self.hook_normalized(x / scale), self.weight)

    # TransformerLens' names: the parameters themselves ([d_model]).
    w = property(lambda self: self.weight)
    b = property(lambda self: self.bias)


# Our activations that `kernels.linear` can fuse into the matmul, by HF name.
FUSABLE = {"gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
           "gelu": "gelu_erf"}  # fmt: skip


class Linear(nn.Linear):
    """`nn.Linear` that runs inference on the fastest CPU kernel (`kernels.linear`),
    optionally followed by an activation (fused into the matmul where the kernel can)."""

    fuses_act = True

    def forward(self, x: torch.Tensor, act: str = "none") -> torch.Tensor:
        return linear(x, self.weight, self.bias, act)


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.d_head = layer, cfg.n_heads, cfg.d_head
        self.c_attn = Linear(cfg.d_model, 3 * cfg.d_model)  # fused q, k, v
        self.c_proj = Linear(cfg.d_model, cfg.d_model)  # W_O
        self.scale = 1 / math.sqrt(cfg.d_head) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            self.scale /= layer + 1
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head, query, key], masked = -inf
        self.hook_pattern = HookPoint()  # [batch, head, query, key]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head, d_model], computed only if hooked

    def forward(
        self, x: torch.Tensor, mask: AttnMask, cache: KVCache | None, step_by_step: bool = False
    ) -> torch.Tensor:
        B, T, D = x.shape
        H, dh = self.n_heads, self.d_head
        qkv = self.c_attn(x)
        # slices, not split(): a hook may write into q, k or v in place (TransformerLens'
        # head ablation, `v[:, :, head] = 0`), which autograd refuses on split's views
        q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
        q = self.hook_q(q.view(B, T, H, dh)).transpose(1, 2)  # -> [B, H, T, dh]
        k = self.hook_k(k.view(B, T, H, dh)).transpose(1, 2)
        v = self.hook_v(v.view(B, T, H, dh)).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # -> [B, H, past + T, dh]

        if step_by_step or self.hook_attn_scores.fns or self.hook_pattern.fns:
            scores = self.hook_attn_scores(attention_scores(q, k, mask, self.scale))
            pattern = self.hook_pattern(scores.softmax(-1))
            z = pattern @ v
        else:  # the pattern is never materialised
            z = attend(q, k, v, mask, self.scale)
        z = self.hook_z(z.transpose(1, 2))  # [B, T, H, dh]

        if self.hook_result.fns:  # per-head contributions to the residual stream
            W_O = self.c_proj.weight.T.reshape(H, dh, D)
            result = self.hook_result(torch.einsum("bthd,hdm->bthm", z, W_O))
            return result.sum(2) + self.c_proj.bias
        return self.c_proj(z.reshape(B, T, D))

    # ---- TransformerLens-shaped views of this layer's fused weights ---------------------
    # Views of the same storage, with autograd: an in-place write (under torch.no_grad(),
    # as for any parameter) lands in the model; assigning to the attribute raises.
    def _qkv(self, which: int, bias: bool) -> torch.Tensor:
        H, dh = self.n_heads, self.d_head
        D = H * dh
        if bias:
            return _float(self.c_attn, "bias")[which * D : (which + 1) * D].view(H, dh)
        return (
            _float(self.c_attn, "weight")[which * D : (which + 1) * D]
            .view(H, dh, D)
            .transpose(1, 2)
        )

    W_Q = property(lambda self: self._qkv(0, False))  # [head, d_model, d_head]
    W_K = property(lambda self: self._qkv(1, False))
    W_V = property(lambda self: self._qkv(2, False))
    b_Q = property(lambda self: self._qkv(0, True))  # [head, d_head]
    b_K = property(lambda self: self._qkv(1, True))
    b_V = property(lambda self: self._qkv(2, True))
    W_O = property(  # [head, d_head, d_model]
        lambda self: _float(self.c_proj, "weight").T.unflatten(0, (self.n_heads, self.d_head))
    )
    b_O = property(lambda self: _float(self.c_proj, "bias"))  # [d_model]


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = Linear(cfg.d_model, cfg.d_mlp)  # W_in
        self.c_proj = Linear(cfg.d_mlp, cfg.d_model)  # W_out
        self.act = activation(cfg.act_fn)
        self.fused_act = FUSABLE.get(cfg.act_fn)
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()

    def forward(self, x: torch.Tensor, step_by_step: bool = False) -> torch.Tensor:
        if (
            self.fused_act
            and getattr(self.c_fc, "fuses_act", False)
            and not (step_by_step or self.hook_pre.fns or self.hook_post.fns)
        ):  # nothing needs the pre-activations: let the matmul apply the GELU
            return self.c_proj(self.c_fc(x, act=self.fused_act))
        return self.c_proj(self.hook_post(self.act(self.hook_pre(self.c_fc(x)))))

    # TransformerLens-shaped views (same storage, as Attention's W_Q ...).
    W_in = property(lambda self: _float(self.c_fc, "weight").T)  # [d_model, d_mlp]
    b_in = property(lambda self: _float(self.c_fc, "bias"))  # [d_mlp]
    W_out = property(lambda self: _float(self.c_proj, "weight").T)  # [d_mlp, d_model]
    b_out = property(lambda self: _float(self.c_proj, "bias"))  # [d_model]


def _float(layer: nn.Module, name: str) -> torch.Tensor:
    """A linear layer's float weight or bias, for the TransformerLens-shaped views."""
    t = getattr(layer, name, None)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise GPT2LabError(
            f"this model's {type(layer).__name__} layers hold no float {name} (quantized?): "
            "TransformerLens-shaped weight views need an unquantized model"
        )
    return t


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        fixed = (
            1.0 if cfg.ln_free else None
        )  # an LN-free model has its scales folded into the weights
        self.ln1 = LayerNorm(cfg.d_model, cfg.layer_norm_eps, fixed)
        self.attn = Attention(cfg, layer)
        self.ln2 = LayerNorm(cfg.d_model, cfg.layer_norm_eps, fixed)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        self.hook_mlp_in: HookPoint | None = None  # a HookPoint after set_use_hook_mlp_in(True)

    def forward(
        self, resid: torch.Tensor, mask: AttnMask, cache: KVCache | None, step_by_step: bool = False
    ) -> torch.Tensor:
        resid = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(
            self.attn(self.ln1(resid, step_by_step), mask, cache, step_by_step)
        )
        resid = self.hook_resid_mid(resid + attn_out)
        mlp_in = resid if self.hook_mlp_in is None else self.hook_mlp_in(resid.clone())
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mlp_in, step_by_step), step_by_step))
        return self.hook_resid_post(resid + mlp_out)


class Unembed(nn.Module):
    """Residual stream -> logits, with TransformerLens' `unembed.hook_in` / `hook_out`.

    GPT-2 ties the unembedding to the token embedding, so this owns no weight: the
    model passes `wte.weight` in. Weight processing (centring, LayerNorm folding) unties
    the two; it then sets `weight` [d_vocab, d_model] and `bias` [d_vocab] here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.weight: nn.Parameter | None = None
        self.int8_copy = None  # int8 models: a quantized copy of the weight (quantize.Int8Copy)
        self.bias: nn.Parameter | None = None
        self.hook_in = HookPoint()  # [batch, pos, d_model]
        self.hook_out = HookPoint()  # [batch, pos, d_vocab]

    def forward(self, x: torch.Tensor, tied: torch.Tensor) -> torch.Tensor:
        weight = tied if self.weight is None else self.weight
        return self.hook_out(linear(self.hook_in(x), weight, self.bias, int8=self.int8_copy))

    # ---- TransformerLens' W_U / b_U ---------------------------------------------------
    # While tied, W_U is a view of the model's wte.weight (the owning GPT2 binds
    # `_model_ref`, a weakref, dropped from pickles and re-bound by GPT2.__setstate__).
    @property
    def W_U(self) -> torch.Tensor:
        """[d_model, d_vocab], a view (in-place writes land; while tied, in W_E too)."""
        if self.weight is not None:
            return self.weight.T
        model = self.__dict__.get("_model_ref", lambda: None)()
        if model is None:
            raise GPT2LabError("this Unembed belongs to no model: its tied weight is unknown")
        return model.wte.weight.T

    @property
    def b_U(self) -> torch.Tensor:
        """[d_vocab]: the bias after processing; GPT-2 has none before, and then this is
        a fresh zero tensor (writes to it do not land)."""
        if self.bias is not None:
            return self.bias
        W_U = self.W_U
        return torch.zeros(W_U.shape[1], dtype=W_U.dtype, device=W_U.device)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_model_ref", None)
        return state


class GPT2(HookedModule):
    """GPT-2 with TransformerLens hook points and a KV cache.

    `model(tokens)` returns logits [batch, pos, vocab]. For a padded batch pass
    `attention_mask` (1 = token, 0 = padding); position ids then count real tokens
    only, exactly as HF's `generate` does, and padding is invisible to real tokens.

    Text goes in through `to_tokens` with TransformerLens' conventions: `prepend_bos`
    and `padding_side` arguments, whose defaults are the model's `default_prepend_bos`
    (False: text is taken as it is) and `default_padding_side` ("left": every row's
    last token in the last column), settable with `gl.load(..., default_prepend_bos=,
    default_padding_side=)` or by assignment.
    """

    _default_prepend_bos: bool = False
    _default_padding_side: str = "left"

    @property
    def default_prepend_bos(self) -> bool:
        """Whether text gets `<|endoftext|>` prepended when a call does not say."""
        return self._default_prepend_bos

    @default_prepend_bos.setter
    def default_prepend_bos(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise GPT2LabError(f"default_prepend_bos must be True or False, got {show(value)}")
        self._default_prepend_bos = value

    @property
    def default_padding_side(self) -> str:
        """Which side a batch of texts is padded on when a call does not say."""
        return self._default_padding_side

    @default_padding_side.setter
    def default_padding_side(self, value: str) -> None:
        if not isinstance(value, str) or value not in ("left", "right"):
            raise GPT2LabError(f"default_padding_side must be 'left' or 'right', got {show(value)}")
        self._default_padding_side = value

    def _bos(self, prepend_bos: bool | None) -> bool:
        return self._default_prepend_bos if prepend_bos is None else check_prepend_bos(prepend_bos)

    def _side(self, padding_side: str | None) -> str:
        return (
            self._default_padding_side if padding_side is None else check_padding_side(padding_side)
        )

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        if not isinstance(cfg, GPT2Config):
            raise GPT2LabError(f"GPT2 takes a GPT2Config, got {type(cfg).__name__}")
        device = torch.get_default_device()
        if device.type != "meta":  # (load() builds on meta, then checks the file's size)
            check_memory(
                f"a GPT-2 of {cfg.n_params:,} parameters",
                cfg.n_params * torch.get_default_dtype().itemsize,
                device,
                hint="use a smaller configuration",
            )
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.d_vocab, cfg.d_model)  # also the unembedding (tied)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model, cfg.layer_norm_eps, 1.0 if cfg.ln_free else None)
        self.unembed = Unembed()
        self.setup_hooks()
        self._bind_tl_views()
        # Options `generate` uses where the call does not set them (explicit ones win):
        # empty for gpt2lab.load; TransformerLens' defaults for gpt2lab.tl's loaders.
        self.generation_defaults: dict[str, Any] = {}

    # ---- forward ---------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor | str | list[str],
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        stop_at_layer: int | None = None,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        return_type: str | None = "logits",
        loss_per_token: bool = False,
    ) -> Any:
        """Logits for `tokens` [batch, pos], or for text (a str or a list of str), tokenized
        by `to_tokens` with `prepend_bos` / `padding_side` (default: the model's defaults,
        no BOS and left padding) and masked so that padding changes no real position.
        Token tensors are taken as given (pass `attention_mask` for padding).

        With `cache`, `tokens` are the new tokens only and `attention_mask` may cover
        either the new tokens or all tokens so far. `logits_to_keep=n` computes logits
        for the last n positions only (what generation needs). `stop_at_layer=n` runs
        blocks 0..n-1 only and returns the residual stream [batch, pos, d_model] there
        (negative n counts from the end, as in Python slicing).

        `return_type` (TransformerLens'): "logits" (default), "loss" (next-token
        cross-entropy, mean over the predicted positions; `loss_per_token=True`:
        [batch, pos - 1]), "both" (`Output(logits, loss)`) or None (runs up to ln_final,
        returns None). See `loss_fn` for padding.
        """
        if isinstance(tokens, (str, list, tuple)):
            tokens, attention_mask = self.to_tokens(
                tokens, prepend_bos, padding_side, return_mask=True
            )
        elif prepend_bos is not None or padding_side is not None:  # checked, then unused
            self._bos(prepend_bos), self._side(padding_side)
        tokens = self._check_tokens(tokens)
        B, T = tokens.shape
        self._check_options(cache, logits_to_keep, stop_at_layer)
        self._check_return_type(return_type, loss_per_token, logits_to_keep)
        past = cache.length if cache is not None else 0
        if past + T > self.cfg.n_ctx:
            raise GPT2LabError(
                f"sequence of {past + T} tokens is longer than the model's context ({self.cfg.n_ctx})"
            )
        if cache is not None and (cache.batch != B or past + T > cache.max_len):
            raise GPT2LabError(
                f"KV cache holds batch {cache.batch} x {cache.max_len} positions; "
                f"got batch {B} with {past + T} positions"
            )

        key_mask = self._key_mask(attention_mask, B, T, past, cache, tokens.device)
        if past == 0 and cache is not None:
            cache.prompt_end = T  # a cache's first tokens are its prompt (steering counts them)
        if position_ids is not None:
            position_ids = self._check_position_ids(position_ids, B, T, tokens.device)

        # Hooked (a hook of this model attached, or inside its `hooks()` block), every
        # layer computes step by step (the LayerNorm, the attention pattern, the GELU
        # apart from its matmul), whichever hooks they are: what a hook reads never
        # depends on what else is hooked. Otherwise the fused kernels run.
        step_by_step = hooked(self)
        # One new token per sequence, no padding, nothing hooked, logits asked for: all
        # that follows in one native call, where that was measured faster here
        # (kernels/step.py); None: the same math below, op by op.
        native_step = None if step_by_step else decode_step(
            self, cache, B, T, key_mask, stop_at_layer, return_type
        )  # fmt: skip
        if native_step is not None:
            logits = native_step(tokens, position_ids, cache)
            cache.length += T
            return logits

        if key_mask is None:
            seq_pos = torch.arange(past, past + T, device=tokens.device).expand(B, T)
        else:  # count real tokens only, so left padding does not shift positions
            seq_pos = (key_mask.long().cumsum(-1)[:, past:] - 1).clamp(min=0)
        if position_ids is None:
            position_ids = seq_pos
        mask = self._attn_mask(key_mask, T, past, tokens.device)

        with where_tokens_are(seq_pos, key_mask, past, cache):  # for hooks that act by position
            resid = self.hook_embed(self.wte(tokens)) + self.hook_pos_embed(self.wpe(position_ids))
            blocks = self.blocks if stop_at_layer is None else self.blocks[:stop_at_layer]
            for block in blocks:
                resid = block(resid, mask, cache, step_by_step)
        if stop_at_layer is not None:
            return resid
        if cache is not None:
            cache.length += T
        if logits_to_keep:
            resid = resid[:, -logits_to_keep:]
        resid = self.ln_final(resid, step_by_step)
        if return_type is None:
            return None
        logits = self.unembed(resid, self.wte.weight)
        if return_type == "logits":
            return logits
        mask = None if key_mask is None else key_mask[:, past:]
        loss = self.loss_fn(logits, tokens, mask, per_token=loss_per_token)
        return loss if return_type == "loss" else Output(logits, loss)

    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise GPT2LabError(f"tokens must be a tensor of ids, got {type(tokens).__name__}")
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.dim() != 2 or tokens.dtype not in TOKEN_DTYPES:
            raise GPT2LabError(
                f"tokens must be an integer tensor [batch, pos], got {tuple(tokens.shape)} {tokens.dtype}"
            )
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise GPT2LabError(
                f"tokens are empty (shape {tuple(tokens.shape)}): give at least one row of one token"
            )
        # One device sync for both bounds, and as few ops as can be: this runs on every
        # decoding step, where each torch op costs tens of microseconds (cold caches).
        if tokens.numel() <= 64:
            rows = tokens.tolist()
            lo, hi = min(map(min, rows)), max(map(max, rows))
        else:
            lo, hi = torch.stack(torch.aminmax(tokens)).tolist()
        if lo < 0 or hi >= self.cfg.d_vocab:
            bad = hi if hi >= self.cfg.d_vocab else lo
            raise GPT2LabError(f"token id {bad} is outside the vocabulary [0, {self.cfg.d_vocab})")
        device = self.wte.weight.device
        if tokens.dtype == torch.long and tokens.device == device:
            return tokens
        return tokens.to(device=device, dtype=torch.long)

    def _check_options(self, cache, logits_to_keep, stop_at_layer) -> None:
        """forward()'s keyword arguments other than the masks: types and ranges."""
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise GPT2LabError(
                    f"cache must be a KVCache (model.new_cache(batch)), got {type(cache).__name__}"
                )
            cfg = self.cfg
            if (cache.k.shape[0], cache.k.shape[2], cache.k.shape[4]) != (
                cfg.n_layers, cfg.n_heads, cfg.d_head,
            ):  # fmt: skip
                raise GPT2LabError("this KV cache was made for a model of another shape")
        if logits_to_keep != 0:  # 0: all positions (the common case, checked cheaply)
            integer("logits_to_keep", logits_to_keep, 0)
        if stop_at_layer is not None:
            n = self.cfg.n_layers
            integer("stop_at_layer", stop_at_layer, -n, n)

    def _check_position_ids(self, position_ids, B: int, T: int, device) -> torch.Tensor:
        """Explicit position ids: integers in [0, n_ctx), shaped [batch, T], [1, T] or [T]."""
        n_ctx = self.cfg.n_ctx
        if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in TOKEN_DTYPES:
            raise GPT2LabError(f"position_ids must be an integer tensor, got {show(position_ids)}")
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        if position_ids.dim() != 2 or position_ids.shape[1] != T or position_ids.shape[0] not in (
            1, B,
        ):  # fmt: skip
            raise GPT2LabError(
                f"position_ids must be [batch, {T}], [1, {T}] or [{T}] for a batch of {B}, "
                f"got shape {tuple(position_ids.shape)}"
            )
        lo, hi = torch.stack(torch.aminmax(position_ids)).tolist()  # one sync for both
        if lo < 0 or hi >= n_ctx:
            raise GPT2LabError(
                f"position_ids must lie in [0, {n_ctx}) (the context), got {lo if lo < 0 else hi}"
            )
        return position_ids.to(device=device, dtype=torch.long)

    @staticmethod
    def _key_mask(attention_mask, B, T, past, cache, device) -> torch.Tensor | None:
        """[batch, past + T] bool of real tokens, or None when nothing is padded."""
        if attention_mask is None:
            if cache is None or not cache.has_padding:
                return None
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=device)
        if not isinstance(attention_mask, torch.Tensor):
            raise GPT2LabError(
                f"attention_mask must be a tensor of 0/1, got {type(attention_mask).__name__}"
            )
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
        if (
            attention_mask.dim() != 2
            or attention_mask.shape[0] != B
            or attention_mask.shape[1] not in (T, past + T)
        ):
            raise GPT2LabError(
                f"attention_mask must be [batch, {T}] or [batch, {past + T}], got {tuple(attention_mask.shape)}"
            )
        if attention_mask.shape[1] == T and past:
            attention_mask = torch.cat([cache.key_mask[:, :past], attention_mask], dim=1)
        if cache is not None:
            cache.key_mask[:, past : past + T] = attention_mask[:, past:]
            cache.has_padding = cache.has_padding or not bool(attention_mask.all())
        return attention_mask

    @staticmethod
    def _attn_mask(key_mask, T, past, device) -> AttnMask:
        if key_mask is None:
            if T == 1:
                return AttnMask(None, False)  # one new query sees every cached key
            if past == 0:
                return AttnMask(None, True)
        S = past + T
        causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(past)
        if key_mask is None:
            return AttnMask(causal, False)
        # A padding query sees no real key; letting it see itself keeps softmax finite.
        own = torch.zeros(T, S, dtype=torch.bool, device=device)
        own[:, past:] = torch.eye(T, dtype=torch.bool, device=device)
        allowed = (causal & key_mask[:, None, :]) | own
        return AttnMask(allowed[:, None], False)

    # ---- conveniences ----------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> Tokenizer:
        from .tokenizer import Tokenizer

        return Tokenizer()

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        move_to_device: bool = True,
        truncate: bool = False,
        *,
        return_mask: bool = False,
    ):
        """Tokenize text as a [batch, pos] tensor (TransformerLens' `to_tokens`).

        `prepend_bos`: put `<|endoftext|>` before each text (default: the model's
        `default_prepend_bos`, False). `padding_side`: pad a list of texts of different
        lengths on the "left" or "right" with `<|endoftext|>` (default: the model's
        `default_padding_side`, "left"). `truncate=True` keeps the first n_ctx tokens of
        each text (TransformerLens truncates by default; gpt2lab refuses a too-long
        prompt in the forward pass instead). With `return_mask=True` returns (tokens,
        mask), the mask [batch, pos] 1 for real tokens and 0 for padding, or None when
        no row is padded: pass it as `attention_mask`.
        """
        from .validate import boolean

        batch = from_texts(
            self.tokenizer,
            input,
            prepend_bos=self._bos(prepend_bos),
            padding_side=self._side(padding_side),
            device=self.device if boolean("move_to_device", move_to_device) else None,
            truncate=self.cfg.n_ctx if boolean("truncate", truncate) else None,
        )
        if return_mask:
            return batch.tokens, batch.mask
        return batch.tokens

    # ---- TransformerLens' tokenizer helpers -------------------------------------------
    def to_str_tokens(
        self,
        input: Any,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> list[str] | list[list[str]]:
        """Each token as its text: of a str (tokenized as `to_tokens` does, BOS as
        asked), of token ids ([pos] or [1, pos] tensor or array, a list of ids), or of a
        list of those (one list per item, as in TransformerLens)."""
        from .validate import is_int

        tok = self.tokenizer
        if isinstance(input, (list, tuple)) and input and all(is_int(t) for t in input):
            ids = list(input)  # one sequence of ids (TransformerLens has no such form)
        elif isinstance(input, (list, tuple)):
            if not input:
                raise GPT2LabError("to_str_tokens got an empty list")
            return [self.to_str_tokens(x, prepend_bos, padding_side) for x in input]
        elif isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos, padding_side, move_to_device=False)[0]
            ids = ids.tolist()
        else:
            ids = self._one_row(input, "to_str_tokens")
        return [tok.id_to_str(i) for i in ids]

    def _one_row(self, tokens: Any, what: str) -> list[int]:
        """Token ids given as a tensor or array of one row ([pos], [1, pos], a scalar)."""
        if type(tokens).__name__ == "ndarray":
            tokens = torch.as_tensor(tokens)
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in TOKEN_DTYPES:
            raise GPT2LabError(f"{what} takes text or integer token ids, got {show(tokens)}")
        tokens = tokens.squeeze()
        if tokens.dim() > 1:
            raise GPT2LabError(
                f"{what} takes one sequence of tokens ([pos] or [1, pos]), got shape "
                f"{tuple(tokens.shape)}"
            )
        ids = tokens.reshape(-1).tolist()
        self._check_ids(ids)
        return ids

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.cfg.d_vocab]
        if bad:
            raise GPT2LabError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.d_vocab})"
            )

    def to_single_token(self, string: str) -> int:
        """The id of a text that is exactly one token (no BOS): " Mary" -> its id; a text
        of several tokens is an error (suggesting the leading space where that helps)."""
        from .inputs import single_token_id

        if not isinstance(string, str):
            raise GPT2LabError(f"to_single_token takes a string, got {show(string)}")
        return single_token_id(self.tokenizer, string, self.cfg.d_vocab)

    def to_string(self, tokens: Any) -> str | list[str]:
        """Token ids back to text: one string for a scalar, a [pos] tensor / array or a
        list of ids; a list of strings for a [batch, pos] tensor or a list of rows."""
        if type(tokens).__name__ == "ndarray" or isinstance(tokens, (list, tuple)):
            try:
                tokens = torch.as_tensor(tokens)
            except (TypeError, ValueError, RuntimeError):
                raise GPT2LabError(
                    f"to_string takes token ids (a tensor, array or list), got {show(tokens)}"
                ) from None
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in TOKEN_DTYPES:
            raise GPT2LabError(f"to_string takes integer token ids, got {show(tokens)}")
        if tokens.dim() > 2:
            raise GPT2LabError(
                f"to_string takes [pos] or [batch, pos] token ids, got shape {tuple(tokens.shape)}"
            )
        rows = tokens.reshape(1, -1) if tokens.dim() < 2 else tokens
        rows = rows.tolist()
        for row in rows:
            self._check_ids(row)
        texts = [self.tokenizer.decode(row) for row in rows]
        return texts if tokens.dim() == 2 else texts[0]

    def get_token_position(
        self,
        single_token: str | int,
        input: Any,
        mode: str = "first",
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> int:
        """Where `single_token` (a one-token text or an id) occurs in `input` (a str,
        tokenized as `to_tokens` does with `prepend_bos`, or ids [pos] / [1, pos]): its
        first or last occurrence (`mode`). A token that does not occur is an error."""
        from .inputs import single_token_id

        if not isinstance(mode, str) or mode not in ("first", "last"):
            raise GPT2LabError(f"mode must be 'first' or 'last', got {show(mode)}")
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos, padding_side, move_to_device=False)[0]
            ids = ids.tolist()
        elif isinstance(input, (list, tuple)):
            ids = self._one_row(torch.as_tensor(input), "get_token_position")
        else:
            ids = self._one_row(input, "get_token_position")
        token = single_token_id(self.tokenizer, single_token, self.cfg.d_vocab)
        where = [i for i, t in enumerate(ids) if t == token]
        if not where:
            raise GPT2LabError(
                f"token {self.tokenizer.id_to_str(token)!r} (id {token}) does not occur in "
                f"the prompt ({len(ids)} tokens)"
            )
        return where[0] if mode == "first" else where[-1]

    def tokens_to_residual_directions(self, tokens: Any) -> torch.Tensor:
        """Each token's unembedding direction (its column of W_U): [d_model] for one token
        (a one-token text, an id, a one-element tensor), [..., d_model] for a tensor of
        ids. On an unprocessed model the final LayerNorm's weight is not folded in."""
        from .inputs import single_token_id

        weight = self.wte.weight if self.unembed.weight is None else self.unembed.weight
        if isinstance(tokens, torch.Tensor) and tokens.numel() > 1:
            if tokens.dtype not in TOKEN_DTYPES:
                raise GPT2LabError(
                    f"tokens_to_residual_directions takes integer token ids, got {show(tokens)}"
                )
            self._check_ids(tokens.reshape(-1).tolist())
            return weight.detach()[tokens.to(weight.device).long()].clone()
        token = single_token_id(self.tokenizer, tokens, self.cfg.d_vocab)
        return weight.detach()[token].clone()

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` positions (default: the
        context); refused before allocating if it would not fit in memory."""
        max_len = self.cfg.n_ctx if max_len is None else max_len
        return KVCache(self.cfg, batch, max_len, dtype=self.dtype, device=self.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def init_weights(self, seed: int | None = None) -> GPT2:
        """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)  # LayerNorm / biases
                else:
                    std = (
                        0.02 / math.sqrt(2 * self.cfg.n_layers)
                        if name.endswith("c_proj.weight")
                        else 0.02
                    )
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    # ---- jobs that live in other modules -------------------------------------------
    # `steer=` (a SteeringVector, a (vector, coefficient) pair, a Steering or a list of
    # them) steers one call; `with model.steer(...)` a block of them (gpt2lab.steering).
    def generate(self, prompt: Any, *, steer: Any = None, **options: Any):
        from .generation import generate
        from .steering.apply import steered

        with steered(self, steer):
            if options.get("config") is not None:  # a whole config: the defaults stay out
                return generate(self, prompt, **options)
            return generate(self, prompt, **{**self.generation_defaults, **options})

    def stream(self, prompt: str, *, steer: Any = None, **options: Any):
        from .generation import stream

        if steer is None:
            return stream(self, prompt, **options)
        from .steering.apply import steered_stream

        return steered_stream(self, prompt, steer, options)

    def score(self, text: Any, *, steer: Any = None, **options: Any):
        from .scoring import score
        from .steering.apply import steered

        with steered(self, steer):
            return score(self, text, **options)

    def perplexity(self, text: Any, *, steer: Any = None, **options: Any) -> float:
        from .scoring import perplexity
        from .steering.apply import steered

        with steered(self, steer):
            return perplexity(self, text, **options)

    def choose(self, context: str, options: list[str], *, steer: Any = None, **kwargs: Any):
        from .scoring import choose
        from .steering.apply import steered

        with steered(self, steer):
            return choose(self, context, options, **kwargs)

    def steer(self, vector: Any, coefficient: Any = 1.0, **how: Any):
        """`with model.steer(vector, 4.0):` steers every call inside the block, in this
        thread only (operator=, positions=, preserve_norm=: see gpt2lab.steering)."""
        from .steering import steer

        return steer(self, vector, coefficient, **how)

    def save(self, directory: str, format: str = "hf", dtype: str | None = None) -> None:
        """HF's layout in `directory` (format "hf"), or one llama.cpp GGUF file at that
        path (format "gguf", dtype "f32", "bf16" or "q8_0"; see gpt2lab.gguf_io)."""
        from .checkpoint import save
        from .gguf_io import save_gguf

        if format == "gguf":
            save_gguf(self, directory, "f32" if dtype is None else dtype)
        elif format != "hf" or dtype is not None:
            raise GPT2LabError(
                f"save: format must be 'hf' or 'gguf', got {format!r}"
                if format != "hf"
                else "save: dtype is for format='gguf'; an HF checkpoint keeps the model's dtype"
            )
        else:
            save(self, directory)

    def process_weights(
        self,
        *,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        fold_value_biases: bool = True,
    ) -> GPT2:
        """Fold the LayerNorms and centre the weights, in place, so components' outputs read
        directly (TransformerLens' processing; see gpt2lab.interp.processing)."""
        from .interp.processing import process_weights

        return process_weights(
            self,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
        )

    # ---- TransformerLens-shaped weight views (copies; editing them changes nothing) --
    def _stack(self, fn) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([fn(b) for b in self.blocks])

    def _qkv(self, which: int, bias: bool) -> torch.Tensor:
        D, H, dh = self.cfg.d_model, self.cfg.n_heads, self.cfg.d_head
        if bias:
            return self._stack(
                lambda b: b.attn.c_attn.bias[which * D : (which + 1) * D].view(H, dh)
            )
        return self._stack(
            lambda b: (
                b.attn.c_attn.weight[which * D : (which + 1) * D]
                .T.reshape(D, H, dh)
                .transpose(0, 1)
            )
        )

    W_Q = property(lambda self: self._qkv(0, False))  # [layer, head, d_model, d_head]
    W_K = property(lambda self: self._qkv(1, False))
    W_V = property(lambda self: self._qkv(2, False))
    b_Q = property(lambda self: self._qkv(0, True))  # [layer, head, d_head]
    b_K = property(lambda self: self._qkv(1, True))
    b_V = property(lambda self: self._qkv(2, True))
    W_O = property(  # [layer, head, d_head, d_model]
        lambda self: self._stack(
            lambda b: b.attn.c_proj.weight.T.reshape(
                self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model
            )
        )
    )
    b_O = property(lambda self: self._stack(lambda b: b.attn.c_proj.bias))  # [layer, d_model]
    W_in = property(
        lambda self: self._stack(lambda b: b.mlp.c_fc.weight.T)
    )  # [layer, d_model, d_mlp]
    b_in = property(lambda self: self._stack(lambda b: b.mlp.c_fc.bias))
    W_out = property(
        lambda self: self._stack(lambda b: b.mlp.c_proj.weight.T)
    )  # [layer, d_mlp, d_model]
    b_out = property(lambda self: self._stack(lambda b: b.mlp.c_proj.bias))

    @property
    def OV(self):  # FactoredMatrix [layer, head, d_model, d_model]: W_V @ W_O per head
        from .interp.factored_matrix import FactoredMatrix  # interp imports model

        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self):  # FactoredMatrix [layer, head, d_model, d_model]: W_Q @ W_K^T per head
        from .interp.factored_matrix import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def W_E(self) -> torch.Tensor:  # [d_vocab, d_model]
        return self.wte.weight.detach().clone()

    @property
    def W_pos(self) -> torch.Tensor:  # [n_ctx, d_model]
        return self.wpe.weight.detach().clone()

    @property
    def W_U(self) -> torch.Tensor:  # [d_model, d_vocab]
        weight = self.wte.weight if self.unembed.weight is None else self.unembed.weight
        return weight.detach().T.clone()

    @property
    def b_U(self) -> torch.Tensor:  # GPT-2 has no unembedding bias until processing adds one
        if self.unembed.bias is not None:
            return self.unembed.bias.detach().clone()
        return torch.zeros(self.cfg.d_vocab, dtype=self.dtype, device=self.device)

    # ---- TransformerLens' model surface -------------------------------------------------
    # `model.cfg` is the model's own copy of its config, bound to the model so that the
    # TransformerLens names it answers (cfg.device, cfg.dtype, cfg.normalization_type,
    # ...) describe this model as it is now. Unembed's tied W_U is bound the same way.
    @property
    def cfg(self) -> GPT2Config:
        return self.__dict__["_cfg"]

    @cfg.setter
    def cfg(self, cfg: GPT2Config) -> None:
        cfg = copy.copy(cfg)  # (a config shared by two models answers for one only)
        cfg._bind(self)
        self.__dict__["_cfg"] = cfg

    def _bind_tl_views(self) -> None:
        self.unembed.__dict__["_model_ref"] = weakref.ref(self)

    def __setstate__(self, state: dict[str, Any]) -> None:  # unpickled / deep-copied
        super().__setstate__(state)
        if "_cfg" in self.__dict__:
            self.cfg = self.__dict__["_cfg"]
        if "unembed" in self._modules:
            self._bind_tl_views()

    @property
    def embed(self) -> _Weights:
        """TransformerLens' `model.embed`: `.W_E` [d_vocab, d_model], the embedding itself."""
        return _Weights("embed", W_E=self.wte.weight)

    @property
    def pos_embed(self) -> _Weights:
        """TransformerLens' `model.pos_embed`: `.W_pos` [n_ctx, d_model], the parameter itself."""
        return _Weights("pos_embed", W_pos=self.wpe.weight)

    def loss_fn(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        per_token: bool = False,
    ) -> torch.Tensor:
        """Next-token cross-entropy, as TransformerLens' `loss_fn`: position i's logits
        predict token i + 1; the mean over those [batch, pos - 1] predictions, or each of
        them with `per_token`. `attention_mask` [batch, pos] (1 = token) leaves out every
        prediction of or from a padding position (per-token: 0 there)."""
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            raise GPT2LabError(f"logits must be a tensor [batch, pos, d_vocab], got {show(logits)}")
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in TOKEN_DTYPES:
            raise GPT2LabError(f"tokens must be an integer tensor [batch, pos], got {show(tokens)}")
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tuple(tokens.shape) != tuple(logits.shape[:2]) or logits.shape[1] < 2:
            raise GPT2LabError(
                f"loss_fn needs tokens [batch, pos] with pos >= 2 matching logits "
                f"{tuple(logits.shape)}, got tokens {tuple(tokens.shape)}"
            )
        if not isinstance(per_token, bool):
            raise GPT2LabError(f"per_token must be True or False, got {show(per_token)}")
        if attention_mask is not None and (
            not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != tokens.shape
        ):
            raise GPT2LabError(
                f"attention_mask must be a tensor shaped like tokens {tuple(tokens.shape)}, "
                f"got {show(attention_mask)}"
            )
        lo, hi = torch.stack(torch.aminmax(tokens[:, 1:])).tolist()
        if lo < 0 or hi >= logits.shape[-1]:
            raise GPT2LabError(
                f"token id {hi if hi >= logits.shape[-1] else lo} is outside the logits' "
                f"vocabulary [0, {logits.shape[-1]})"
            )
        tokens = tokens.to(device=logits.device, dtype=torch.long)
        log_probs = logits.log_softmax(-1)
        predicted = log_probs[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
        if attention_mask is None:
            n_tokens = predicted.numel()
        else:
            mask = attention_mask.to(device=logits.device, dtype=torch.bool)
            next_token_mask = mask[:, :-1] & mask[:, 1:]
            predicted = predicted.masked_fill(~next_token_mask, 0.0)
            n_tokens = next_token_mask.sum().item()
        if per_token:
            return -predicted
        return -predicted.sum() / n_tokens

    @staticmethod
    def _check_return_type(return_type: Any, loss_per_token: Any, logits_to_keep: int) -> None:
        if return_type not in ("logits", "loss", "both", None) or isinstance(return_type, bool):
            raise GPT2LabError(
                f"return_type must be 'logits', 'loss', 'both' or None, got {show(return_type)}"
            )
        if not isinstance(loss_per_token, bool):
            raise GPT2LabError(f"loss_per_token must be True or False, got {show(loss_per_token)}")
        if return_type in ("loss", "both") and logits_to_keep:
            raise GPT2LabError(
                f"return_type={return_type!r} needs the logits of every position; "
                "it cannot be combined with logits_to_keep"
            )

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """TransformerLens' switch for `attn.hook_result` ([batch, pos, head, d_model]).
        In gpt2lab the point always exists and is computed whenever a hook or the cache
        asks for it; True makes `run_with_cache`'s default record it too."""
        from .validate import boolean

        self._use_attn_result = boolean("use_attn_result", use_attn_result)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Add (True) or remove (False) `blocks.{l}.hook_mlp_in`, the MLP's input before
        ln2 ([batch, pos, d_model], a copy of resid_mid), as TransformerLens'. While off
        the hook point does not exist (hooking it is an error, not a silent no-op)."""
        from .validate import boolean

        on = boolean("use_hook_mlp_in", use_hook_mlp_in)
        for block in self.blocks:
            if on and block.hook_mlp_in is None:
                block.hook_mlp_in = HookPoint()
            elif not on:
                block.hook_mlp_in = None
        self._use_hook_mlp_in = on
        self.setup_hooks()

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """TransformerLens' per-head q/k/v inputs (`hook_q_input` ...): not in gpt2lab.
        False is accepted (it is the state already); True is an error."""
        from .validate import boolean

        if boolean("use_split_qkv_input", use_split_qkv_input):
            raise GPT2LabError(
                "set_use_split_qkv_input(True): gpt2lab has no hook_q_input / hook_k_input / "
                "hook_v_input (per-head copies of the residual stream); hook "
                "blocks.{l}.ln1.hook_normalized or attn.hook_q / hook_k / hook_v instead"
            )

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """TransformerLens' `hook_attn_in`: not in gpt2lab; True is an error."""
        from .validate import boolean

        if boolean("use_attn_in", use_attn_in):
            raise GPT2LabError(
                "set_use_attn_in(True): gpt2lab has no hook_attn_in (per-head copies of the "
                "residual stream); hook blocks.{l}.hook_resid_pre or ln1.hook_normalized instead"
            )


class _Weights:
    """A read-only holder of TransformerLens-named weights (`model.embed.W_E`): the
    attributes are the model's parameters themselves (in-place writes land, under
    torch.no_grad()); assigning an attribute raises."""

    def __init__(self, what: str, **weights: torch.Tensor):
        object.__setattr__(self, "_what", what)
        object.__setattr__(self, "_weights", weights)

    def __getattr__(self, name: str) -> torch.Tensor:
        weights = object.__getattribute__(self, "_weights")
        if name in weights:
            return weights[name]
        raise AttributeError(f"model.{self._what} has no {name!r} (it has {', '.join(weights)})")

    def __setattr__(self, name: str, value: Any) -> None:
        raise GPT2LabError(
            f"model.{self._what}.{name} is read-only; write into it in place "
            f"(with torch.no_grad(): model.{self._what}.{name}[...] = ...)"
        )

    def __repr__(self) -> str:
        return f"<model.{self._what}: {', '.join(self._weights)}>"
