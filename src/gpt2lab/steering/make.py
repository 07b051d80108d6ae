"""Making steering vectors from text: ActAdd, mean difference, reading vectors.

- `actadd` (Turner et al., "Activation Addition"): the activations of two prompts at a
  hook, the shorter right-padded with " " tokens to the longer's length; the difference
  is a sequence [n, width], added at the first n positions of the steered text.
- `mean_difference` (CAA, Rimsky et al.; Marks & Tegmark's mass-mean probe): the mean
  activation over positive texts minus that over negative texts, read at one position
  of each text (the last token by default, or the mean over its tokens).
- `reading_vector` (RepE, Zou et al.): the first principal component of the paired
  differences a(positive_i) - a(negative_i). RepE randomly swaps each pair's order before
  a centred PCA so the differences are symmetric about 0; the first right singular
  vector of the unswapped differences is that same axis, without the randomness. Its
  sign is chosen so that positives project higher than their negatives in most pairs.
  Unit norm: coefficients are in units of the residual stream.

Activations are read with the plain forward pass inside `run_with_cache`, text batches
left-padded (so the last column is every text's last token) with the model's BOS
default. The vector's record names the method, hooks, read position and a hash of the
texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import GPT2LabError
from ..validate import integer, show
from .vector import SteeringVector, hook_width, model_record, texts_digest

READS = ("last", "mean")


def hook_names(
    model: Any, hooks: Any = None, layers: Any = None, site: str = "resid_pre"
) -> list[str]:
    """Hook names from `hooks` (a name or a list) or from `layers` (an int or a list)
    at `site` ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")."""
    if (hooks is None) == (layers is None):
        raise GPT2LabError(
            "name the hooks (hooks=...) or the layers (layers=..., site=...), one of them"
        )
    if layers is not None:
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if not isinstance(layers, (list, tuple, range)) or not layers:
            raise GPT2LabError(
                f"layers must be a layer index or a list of them, got {show(layers)}"
            )
        n = model.cfg.n_layers
        hooks = [f"blocks.{integer('layer', layer, 0, n - 1)}.hook_{site}" for layer in layers]
    if isinstance(hooks, str):
        hooks = [hooks]
    if not isinstance(hooks, (list, tuple)) or not hooks:
        raise GPT2LabError(f"hooks must be a hook name or a list of them, got {show(hooks)}")
    for hook in hooks:
        hook_width(model, hook)  # known, with a unit axis
    return list(dict.fromkeys(hooks))


def _texts(name: str, texts: Any) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts:
        raise GPT2LabError(f"{name} must be a non-empty list of texts, got {show(texts)}")
    for t in texts:
        if not isinstance(t, str) or not t:
            raise GPT2LabError(f"{name} holds an empty or non-text item: {show(t)}")
    return list(texts)


def _read(
    model: Any, texts: list[str], hooks: list[str], read: Any, batch_size: int
) -> dict[str, torch.Tensor]:
    """Activations [len(texts), width] at each hook, read at `read` of each text."""
    if not (read in READS or (isinstance(read, int) and not isinstance(read, bool))):
        raise GPT2LabError(f"read must be 'last', 'mean' or a token index, got {show(read)}")
    out: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        tokens, mask = model.to_tokens(chunk, padding_side="left", return_mask=True)
        if tokens.shape[1] > model.cfg.n_ctx:
            raise GPT2LabError(
                f"a text is {tokens.shape[1]} tokens, longer than the context ({model.cfg.n_ctx})"
            )
        real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
        lengths = real.sum(1)
        with torch.inference_mode():
            _, cache = model.run_with_cache(
                tokens, attention_mask=mask, names_filter=hooks, return_type=None
            )
        for h in hooks:
            acts = cache[h].float()  # [b, pos, width]
            if read == "last":
                got = acts[:, -1]
            elif read == "mean":
                got = (acts * real[..., None]).sum(1) / lengths[:, None]
            else:
                k = read if read >= 0 else None
                if k is None or bool((lengths <= k).any()):
                    raise GPT2LabError(
                        f"read={read}: every text needs more than {read} tokens (shortest: "
                        f"{int(lengths.min())})"
                    )
                col = tokens.shape[1] - lengths + k  # left padding: real tokens at the end
                got = acts[torch.arange(len(chunk)), col]
            out[h].append(got.cpu())
    return {h: torch.cat(v) for h, v in out.items()}


