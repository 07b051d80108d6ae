"""TransformerLens' `patching` functions, computed by gpt2lab's patching engine.

Each `get_act_patch_*(model, corrupted_tokens, clean_cache, patching_metric)` patches one
kind of activation from `clean_cache` (a `run_with_cache` of the clean prompt) into the
corrupted run, one layer / position / head at a time, and returns the metric of each
patched run in TransformerLens' layout:

    resid_pre, resid_mid, attn_out, mlp_out             [layer, pos]
    attn_head_{out,q,k,v}_all_pos, attn_head_pattern_all_pos   [layer, head]
    attn_head_{out,q,k,v}_by_pos                        [layer, pos, head]
    attn_head_pattern_by_pos                            [layer, head, dest_pos]
    attn_head_pattern_dest_src_pos                      [layer, head, dest_pos, src_pos]
    block_every                                         [3, layer, pos]  (resid_pre, attn_out, mlp_out)
    attn_head_all_pos_every                             [5, layer, head] (out, q, k, v, pattern)
    attn_head_by_pos_every                              [5, layer, pos, head]

("head out" is hook_z, each head's output before W_O, as in TransformerLens.) The engine
is gpt2lab.interp.patching's: the corrupted prompt's forward pass with one patch per
copy, so `batch=k` (a gpt2lab extra) runs k patches in one pass. `generic_activation_patch`
takes TransformerLens' patch setters for anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import product
from typing import Any

import torch

from ..errors import GPT2LabError
from ..interp.cache import get_act_name
from ..interp.patching import Patch, chunks, run_patched, scalar

ALL = slice(None)

# axis -> where it indexes the activation (after batch): vectors are [batch, pos, head, ...],
# patterns [batch, head, dest_pos, src_pos]
_VECTOR_AXES = {"pos": 0, "head": 1}
_PATTERN_AXES = {"head": 0, "dest_pos": 1, "src_pos": 2}


def _tokens(model: Any, corrupted_tokens: Any) -> torch.Tensor:
    if isinstance(corrupted_tokens, str):  # TransformerLens' run_with_hooks accepts text too
        corrupted_tokens = model.to_tokens(corrupted_tokens)
    if not isinstance(corrupted_tokens, torch.Tensor):
        raise GPT2LabError(
            f"corrupted_tokens must be a tensor of token ids [batch, pos], got "
            f"{type(corrupted_tokens).__name__}"
        )
    tokens = corrupted_tokens[None] if corrupted_tokens.dim() == 1 else corrupted_tokens
    return tokens.to(model.device)


def _clean(clean_cache: Any, name: str, like: torch.Tensor) -> torch.Tensor:
    try:
        clean = clean_cache[name]
    except KeyError:
        raise GPT2LabError(
            f"clean_cache has no {name!r}: cache the clean run with model.run_with_cache "
            "(without a names_filter that leaves it out)"
        ) from None
    if clean.shape != like.shape:
        raise GPT2LabError(
            f"clean_cache[{name!r}] is {tuple(clean.shape)} but the corrupted run's is "
            f"{tuple(like.shape)}: clean and corrupted prompts need the same shape"
        )
    return clean.to(like)


def _sweep(
    model: Any,
    corrupted_tokens: Any,
    clean_cache: Any,
    patching_metric: Callable[[torch.Tensor], Any],
    activation: str,
    axes: Sequence[str],
    batch: int = 1,
) -> torch.Tensor:
    """Patch `activation` at every index of `axes` (the first is always "layer")."""
    if not (isinstance(batch, int) and batch >= 1) or isinstance(batch, bool):
        raise GPT2LabError(f"batch must be a positive integer, got {batch!r}")
    tokens = _tokens(model, corrupted_tokens)
    cfg = model.cfg
    sizes = {"layer": cfg.n_layers, "pos": tokens.shape[1], "head": cfg.n_heads}
    sizes["dest_pos"] = sizes["src_pos"] = sizes["pos"]
    where = _PATTERN_AXES if activation == "pattern" else _VECTOR_AXES
    names = [get_act_name(activation, layer) for layer in range(cfg.n_layers)]
    _, recorded = run_patched(model, tokens, [[]], record=names)  # the corrupted shapes
    sources = [_clean(clean_cache, name, recorded[name]) for name in names]

    plan = []
    for out_index in product(*(range(sizes[a]) for a in axes)):
        index = [ALL] * (max(where[a] for a in axes[1:]) + 1)
        for axis, i in zip(axes[1:], out_index[1:], strict=True):
            index[where[axis]] = i
        layer = out_index[0]
        plan.append((out_index, Patch(names[layer], tuple(index), sources[layer])))

    values = torch.zeros([sizes[a] for a in axes], device=model.device)
    n = tokens.shape[0]
    for start in range(0, len(plan), batch):
        group = plan[start : start + batch]
        logits, _ = run_patched(model, tokens, [[patch] for _, patch in group])
        for (out_index, _), chunk in zip(group, chunks(logits, n), strict=True):
            values[out_index] = scalar(patching_metric(chunk))
    return values


def _make(activation: str, axes: tuple[str, ...], shape: str) -> Callable[..., torch.Tensor]:
    def patch(model, corrupted_tokens, clean_cache, patching_metric, *, batch: int = 1):
        return _sweep(
            model, corrupted_tokens, clean_cache, patching_metric, activation, axes, batch
        )

    patch.__doc__ = (
        f"Patch the clean run's {activation} into the corrupted run, one "
        f"{' x '.join(axes)} at a time; the metric of each, {shape}."
    )
    return patch


get_act_patch_resid_pre = _make("resid_pre", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_resid_mid = _make("resid_mid", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_attn_out = _make("attn_out", ("layer", "pos"), "[n_layers, pos]")
get_act_patch_mlp_out = _make("mlp_out", ("layer", "pos"), "[n_layers, pos]")

get_act_patch_attn_head_out_all_pos = _make("z", ("layer", "head"), "[n_layers, n_heads]")
get_act_patch_attn_head_q_all_pos = _make("q", ("layer", "head"), "[n_layers, n_heads]")
get_act_patch_attn_head_k_all_pos = _make("k", ("layer", "head"), "[n_layers, n_heads]")
get_act_patch_attn_head_v_all_pos = _make("v", ("layer", "head"), "[n_layers, n_heads]")
get_act_patch_attn_head_pattern_all_pos = _make("pattern", ("layer", "head"), "[n_layers, n_heads]")

_BY_POS = ("layer", "pos", "head")
get_act_patch_attn_head_out_by_pos = _make("z", _BY_POS, "[n_layers, pos, n_heads]")
get_act_patch_attn_head_q_by_pos = _make("q", _BY_POS, "[n_layers, pos, n_heads]")
get_act_patch_attn_head_k_by_pos = _make("k", _BY_POS, "[n_layers, pos, n_heads]")
get_act_patch_attn_head_v_by_pos = _make("v", _BY_POS, "[n_layers, pos, n_heads]")
get_act_patch_attn_head_pattern_by_pos = _make(
    "pattern", ("layer", "head", "dest_pos"), "[n_layers, n_heads, dest_pos]"
)
get_act_patch_attn_head_pattern_dest_src_pos = _make(
    "pattern",
    ("layer", "head", "dest_pos", "src_pos"),
    "[n_layers, n_heads, dest_pos, src_pos]",
)


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric, *, batch: int = 1):
    """resid_pre, attn_out and mlp_out patching stacked: [3, n_layers, pos]."""
    args = (model, corrupted_tokens, clean_cache, metric)
    return torch.stack(
        [
            get_act_patch_resid_pre(*args, batch=batch),
            get_act_patch_attn_out(*args, batch=batch),
            get_act_patch_mlp_out(*args, batch=batch),
        ]
    )


def get_act_patch_attn_head_all_pos_every(
    model, corrupted_tokens, clean_cache, metric, *, batch: int = 1
):
    """Every head's output, q, k, v and pattern patched over all positions, stacked:
    [5, n_layers, n_heads]."""
    args = (model, corrupted_tokens, clean_cache, metric)
    return torch.stack(
        [
            get_act_patch_attn_head_out_all_pos(*args, batch=batch),
            get_act_patch_attn_head_q_all_pos(*args, batch=batch),
            get_act_patch_attn_head_k_all_pos(*args, batch=batch),
            get_act_patch_attn_head_v_all_pos(*args, batch=batch),
            get_act_patch_attn_head_pattern_all_pos(*args, batch=batch),
        ]
    )


def get_act_patch_attn_head_by_pos_every(
    model, corrupted_tokens, clean_cache, metric, *, batch: int = 1
):
    """Every head's output, q, k, v and pattern patched position by position, stacked:
    [5, n_layers, pos, n_heads] (the pattern's destination position as `pos`)."""
    args = (model, corrupted_tokens, clean_cache, metric)
    pattern = get_act_patch_attn_head_pattern_by_pos(*args, batch=batch)
    return torch.stack(
        [
            get_act_patch_attn_head_out_by_pos(*args, batch=batch),
            get_act_patch_attn_head_q_by_pos(*args, batch=batch),
            get_act_patch_attn_head_k_by_pos(*args, batch=batch),
            get_act_patch_attn_head_v_by_pos(*args, batch=batch),
            pattern.transpose(1, 2),
        ]
    )


# ---- TransformerLens' generic form, with its patch setters --------------------------
def layer_pos_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, pos] on a [batch, pos, ...] activation."""
    _, pos = index
    corrupted_activation[:, pos, ...] = clean_activation[:, pos, ...]
    return corrupted_activation


def layer_pos_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, pos, head] on a [batch, pos, head, ...] activation."""
    _, pos, head = index
    corrupted_activation[:, pos, head] = clean_activation[:, pos, head]
    return corrupted_activation


