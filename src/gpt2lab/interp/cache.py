"""The activation cache that `run_with_cache` returns.

It is a read-only mapping from hook names to tensors, addressed either by full name
(`"blocks.6.hook_resid_pre"`) or TransformerLens shorthand (`cache["resid_pre", 6]`,
`cache["pattern", -1]`, `cache["scale", 3, "ln1"]`), so notebooks written for
TransformerLens port unchanged. Analyses that combine cached activations with the
model's weights (decomposing the residual stream, head and neuron contributions,
logit attribution) live here too, as methods, because that is where users look for
them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..errors import GPT2LabError

if TYPE_CHECKING:
    from ..model import GPT2

_ACT_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_post": "post",
}
_LAYER_TYPE_ALIASES = {
    "a": "attn",
    "m": "mlp",
    "b": "",
    "block": "",
    "blocks": "",
    "attention": "attn",
}
_ATTN_ACTS = {"k", "v", "q", "z", "result", "pattern", "attn_scores"}
_MLP_ACTS = {"pre", "post"}


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """Full hook name from shorthand, by TransformerLens' rules.

    get_act_name("k", 6) == "blocks.6.attn.hook_k"; get_act_name("pre", 2) ==
    "blocks.2.mlp.hook_pre"; get_act_name("scale", 4, "ln1") == "blocks.4.ln1.hook_scale";
    get_act_name("k6") == "blocks.6.attn.hook_k"; get_act_name("scale") ==
    "ln_final.hook_scale"; a full name is returned as is.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.fullmatch(r"([a-z_]+?)(\d+)([a-z_]\w*)?", name)
    if match is not None:
        name, layer, layer_type = match.group(1), int(match.group(2)), match.group(3)
    name = _ACT_ALIASES.get(name, name)
    if name in _ATTN_ACTS:
        layer_type = "attn"
    elif name in _MLP_ACTS:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]
    full = f"blocks.{layer}." if layer is not None else ""
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