def _contrast(model, positive, negative, hooks, layers, site, read, batch_size, *, paired):
    """The checked hooks and texts of a contrast, and each text set's activations there
    ([texts, width] per hook, read at `read`); `paired`: positive[i] pairs with negative[i]."""
    hooks = hook_names(model, hooks, layers, site)
    positive, negative = _texts("positive", positive), _texts("negative", negative)
    if paired:
        if len(positive) != len(negative):
            raise GPT2LabError(
                f"reading vectors pair the texts: {len(positive)} positive and {len(negative)} "
                "negative texts"
            )
        if len(positive) < 2:
            raise GPT2LabError(
                "a reading vector needs at least 2 pairs (a principal component of 1 is its difference)"
            )
    batch_size = integer("batch_size", batch_size, 1)
    pos = _read(model, positive, hooks, read, batch_size)
    neg = _read(model, negative, hooks, read, batch_size)
    return hooks, positive, negative, pos, neg


def _record(model, method: str, hooks, read, data, extra=None) -> dict[str, Any]:
    return {
        "method": method, "model": model_record(model), "hooks": hooks, "read": read,
        "data": data, **(extra or {}),
    }  # fmt: skip


def actadd(
    model: Any,
    positive: str,
    negative: str,
    *,
    hooks: Any = None,
    layers: Any = None,
    site: str = "resid_pre",
    prepend_bos: bool | None = None,
) -> SteeringVector:
    """ActAdd: act(positive) - act(negative) at each position, as a sequence."""
    hooks = hook_names(model, hooks, layers, site)
    for name, text in (("positive", positive), ("negative", negative)):
        if not isinstance(text, str) or not text:
            raise GPT2LabError(f"the {name} prompt must be non-empty text, got {show(text)}")
    tok = model.tokenizer
    bos = model._bos(prepend_bos)
    ids = [([tok.eot_token] if bos else []) + tok.encode(t) for t in (positive, negative)]
    n = max(len(i) for i in ids)
    if n > model.cfg.n_ctx:
        raise GPT2LabError(f"a prompt is {n} tokens, longer than the context ({model.cfg.n_ctx})")
    space = tok.encode(" ")[0]
    tokens = torch.tensor([i + [space] * (n - len(i)) for i in ids], device=model.device)
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=hooks, return_type=None)
    directions = {h: (cache[h][0] - cache[h][1]).float().cpu() for h in hooks}
    data = {"positive": positive, "negative": negative, "hash": texts_digest(positive, negative),
            "padding": "right, with ' ' tokens", "prepend_bos": bos}  # fmt: skip
    return SteeringVector(directions, _record(model, "actadd", hooks, "sequence", data))


def mean_difference(
    model: Any,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    hooks: Any = None,
    layers: Any = None,
    site: str = "resid_pre",
    read: Any = "last",
    batch_size: int = 32,
) -> SteeringVector:
    """mean(act(positive)) - mean(act(negative)) at `read` of each text."""
    hooks, positive, negative, pos, neg = _contrast(
        model, positive, negative, hooks, layers, site, read, batch_size, paired=False
    )
    directions = {
        h: pos[h].double().mean(0).float() - neg[h].double().mean(0).float() for h in hooks
    }
    data = {"positive": len(positive), "negative": len(negative),
            "hash": texts_digest(positive, negative)}  # fmt: skip
    return SteeringVector(directions, _record(model, "mean_difference", hooks, read, data))


def reading_vector(
    model: Any,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    hooks: Any = None,
    layers: Any = None,
    site: str = "resid_pre",
    read: Any = "last",
    batch_size: int = 32,
) -> SteeringVector:
    """RepE's reading vector from paired texts (positive[i] pairs with negative[i])."""
    hooks, positive, negative, pos, neg = _contrast(
        model, positive, negative, hooks, layers, site, read, batch_size, paired=True
    )
    directions, agreement = {}, {}
    for h in hooks:
        diffs = (pos[h] - neg[h]).double()
        _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
        axis = vh[0]
        votes = torch.sign(diffs @ axis)
        if votes.sum() < 0:
            axis, votes = -axis, -votes
        directions[h] = axis.float()
        agreement[h] = float((votes > 0).double().mean())
    data = {"pairs": len(positive), "hash": texts_digest(positive, negative)}
    extra = {"norm": "unit", "pairs_ordered": agreement}
    return SteeringVector(directions, _record(model, "reading_vector", hooks, read, data, extra))