def layer_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head] on a [batch, pos, head, ...] activation (every position)."""
    _, head = index
    corrupted_activation[:, :, head] = clean_activation[:, :, head]
    return corrupted_activation


def layer_head_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head] on a [batch, head, dest_pos, src_pos] pattern."""
    _, head = index
    corrupted_activation[:, head] = clean_activation[:, head]
    return corrupted_activation


def layer_head_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head, dest_pos] on a [batch, head, dest_pos, src_pos] pattern."""
    _, head, dest = index
    corrupted_activation[:, head, dest] = clean_activation[:, head, dest]
    return corrupted_activation


def layer_head_dest_src_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head, dest_pos, src_pos] on a pattern."""
    _, head, dest, src = index
    corrupted_activation[:, head, dest, src] = clean_activation[:, head, dest, src]
    return corrupted_activation


def generic_activation_patch(
    model: Any,
    corrupted_tokens: Any,
    clean_cache: Any,
    patching_metric: Callable[[torch.Tensor], Any],
    patch_setter: Callable[[torch.Tensor, Sequence[int], torch.Tensor], torch.Tensor],
    activation_name: str,
    index_axis_names: Sequence[str] | None = None,
    index_df: Any = None,
    return_index_df: bool = False,
):
    """TransformerLens' generic_activation_patch: for every index (a row of `index_df`, or
    every combination of `index_axis_names`, whose first axis is the layer), run the
    corrupted tokens with `patch_setter(corrupted_activation, index, clean_activation)`
    applied at `activation_name` of that layer, and record the metric. Axis names:
    layer, pos, head_index / head, src_pos, dest_pos. The result has one axis per index
    axis, or one value per row of `index_df` (a pandas DataFrame);
    `return_index_df=True` also returns the indices as a DataFrame (needs pandas)."""
    tokens = _tokens(model, corrupted_tokens)
    cfg = model.cfg
    if index_df is None:
        if index_axis_names is None:
            raise GPT2LabError("generic_activation_patch needs index_axis_names or index_df")
        sizes = {"layer": cfg.n_layers, "pos": tokens.shape[1], "head_index": cfg.n_heads}
        sizes.update(head=cfg.n_heads, src_pos=tokens.shape[1], dest_pos=tokens.shape[1])
        unknown = [a for a in index_axis_names if a not in sizes]
        if unknown:
            raise GPT2LabError(f"unknown index axis {unknown[0]!r}; choose from {', '.join(sizes)}")
        shape = [sizes[a] for a in index_axis_names]
        rows = [list(i) for i in product(*(range(s) for s in shape))]
        values = torch.zeros(shape, device=model.device)
    else:
        if index_axis_names is not None:
            raise GPT2LabError("give index_axis_names or index_df, not both")
        rows = [[int(v) for v in row] for row in index_df.itertuples(index=False)]
        values = torch.zeros(len(rows), device=model.device)

    for c, index in enumerate(rows):
        name = get_act_name(activation_name, index[0])
        clean = clean_cache[name]

        def hook(activation, hook, index=index, clean=clean):
            return patch_setter(activation.clone(), index, clean)

        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(name, hook)])
        values[c if index_df is not None else tuple(index)] = scalar(patching_metric(logits))

    if not return_index_df:
        return values
    if index_df is None:
        import pandas as pd

        index_df = pd.DataFrame(rows, columns=list(index_axis_names))
    return values, index_df