class PosSlice:
    """Which positions to keep, by TransformerLens' `Slice.unwrap` rules: None keeps all,
    an int keeps that one position (the axis stays, with length 1), a `slice` or a tuple
    (`slice(*tuple)`) keeps a range, a list / tensor of indices keeps those."""

    def __init__(self, spec: Any = None):
        if isinstance(spec, PosSlice):
            spec = spec.spec
        if spec is None:
            index: Any = slice(None)
        elif isinstance(spec, tuple):
            index = slice(*spec)
        elif isinstance(spec, int):
            index = torch.tensor([spec], dtype=torch.long)
        elif isinstance(spec, slice):
            index = spec
        elif isinstance(spec, (list, torch.Tensor)):
            index = torch.as_tensor(spec, dtype=torch.long)
        else:
            raise GPT2LabError(
                f"pos_slice must be None, an int, a slice, a tuple or a list; got {spec!r}"
            )
        self.spec, self.index = spec, index

    @property
    def is_identity(self) -> bool:
        return self.spec is None

    def apply(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        if self.is_identity:
            return x
        dim = dim % x.dim()
        index = self.index
        if isinstance(index, torch.Tensor):
            index = index.to(x.device)  # advanced indexing: negative positions count from the end
        return x[(slice(None),) * dim + (index,)]


class ActivationCache(Mapping):
    """Activations recorded by `run_with_cache`, keyed by hook name."""

    def __init__(self, store: dict[str, torch.Tensor], model: GPT2, has_batch_dim: bool = True):
        self.cache_dict = store
        self.model = model
        self.has_batch_dim = has_batch_dim

    # ---- mapping -----------------------------------------------------------------------
    def _key(self, key: Any) -> str:
        if isinstance(key, str):
            return key if key in self.cache_dict else get_act_name(key)
        if isinstance(key, tuple) and key and isinstance(key[0], str):
            name, *rest = key
            if rest and rest[0] is not None and rest[0] < 0:
                rest[0] += self.model.cfg.n_layers
            return get_act_name(name, *rest)
        raise GPT2LabError(
            f"cache keys are hook names or (name, layer[, type]) tuples; got {key!r}"
        )

    def __getitem__(self, key: Any) -> torch.Tensor:
        name = self._key(key)
        if name not in self.cache_dict:
            raise KeyError(
                f"{name!r} was not cached (cached: {len(self.cache_dict)} names; "
                "check names_filter, and that hook_result is requested by name)"
            )
        return self.cache_dict[name]

    def __contains__(self, key: object) -> bool:
        try:
            return self._key(key) in self.cache_dict
        except GPT2LabError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {', '.join(list(self)[:4])}{', ...' if len(self) > 4 else ''})"

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> ActivationCache:
        """A copy of the cache moved to another device and/or dtype."""
        moved = {k: v.to(device=device, dtype=dtype) for k, v in self.cache_dict.items()}
        return ActivationCache(moved, self.model, self.has_batch_dim)

    def remove_batch_dim(self) -> ActivationCache:
        """Drop the batch axis of a batch-1 cache (TransformerLens' `remove_batch_dim`)."""
        if not self.has_batch_dim:
            return self
        if any(v.shape[0] != 1 for v in self.cache_dict.values()):
            raise GPT2LabError("remove_batch_dim needs a cache of batch size 1")
        return ActivationCache({k: v[0] for k, v in self.cache_dict.items()}, self.model, False)

    def nbytes(self) -> int:
        """Memory the cached tensors hold (views of one storage counted once)."""
        seen: dict[int, int] = {}
        for v in self.cache_dict.values():
            storage = v.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    # ---- analyses, with TransformerLens' semantics -------------------------------------
    # Stacks have the component axis first: [components, *batch_and_pos, d_model].
    # `pos_slice` / `neuron_slice` / `batch_slice` follow TransformerLens' `Slice` (an int
    # drops the axis), applied to activations cached over every position.

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: Any = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The residual stream as it stood before each layer, up to the input of `layer`
        (None / -1: the final stream, read by the unembedding): the logit lens' inputs.

        With `apply_ln`, the final stream set is passed through `ln_final` recomputing each
        entry's own statistics (so `stack @ W_U` is a logit lens); an earlier layer's set is
        centred and divided by that layer's cached LayerNorm scale.
        """
        layer = self._layer(layer, mlp_input)
        n = self.model.cfg.n_layers
        parts, labels = [], []
        for i in range(layer + 1):
            if i == n:
                parts.append(self._act("resid_post", n - 1))
                labels.append("final_post")
                continue
            parts.append(self._act("resid_pre", i))
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                parts.append(self._act("resid_mid", i))
                labels.append(f"{i}_mid")
        stack = torch.stack([_slice(p, pos_slice, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(
                stack, layer, mlp_input, pos_slice, has_batch_dim=self.has_batch_dim,
                recompute_ln=layer == n,
            )  # fmt: skip
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: Any = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The input to `layer` split into what wrote it: embed, pos_embed and each earlier
        layer's attn_out / mlp_out (`mode` "attn" or "mlp" keeps one kind); the parts sum
        to that residual stream. `mlp_input` adds the layer's own attn_out (the MLP's input)."""
        if mode not in ("all", "attn", "mlp"):
            raise GPT2LabError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._layer(layer, mlp_input)
        parts, labels = [], []
        if incl_embeds:
            parts += [self._act("hook_embed"), self._act("hook_pos_embed")]
            labels += ["embed", "pos_embed"]
        for i in range(layer + (1 if mlp_input else 0)):
            if mode != "mlp":
                parts.append(self._act("attn_out", i))
                labels.append(f"{i}_attn_out")
            if mode != "attn" and i < layer:
                parts.append(self._act("mlp_out", i))
                labels.append(f"{i}_mlp_out")
        if not parts:
            raise GPT2LabError(f"decompose_resid: no components before layer {layer}")
        stack = torch.stack([_slice(p, pos_slice, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice)
        return (stack, labels) if return_labels else stack

    def compute_head_results(self) -> None:
        """Add each layer's per-head outputs (`blocks.{l}.attn.hook_result`, [batch, pos,
        head, d_model]) to the cache, computed from hook_z and W_O, where not cached."""
        for i in range(self.model.cfg.n_layers):
            self.cache_dict[f"blocks.{i}.attn.hook_result"] = self._head_result(i)

    def stack_head_results(
        self,
        layer: int | None = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: Any = None,
        apply_ln: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Each head's output (without b_O) in the layers before `layer`, labelled "L0H1";
        `incl_remainder` adds "remainder", the rest of that residual stream. Heads are read
        from cached hook_result, or computed from hook_z and W_O when it was not cached."""
        layer = self._layer(layer)
        H = self.model.cfg.n_heads
        labels = [f"L{i}H{h}" for i in range(layer) for h in range(H)]
        heads = [_slice(self._head_result(i), pos_slice, -3) for i in range(layer)]
        return self._component_stack(
            heads, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels
        )

    def get_neuron_results(
        self, layer: int, neuron_slice: Any = None, pos_slice: Any = None
    ) -> torch.Tensor:
        """What each MLP neuron of `layer` writes to the residual stream: post * W_out[n],
        [*batch_and_pos, neurons, d_model]. Not cached: large, and cheap to recompute."""
        acts = _slice(self._act("post", layer), pos_slice, -2)
        index = _neuron_index(neuron_slice, self.model.cfg.d_mlp)
        W_out = self.model.blocks[layer].mlp.c_proj.weight.detach().T  # [d_mlp, d_model]
        W_out = W_out.to(acts)
        if index is not None:
            acts, W_out = _slice(acts, index, -1), W_out[index]
        return acts[..., None] * W_out

    def stack_neuron_results(
        self,
        layer: int | None,
        pos_slice: Any = None,
        neuron_slice: Any = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Each MLP neuron's output (without b_out) in the layers before `layer`, labelled
        "L0N5" (`neuron_slice` picks neurons; an int keeps a length-1 neuron axis);
        `incl_remainder` adds "remainder", the rest of that residual stream."""
        layer = self._layer(layer)
        d_mlp = self.model.cfg.d_mlp
        index = _neuron_index(neuron_slice, d_mlp)
        neurons = list(range(d_mlp)) if index is None else index.tolist()
        labels = [f"L{i}N{n}" for i in range(layer) for n in neurons]
        parts = [self.get_neuron_results(i, index, pos_slice) for i in range(layer)]
        return self._component_stack(
            parts, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels
        )

    def stack_activation(
        self, activation_name: str, layer: int | None = -1, sublayer_type: str | None = None
    ) -> torch.Tensor:
        """One activation of every layer before `layer` (-1 / None: all layers), stacked
        on a new first axis: `stack_activation("pattern")` is [layer, batch, head, q, k].
        `activation_name` is a shorthand as in `cache["pattern", 3]` (`sublayer_type` as
        its third element, e.g. "ln1" for "scale"), as TransformerLens'."""
        if not isinstance(activation_name, str):
            raise GPT2LabError(f"activation_name must be a string, got {activation_name!r:.80}")
        layer = self._layer(layer)
        if layer == 0:
            raise GPT2LabError("stack_activation(layer=0) stacks no layers: give a layer >= 1")
        return torch.stack([self._act(activation_name, i, sublayer_type) for i in range(layer)])

    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: Any = None,
        return_labels: bool = False,
        project_output_onto: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The input to `layer` (its MLP with `mlp_input`; None / -1: the unembedding)
        split into every head's result ("L0H1"), every neuron's ("L0N5"; with
        `expand_neurons=False` each MLP's output, "0_mlp_out"), "embed", "pos_embed"
        and "bias" (the b_O's and, with expanded neurons, b_out's summed): the parts
        sum to that residual stream. As TransformerLens': same order, labels and
        numbers; `apply_ln` divides by the cached LayerNorm scale (`apply_ln_to_stack`);
        `project_output_onto` ([d_model] or [d_model, n]) projects each part's output."""
        layer = self._layer(layer, mlp_input)
        stack, labels = self.stack_head_results(
            layer + (1 if mlp_input else 0), pos_slice=pos_slice, return_labels=True
        )
        parts = [stack]
        if layer > 0:
            if expand_neurons:
                more, more_labels = self.stack_neuron_results(
                    layer, pos_slice=pos_slice, return_labels=True
                )
            else:
                more, more_labels = self.decompose_resid(
                    layer, mlp_input=mlp_input, mode="mlp", pos_slice=pos_slice,
                    incl_embeds=False, return_labels=True,
                )  # fmt: skip
            parts.append(more)
            labels += more_labels
        for name in ("embed", "pos_embed"):
            parts.append(_slice(self._act(f"hook_{name}"), pos_slice, -2)[None])
            labels.append(name)
        bias = self._accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        parts.append(bias.to(stack).expand((1, *stack.shape[1:])))
        labels.append("bias")
        stack = torch.cat(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos_slice)
        if project_output_onto is not None:
            if not isinstance(project_output_onto, torch.Tensor) or (
                project_output_onto.dim() not in (1, 2)
                or project_output_onto.shape[0] != self.model.cfg.d_model
            ):
                raise GPT2LabError(
                    "project_output_onto must be a tensor [d_model] or [d_model, n], got "
                    f"{project_output_onto!r:.80}"
                )
            stack = stack @ project_output_onto.to(stack)
        return (stack, labels) if return_labels else stack

    def _accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> torch.Tensor:
        """TransformerLens' `accumulated_bias`: the b_O (and b_out) of every layer before
        `layer`, plus that layer's b_O with `mlp_input`, [d_model]."""
        blocks = self.model.blocks
        total = torch.zeros_like(blocks[0].attn.c_proj.bias.detach(), dtype=torch.float32)
        for i in range(layer + (1 if mlp_input else 0)):
            total += blocks[i].attn.c_proj.bias.detach().float()
            if include_mlp_biases and i < layer:
                total += blocks[i].mlp.c_proj.bias.detach().float()
        return total

    def apply_ln_to_stack(
        self,
        residual_stack: torch.Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: Any = None,
        batch_slice: Any = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> torch.Tensor:
        """What each stacked component contributes to the normalised input of `layer`'s
        ln1 (ln2 with `mlp_input`; ln_final for None / -1 / n_layers): centred and divided
        by the scale cached from the real run, which is what makes the parts add up
        (the scale belongs to the whole stream, not to any one part). The LayerNorm's
        affine weight and bias are not applied. `pos_slice` / `batch_slice` say which
        positions / batch rows the stack holds (the cached scale is sliced to match).

        `recompute_ln` (final layer only) instead runs ln_final on each component with its
        own statistics, affine included: the logit lens."""
        layer = self._layer(layer, mlp_input)
        if not isinstance(residual_stack, torch.Tensor) or residual_stack.dim() < 2:
            raise GPT2LabError("residual_stack must be a tensor [components, ..., d_model]")
        if residual_stack.shape[-1] != self.model.cfg.d_model:
            raise GPT2LabError(
                f"residual_stack's last axis must be d_model ({self.model.cfg.d_model}), "
                f"got shape {tuple(residual_stack.shape)}"
            )
        if has_batch_dim:
            residual_stack = _slice(residual_stack, batch_slice, 1)
        n = self.model.cfg.n_layers
        if recompute_ln and layer == n:
            return _layer_norm(self.model.ln_final, residual_stack)
        name = "ln_final" if layer == n else f"blocks.{layer}.ln{2 if mlp_input else 1}"
        scale = _slice(self._act(f"{name}.hook_scale"), pos_slice, -2)
        if self.has_batch_dim:
            scale = _slice(scale, batch_slice, 0)
        centred = residual_stack - residual_stack.mean(-1, keepdim=True)
        return centred / scale

    def logit_attrs(
        self,
        residual_stack: torch.Tensor,
        tokens: Any,
        incorrect_tokens: Any = None,
        pos_slice: Any = None,
        batch_slice: Any = None,
        has_batch_dim: bool = True,
    ) -> torch.Tensor:
        """Each stacked component's direct effect on the logit of `tokens` (a token string,
        an id, or a tensor of ids per batch row / position), or on the logit difference
        with `incorrect_tokens`: the component through ln_final's cached scale, dotted with
        the token's unembedding column (W_U only, as TransformerLens: exact on a processed
        model; on an unprocessed one ln_final's weight and bias are left out, a warning
        says so, and `gpt2lab.interp.direct_logit_attribution` gives the exact split)."""
        from .processing import ln_final_is_folded

        directions = self._unembed_directions(tokens)
        if incorrect_tokens is not None:
            wrong = self._unembed_directions(incorrect_tokens)
            if wrong.shape != directions.shape:
                raise GPT2LabError(
                    f"tokens and incorrect_tokens must have the same shape, got "
                    f"{tuple(directions.shape[:-1])} and {tuple(wrong.shape[:-1])}"
                )
            directions = directions - wrong
        if not ln_final_is_folded(self.model):
            warnings.warn(
                "logit_attrs leaves out ln_final's weight and bias (as TransformerLens does); "
                "process the model (load(..., process=True)) or use direct_logit_attribution",
                stacklevel=2,
            )
        scaled = self.apply_ln_to_stack(
            residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice,
            has_batch_dim=has_batch_dim,
        )  # fmt: skip
        return (scaled * directions.to(scaled)).sum(-1)

    # ---- helpers for the analyses ----------------------------------------------------
    def _layer(self, layer: Any, mlp_input: bool = False) -> int:
        """TransformerLens' layer convention: None or -1 mean n_layers, the unembedding's input."""
        n = self.model.cfg.n_layers
        if layer is None:
            layer = n
        if not isinstance(layer, int) or isinstance(layer, bool) or not -n - 1 <= layer <= n:
            raise GPT2LabError(f"layer must be an int in [0, {n}] (or -1 / None), got {layer!r}")
        layer = layer + n + 1 if layer < 0 else layer
        if mlp_input and layer == n:
            raise GPT2LabError(
                "mlp_input=True needs a layer below n_layers (the unembedding has no MLP)"
            )
        return layer

    def _act(self, name: str, layer: int | None = None, kind: str | None = None) -> torch.Tensor:
        key = name if layer is None else (name, layer) if kind is None else (name, layer, kind)
        try:
            return self[key]
        except KeyError:
            raise GPT2LabError(
                f"this analysis needs {self._key(key)!r}, which was not cached; "
                "run run_with_cache without a names_filter that leaves it out"
            ) from None

    def _head_result(self, layer: int) -> torch.Tensor:
        name = f"blocks.{layer}.attn.hook_result"
        if name in self.cache_dict:
            return self.cache_dict[name]
        z = self._act("z", layer)  # [..., head, d_head]
        cfg = self.model.cfg
        W_O = self.model.blocks[layer].attn.c_proj.weight.detach().T
        W_O = W_O.reshape(cfg.n_heads, cfg.d_head, cfg.d_model).to(z)
        return torch.einsum("...hd,hdm->...hm", z, W_O)

    def _remainder(self, stack: torch.Tensor, layer: int, pos_slice: Any) -> torch.Tensor:
        """The residual stream entering `layer` minus the stacked parts, as a 1-part stack."""
        resid = self._act("resid_post", layer - 1) if layer else self._act("resid_pre", 0)
        return (_slice(resid, pos_slice, -2) - stack.sum(0))[None]

    def _component_stack(
        self,
        parts: list[torch.Tensor],
        labels: list[str],
        layer: int,
        pos_slice: Any,
        incl_remainder: bool,
        apply_ln: bool,
        return_labels: bool,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Per-layer [..., components, d_model] parts -> one [components, ..., d_model]
        stack, with the shared options of stack_head_results / stack_neuron_results."""
        if parts:
            stack = torch.cat(parts, dim=-2).movedim(-2, 0)
        else:
            stack = self._empty_stack(pos_slice)
        if incl_remainder:
            stack = torch.cat([stack, self._remainder(stack, layer, pos_slice)])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _empty_stack(self, pos_slice: Any) -> torch.Tensor:
        like = _slice(self._act("hook_embed"), pos_slice, -2)
        return like.new_zeros((0, *like.shape))

    def _unembed_directions(self, tokens: Any) -> torch.Tensor:
        """The unembedding vectors [..., d_model] of one token or a tensor of token ids."""
        model = self.model
        if isinstance(tokens, str):
            ids = model.tokenizer.encode(tokens)
            if len(ids) != 1:
                raise GPT2LabError(f"{tokens!r} is {len(ids)} tokens, not one")
            tokens = ids[0]
        if isinstance(tokens, bool) or not isinstance(tokens, (int, torch.Tensor)):
            raise GPT2LabError(f"tokens must be a string, an id or a tensor of ids, got {tokens!r}")
        ids = torch.as_tensor(tokens)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise GPT2LabError(f"token ids must be integers, got dtype {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= model.cfg.d_vocab):
            raise GPT2LabError(f"token ids must be in [0, {model.cfg.d_vocab}), got {tokens!r}")
        weight = model.unembed.weight if model.unembed.weight is not None else model.wte.weight
        ids = ids.reshape(()) if ids.numel() == 1 else ids
        return weight.detach()[ids.to(weight.device)]


def _slice(x: torch.Tensor, spec: Any, dim: int) -> torch.Tensor:
    """TransformerLens' `Slice.apply`: None keeps all, an int picks one (dropping the
    axis), a tuple is slice(*tuple), a list / tensor of indices picks those."""
    if spec is None:
        return x
    if isinstance(spec, tuple):
        spec = slice(*spec)
    elif isinstance(spec, (list, torch.Tensor)):
        spec = torch.as_tensor(spec, dtype=torch.long, device=x.device)
    elif isinstance(spec, bool) or not isinstance(spec, (int, slice)):
        raise GPT2LabError(f"a slice must be None, an int, a tuple or a list; got {spec!r}")
    return x[(slice(None),) * (dim % x.dim()) + (spec,)]


def _neuron_index(spec: Any, d_mlp: int) -> torch.Tensor | None:
    """Which neurons a `neuron_slice` picks, as indices (an int keeps a length-1 axis)."""
    if spec is None:
        return None
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    index = _slice(torch.arange(d_mlp), spec, 0)
    return index.reshape(-1)


def _layer_norm(ln: Any, x: torch.Tensor) -> torch.Tensor:
    """`ln` applied to `x` with its own statistics, without firing the LayerNorm's hooks."""
    x = x - x.mean(-1, keepdim=True)
    if ln.fixed_scale is None:
        x = x / (x.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
    else:
        x = x / ln.fixed_scale
    return x * ln.weight.detach().to(x) + ln.bias.detach().to(x)
