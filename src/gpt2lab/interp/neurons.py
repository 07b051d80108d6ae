"""Neuron statistics over a corpus: what every unit of a hook does on real text.

For each hook with a unit axis (default `blocks.{l}.mlp.hook_post` of every layer; any
hook whose activation is [batch, pos, units] works, e.g. `hook_resid_post`), the corpus
streams through the model once and each unit accumulates, over the kept tokens only
(see `corpus.windows`' `drop`):

- count, mean, variance, skew and kurtosis. Each batch's centered moments are computed
  in float64 and merged into the running ones with Chan / Pebay's pairwise formulas, so
  there is no catastrophic cancellation however long the corpus. Variance is the
  population variance (numpy's `var`, ddof 0); skew and kurtosis are scipy's
  `skew(bias=True)` and `kurtosis(fisher=True, bias=True)` (excess kurtosis: 0 for a
  normal distribution);
- the fraction of tokens with activation > `threshold` (0 by default);
- a histogram with `bins` equal bins on [lo, hi), plus an underflow bin (< lo) first and
  an overflow bin (>= hi) last: bin = floor((x - lo) * bins / (hi - lo)), in float64;
- the `top_k` max-activating tokens: value, stream offset, document, position in the
  document, and the context the model saw around it (`context` = (before, after)
  tokens of the same window, with this unit's activation on each). Ties are broken by
  the lower stream offset, so the result does not depend on batching or processes;
- `n_random` random tokens (the same ones for every unit of a run) and one random token
  per histogram bin per unit (the quantile samples, below). Randomness is a hash of
  the token's stream offset and `seed` (splitmix64, top bit cleared): a token is
  sampled when its key is among the smallest, which is deterministic, needs no state
  beyond the samples, and merges across processes and resumed runs exactly.

Quantile samples: for a quantile q, `quantile_samples` returns the sample kept for the
histogram bin that holds the ceil(q * count)-th smallest activation (numpy's
`quantile(method="inverted_cdf")`), i.e. a uniformly random token among those whose
activation falls in the same bin as the q-quantile. Resolution is the bin width.

Memory is fixed: the state is O(units x (k x context + bins)), whatever the corpus.
Every `checkpoint_every` batches the state is written (safetensors, atomically) and a
run started again with `resume=True` continues from it; an interrupted and resumed run
equals an uninterrupted one bit for bit. Under torchrun each rank takes the batches b
with b % world == rank, and at the end the states are all-gathered and merged in rank
order (moments: the same pairwise formulas, so equal to one process up to rounding in
the last bits; counts, histograms, top-k and samples exactly).

Results: `DIR/neurons.safetensors` (every tensor, by `hook.field`) and
`DIR/neurons.json` (model name and weight fingerprint, hooks, corpus description and
hash, tokens seen, filters, parameters), read back by `load_stats`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import validate
from ..errors import GPT2LabError
from .corpus import TokenSource, Window, open_corpus, windows

FORMAT = "gpt2lab-neuron-stats"
VERSION = 1
RESULTS = "neurons.safetensors"
META = "neurons.json"
EMPTY = torch.iinfo(torch.int64).max  # key / offset of an empty sample slot
DEFAULT_QUANTILES = (0.5, 0.9, 0.99, 0.999)


# ---- randomness from offsets -------------------------------------------------------------
def sample_keys(offsets: torch.Tensor, seed: int) -> torch.Tensor:
    """splitmix64(offset + splitmix64(seed)) with the top bit cleared, as int64: a
    token's random key, fixed by where it is in the stream, not by when it was seen."""
    with np.errstate(over="ignore"):
        x = offsets.numpy().astype(np.uint64) + _splitmix(np.array([seed], dtype=np.uint64))
        return torch.from_numpy((_splitmix(x) >> np.uint64(1)).astype(np.int64))


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


# ---- the accumulation state of one hook --------------------------------------------------
@dataclass(frozen=True)
class Params:
    """What a run accumulates; a resumed run must have the same."""

    top_k: int = 20
    n_random: int = 8
    threshold: float = 0.0
    lo: float = -1.0
    hi: float = 5.0
    bins: int = 60
    before: int = 12
    after: int = 4
    seed: int = 0

    @property
    def width(self) -> int:  # context tokens kept per top-k entry
        return self.before + 1 + self.after


def empty_state(units: int, p: Params) -> dict[str, torch.Tensor]:
    """The state of a unit set that has seen nothing."""
    k, c, b2, r = p.top_k, p.width, p.bins + 2, p.n_random
    i64 = dict(dtype=torch.int64)
    return {
        "count": torch.zeros(1, **i64),
        "mean": torch.zeros(units, dtype=torch.float64),
        "m2": torch.zeros(units, dtype=torch.float64),
        "m3": torch.zeros(units, dtype=torch.float64),
        "m4": torch.zeros(units, dtype=torch.float64),
        "active": torch.zeros(units, **i64),
        "hist": torch.zeros(units, b2, **i64),
        "top_val": torch.full((units, k), -math.inf),
        "top_off": torch.full((units, k), EMPTY, **i64),
        "top_doc": torch.full((units, k), -1, **i64),
        "top_pos": torch.full((units, k), -1, **i64),
        "top_ctx": torch.full((units, k, c), -1, **i64),
        "top_act": torch.zeros(units, k, c),
        "rnd_key": torch.full((r,), EMPTY, **i64),
        "rnd_off": torch.full((r,), -1, **i64),
        "rnd_doc": torch.full((r,), -1, **i64),
        "rnd_pos": torch.full((r,), -1, **i64),
        "rnd_val": torch.zeros(units, r),
        "qs_key": torch.full((units, b2), EMPTY, **i64),
        "qs_val": torch.zeros(units, b2),
        "qs_off": torch.full((units, b2), -1, **i64),
        "qs_doc": torch.full((units, b2), -1, **i64),
        "qs_pos": torch.full((units, b2), -1, **i64),
    }


def batch_state(
    act: torch.Tensor, w: Window, keys: torch.Tensor, p: Params, floor: torch.Tensor | None = None
) -> dict:
    """The state of one batch: `act` [rows, seq, units] for the tokens of `w`; `keys`
    are the random keys of its kept tokens (in stream order). With `floor` [units] (the
    running state's k-th value), top-k candidates below it, which cannot enter the
    merged top-k, are left out (as empty slots) before their contexts are gathered.

    Units go through in chunks of CHUNK: each chunk's kept activations, transposed to
    [units, tokens] and widened to float64, stay in the CPU's cache while every
    statistic reads them (a whole batch would not fit: it would be read from memory
    once per statistic, which cost several times the forward pass)."""
    rows, seq, units = act.shape
    x = act.reshape(rows * seq, units).float()
    kept = w.keep.reshape(-1).nonzero().squeeze(1)
    xk = x.index_select(0, kept)
    n, b2 = len(kept), p.bins + 2
    if n == 0:
        return {"count": torch.tensor([0])} | {
            f: t for f, t in empty_state(units, p).items() if f != "count"
        }
    parts: dict[str, list[torch.Tensor]] = {
        f: [] for f in ("mean", "m2", "m3", "m4", "active", "hist", "qs_key", "top_idx")
    }
    scale, kk = p.bins / (p.hi - p.lo), min(p.top_k, n)
    for start in range(0, units, CHUNK):
        chunk = xk[:, start : start + CHUNK].T.contiguous()  # [c, n]
        c = len(chunk)
        x64 = chunk.double()
        mean = x64.mean(1, keepdim=True)
        d = x64 - mean
        d2 = d * d
        parts["mean"].append(mean.squeeze(1))
        parts["m2"].append(d2.sum(1))
        parts["m3"].append((d2 * d).sum(1))
        parts["m4"].append((d2 * d2).sum(1))
        parts["active"].append((chunk > p.threshold).sum(1))
        # bin 0: < lo, 1..bins: [lo + (i-1) w, lo + i w), bins + 1: >= hi; flat (unit, bin)
        cell = x64.sub_(p.lo).mul_(scale).floor_().clamp_(-1, p.bins)
        cell = cell.add_(torch.arange(1, c * b2 + 1, b2, dtype=torch.float64)[:, None]).long()
        parts["hist"].append(torch.bincount(cell.view(-1), minlength=c * b2).view(c, b2))
        best = torch.full((c * b2,), EMPTY, dtype=torch.int64)
        best.scatter_reduce_(0, cell.view(-1), keys.expand(c, n).reshape(-1), "amin")
        parts["qs_key"].append(best.view(c, b2))
        parts["top_idx"].append(_top_indices(chunk, kk))
    s = {f: torch.cat(t) for f, t in parts.items()}
    s["count"] = torch.tensor([n])
    s.update(_bin_samples(xk, s.pop("qs_key"), kept, keys, w))
    s.update(_random_samples(xk, kept, keys, w, p))
    s.update(_top(x, kept[s.pop("top_idx")], w, p, floor))
    return s


CHUNK = 64  # units per cache-sized block in batch_state (64 x 2048 tokens x 8 bytes = 1 MiB)


def _top_indices(chunk: torch.Tensor, kk: int) -> torch.Tensor:
    """Per row of `chunk` [units, tokens], the columns of its kk largest values, ties
    broken by the lower column (= the lower stream offset). topk is free to pick any of
    equal values at the boundary, so rows where the kk-th and the next value are equal
    are redone with a stable sort."""
    n = chunk.shape[1]
    vals, idx = chunk.topk(min(kk + 1, n), dim=1)
    if n > kk:
        tied = (vals[:, kk - 1] == vals[:, kk]).nonzero().squeeze(1)
        if len(tied):
            idx[tied] = chunk[tied].sort(dim=1, descending=True, stable=True).indices[:, : kk + 1]
    return idx[:, :kk]


def _bin_samples(xk, best, kept, keys, w) -> dict:
    """Per (unit, bin), the kept token of smallest key whose activation is in that bin
    (`best`: those keys [units, bins + 2], EMPTY where the bin is empty)."""
    units, b2 = best.shape
    flat = best.view(-1)
    found = (flat != EMPTY).nonzero().squeeze(1)
    order = keys.argsort()
    token = order[torch.searchsorted(keys[order], flat[found])]  # row of xk with that key
    out = {"qs_key": best}
    for name, src in (("off", w.offset), ("doc", w.doc), ("pos", w.pos)):
        t = torch.full((units * b2,), -1, dtype=torch.int64)
        t[found] = src.reshape(-1)[kept[token]]
        out[f"qs_{name}"] = t.view(units, b2)
    val = torch.zeros(units * b2)
    val[found] = xk[token, found // b2]
    out["qs_val"] = val.view(units, b2)
    return out


def _random_samples(xk, kept, keys, w, p: Params) -> dict:
    take = keys.argsort()[: p.n_random]
    r = p.n_random
    out = {
        "rnd_key": _pad1(keys[take], r, EMPTY),
        "rnd_off": _pad1(w.offset.reshape(-1)[kept[take]], r, -1),
        "rnd_doc": _pad1(w.doc.reshape(-1)[kept[take]], r, -1),
        "rnd_pos": _pad1(w.pos.reshape(-1)[kept[take]], r, -1),
    }
    val = torch.zeros(xk.shape[1], r)
    val[:, : len(take)] = xk[take].T
    out["rnd_val"] = val
    return out


def _pad1(t: torch.Tensor, size: int, fill: int) -> torch.Tensor:
    return torch.cat([t, torch.full((size - len(t),), fill, dtype=t.dtype)])


def _top(x: torch.Tensor, idx: torch.Tensor, w: Window, p: Params, floor=None) -> dict:
    """The top entries at token rows `idx` [units, kk] of `x` [tokens, units], with the
    context the model saw around each (the same window's tokens, this unit's values);
    entries below `floor` become empty slots."""
    seq, width = w.tokens.shape[1], p.width
    units, kk = idx.shape
    unit = torch.arange(units)[:, None].expand(units, kk)
    vals = x[idx, unit]
    live = torch.ones_like(vals, dtype=torch.bool) if floor is None else vals >= floor[:, None]
    u, i = live.nonzero(as_tuple=True)
    t = idx[u, i]  # the live entries' token rows
    col = t % seq
    ctx_col = col[:, None] + torch.arange(-p.before, p.after + 1)  # [live, width]
    inside = (ctx_col >= 0) & (ctx_col < seq)
    flat = (t - col)[:, None] + ctx_col.clamp(0, seq - 1)
    out = {
        "top_val": torch.full((units, kk), -math.inf),
        "top_off": torch.full((units, kk), EMPTY, dtype=torch.int64),
        "top_doc": torch.full((units, kk), -1, dtype=torch.int64),
        "top_pos": torch.full((units, kk), -1, dtype=torch.int64),
        "top_ctx": torch.full((units, kk, width), -1, dtype=torch.int64),
        "top_act": torch.zeros(units, kk, width),
    }
    out["top_val"][u, i] = vals[u, i]
    for name, src in (("off", w.offset), ("doc", w.doc), ("pos", w.pos)):
        out[f"top_{name}"][u, i] = src.reshape(-1)[t]
    out["top_ctx"][u, i] = w.tokens.reshape(-1)[flat].masked_fill(~inside, -1)
    out["top_act"][u, i] = x[flat, u[:, None]].masked_fill(~inside, 0.0)
    return out


def merge(a: dict, b: dict, p: Params) -> dict:
    """The state of the union of two disjoint token sets (Chan / Pebay for moments)."""
    na, nb = a["count"].double(), b["count"].double()
    n = na + nb
    out = {"count": a["count"] + b["count"]}
    if nb.item() == 0:
        out.update({f: a[f] for f in ("mean", "m2", "m3", "m4")})
    elif na.item() == 0:
        out.update({f: b[f] for f in ("mean", "m2", "m3", "m4")})
    else:
        delta = b["mean"] - a["mean"]
        d_n = delta / n
        out["mean"] = a["mean"] + d_n * nb
        out["m2"] = a["m2"] + b["m2"] + delta * d_n * na * nb
        out["m3"] = (
            a["m3"] + b["m3"]
            + delta * d_n * d_n * na * nb * (na - nb)
            + 3.0 * d_n * (na * b["m2"] - nb * a["m2"])
        )  # fmt: skip
        out["m4"] = (
            a["m4"] + b["m4"]
            + delta * d_n**3 * na * nb * (na * na - na * nb + nb * nb)
            + 6.0 * d_n * d_n * (na * na * b["m2"] + nb * nb * a["m2"])
            + 4.0 * d_n * (na * b["m3"] - nb * a["m3"])
        )  # fmt: skip
    out["active"] = a["active"] + b["active"]
    out["hist"] = a["hist"] + b["hist"]
    # top-k: sort by offset (ascending), then stably by value (descending), keep k
    off = torch.cat([a["top_off"], b["top_off"]], 1)
    by_off = off.argsort(dim=1, stable=True)
    val = torch.cat([a["top_val"], b["top_val"]], 1).gather(1, by_off)
    perm = by_off.gather(1, val.argsort(dim=1, descending=True, stable=True))[:, : p.top_k]
    for f in ("top_val", "top_off", "top_doc", "top_pos"):
        out[f] = torch.cat([a[f], b[f]], 1).gather(1, perm)
    for f in ("top_ctx", "top_act"):
        both = torch.cat([a[f], b[f]], 1)
        out[f] = both.gather(1, perm[..., None].expand(-1, -1, both.shape[2]))
    # random samples: the n_random smallest keys
    take = torch.cat([a["rnd_key"], b["rnd_key"]]).argsort(stable=True)[: p.n_random]
    for f in ("rnd_key", "rnd_off", "rnd_doc", "rnd_pos"):
        out[f] = torch.cat([a[f], b[f]])[take]
    out["rnd_val"] = torch.cat([a["rnd_val"], b["rnd_val"]], 1)[:, take]
    # per-bin samples: the smaller key wins
    new = b["qs_key"] < a["qs_key"]
    for f in ("qs_key", "qs_val", "qs_off", "qs_doc", "qs_pos"):
        out[f] = torch.where(new, b[f], a[f])
    return out


def finish(s: dict) -> dict:
    """Derived statistics of a state: variance, skew, kurtosis, fraction active."""
    n = s["count"].double()
    m2 = s["m2"] / n
    return {
        "var": m2,
        "skew": (s["m3"] / n) / m2**1.5,
        "kurtosis": (s["m4"] / n) / (m2 * m2) - 3.0,
        "frac_active": s["active"].double() / n,
    }


# ---- the run -----------------------------------------------------------------------------
def default_hooks(model) -> list[str]:
    return [f"blocks.{layer}.mlp.hook_post" for layer in range(model.cfg.n_layers)]


def hook_name(model_or_stats, hook: str | int) -> str:
    """A hook name; a layer number means that layer's `mlp.hook_post`."""
    if validate.is_int(hook):
        return f"blocks.{int(hook)}.mlp.hook_post"
    if not isinstance(hook, str):
        raise GPT2LabError(f"hook must be a hook name or a layer number, got {validate.show(hook)}")
    return hook


def _unit_counts(model, hooks: list[str]) -> dict[str, int]:
    """Each hook's number of units, from a two-token forward; a hook whose activation is
    not [batch, pos, units] has no unit axis and is refused."""
    for h in hooks:
        if h not in model.hook_dict:
            close = [n for n in model.hook_dict if n.endswith(h.split(".")[-1])][:3]
            hint = f" (e.g. {', '.join(close)})" if close else ""
            raise GPT2LabError(f"unknown hook {h!r}{hint}")
    shapes: dict[str, tuple] = {}

    def grab(act, hook):
        shapes[hook.name] = tuple(act.shape)

    with torch.inference_mode(), model.hooks([(h, grab) for h in hooks]):
        model(torch.zeros(1, 2, dtype=torch.long), return_type=None)
    for h in hooks:
        if len(shapes[h]) != 3:
            raise GPT2LabError(
                f"hook {h!r} has activations of shape {list(shapes[h])}, not "
                "[batch, pos, units]: it has no neuron axis"
            )
    return {h: shapes[h][2] for h in hooks}


def model_fingerprint(model) -> str:
    """sha256 of the model's configuration and every parameter's bytes (16 hex digits)."""
    digest = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for name, t in model.state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _stop_layer(hooks: list[str]) -> int | None:
    """Blocks to run: up to the last hooked one (no unembedding: nothing reads it)."""
    layers = []
    for h in hooks:
        parts = h.split(".")
        if parts[0] != "blocks":
            return None
        layers.append(int(parts[1]))
    return max(layers) + 1


def neuron_stats(
    model,
    corpus,
    *,
    hooks: Sequence[str] | None = None,
    seq_len: int = 128,
    batch_size: int = 8,
    max_tokens: int | None = None,
    top_k: int = 20,
    n_random: int = 8,
    threshold: float = 0.0,
    lo: float = -1.0,
    hi: float = 5.0,
    bins: int = 60,
    context: tuple[int, int] = (12, 4),
    drop: Sequence[str] = ("<|endoftext|>",),
    seed: int = 0,
    split: str = "train",
    out: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    max_batches: int | None = None,
    progress: bool | None = None,
) -> NeuronStats:
    """Stream `corpus` (a path, paths or an `open_corpus` source) through `model` and
    return the statistics of every unit of `hooks` (see the module notes).

    With `out`, the state is checkpointed there every `checkpoint_every` batches and the
    results are written at the end; `resume=True` continues from the checkpoint.
    `max_batches` stops this call after that many batches (checkpointing first): the
    result then has `complete` False and a later `resume=True` call finishes the job."""
    hooks = default_hooks(model) if hooks is None else [hook_name(model, h) for h in hooks]
    if not hooks or len(set(hooks)) != len(hooks):
        raise GPT2LabError("hooks must name at least one hook, each once")
    seq_len = validate.integer("seq_len", seq_len, 1, model.cfg.n_ctx)
    before, after = _context(context)
    p = Params(
        top_k=validate.integer("top_k", top_k, 1),
        n_random=validate.integer("n_random", n_random, 0),
        threshold=validate.number("threshold", threshold),
        lo=validate.number("lo", lo),
        hi=validate.number("hi", hi),
        bins=validate.integer("bins", bins, 1, 100_000),
        before=before,
        after=after,
        seed=validate.integer("seed", seed, 0, 2**63 - 1),
    )
    if p.hi <= p.lo:
        raise GPT2LabError(f"hi must be greater than lo, got lo={p.lo:g}, hi={p.hi:g}")
    checkpoint_every = validate.integer("checkpoint_every", checkpoint_every, 1)
    if max_batches is not None:
        max_batches = validate.integer("max_batches", max_batches, 1)
    source = (
        corpus
        if isinstance(corpus, TokenSource)
        else open_corpus(corpus, model.tokenizer, split=split)
    )
    units = _unit_counts(model, hooks)
    rank, world = _ranks()
    settings = {
        "params": dict(vars(p)),
        "hooks": units,
        "seq_len": seq_len,
        "batch_size": validate.integer("batch_size", batch_size, 1),
        "max_tokens": max_tokens,
        "drop": list(drop) if validate.as_list(drop) is not None else drop,
        "corpus": {k: v for k, v in source.description.items() if k != "tokens"},
        "world": world,
    }
    out = Path(out) if out is not None else None
    state_file = (
        out / (f"state-{rank}-of-{world}.safetensors" if world > 1 else "state.safetensors")
        if out
        else None
    )
    states = {h: empty_state(n, p) for h, n in units.items()}
    start, tokens_read = 0, 0
    if resume:
        if state_file is None:
            raise GPT2LabError("resume needs out (the folder holding the checkpoint)")
        states, start, tokens_read = _load_state(state_file, settings)
    stream = windows(source, seq_len=seq_len, batch_size=settings["batch_size"],
                     max_tokens=max_tokens, start=start, rank=rank, world=world, drop=drop)  # fmt: skip
    total = 0  # batches this process will run; counted only when a bar shows it
    from ..progress import progress_bar, resolve

    if resolve(progress) is not None:
        total = _total_batches(
            source, seq_len * settings["batch_size"], max_tokens, world, rank, start
        )
    now: dict = {}

    def accumulate(name: str):
        def fn(act: torch.Tensor, hook) -> None:
            state, act = states[name], act.detach().float().cpu()  # the state lives on the CPU
            batch = batch_state(act, now["w"], now["keys"], p, floor=state["top_val"][:, -1])
            states[name] = merge(state, batch, p)

        return fn

    done, next_batch, complete = 0, start, True
    device = next(model.parameters()).device
    stop = _stop_layer(hooks)
    with (
        torch.inference_mode(),
        model.hooks([(h, accumulate(h)) for h in hooks]),
        progress_bar(total, "neuron stats", progress, unit="batches") as advance,
    ):
        for w in stream:
            now["w"] = w
            now["keys"] = sample_keys(w.offset.reshape(-1)[w.keep.reshape(-1)], p.seed)
            tokens = w.tokens.to(device)
            if stop is None:
                model(tokens, return_type=None)
            else:
                model(tokens, stop_at_layer=stop)
            tokens_read += int((w.offset >= 0).sum())
            done, next_batch = done + 1, w.index + 1
            advance(1)
            if state_file and done % checkpoint_every == 0:
                _save_state(state_file, states, settings, next_batch, tokens_read)
            if max_batches is not None and done >= max_batches:
                complete = False
                break
    if state_file:
        _save_state(state_file, states, settings, next_batch, tokens_read)
    if not complete:
        return _result(model, states, settings, tokens_read, complete=False)
    if world > 1:
        states, tokens_read = _gather(states, p, tokens_read)
    result = _result(model, states, settings, tokens_read, complete=True)
    if out is not None and rank == 0:
        result.save(out)
    return result


def _context(context) -> tuple[int, int]:
    items = validate.as_list(context)
    if items is None or len(items) != 2:
        raise GPT2LabError(f"context must be (before, after), got {validate.show(context)}")
    return validate.integer("context before", items[0], 0, 4096), validate.integer(
        "context after", items[1], 0, 4096
    )


def _ranks() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _total_batches(source, per_batch, max_tokens, world, rank, start) -> int:
    n = source.count_tokens() if max_tokens is None else max_tokens
    if "tokens" in source.description:  # known without a pass (shards): the smaller
        n = min(n, source.description["tokens"])
    batches = -(-n // per_batch)
    return sum(1 for b in range(start, batches) if b % world == rank)


def _gather(states: dict, p: Params, tokens_read: int) -> tuple[dict, int]:
    """All ranks' states, merged in rank order (the same on every rank)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    merged = {}
    for h, s in states.items():
        parts: list[dict] = [{} for _ in range(world)]
        for f, t in s.items():
            got = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(got, t.contiguous())
            for r in range(world):
                parts[r][f] = got[r]
        acc = parts[0]
        for part in parts[1:]:
            acc = merge(acc, part, p)
        merged[h] = acc
    total = torch.tensor([tokens_read])
    dist.all_reduce(total)
    return merged, int(total.item())


# ---- checkpoints -------------------------------------------------------------------------
def _save_state(path: Path, states: dict, settings: dict, next_batch: int, tokens: int) -> None:
    from safetensors.torch import save_file

    validate.output_folder(path.parent)
    meta = {"settings": settings, "next_batch": next_batch, "tokens_read": tokens}
    tensors = {f"{h}.{f}": t.contiguous() for h, s in states.items() for f, t in s.items()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={"gpt2lab": json.dumps(meta)})
        os.replace(tmp, path)
    except OSError as e:
        raise GPT2LabError(f"cannot write the checkpoint {path}: {e.strerror or e}") from None


def _read(path: Path, what: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    if not path.is_file():
        raise GPT2LabError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["gpt2lab"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own errors have no common base worth naming
        raise GPT2LabError(
            f"{what} {path} is not readable: {str(e).splitlines()[0][:200]}"
        ) from None
    return meta, tensors


def _load_state(path: Path, settings: dict) -> tuple[dict, int, int]:
    meta, tensors = _read(path, "checkpoint")
    if meta.get("settings") != json.loads(json.dumps(settings)):
        raise GPT2LabError(
            f"checkpoint {path} was made with other settings (hooks, corpus or parameters); "
            "rerun without resume or with the same settings"
        )
    p = Params(**settings["params"])
    states = {}
    for h, units in settings["hooks"].items():
        want = empty_state(units, p)
        states[h] = {f: tensors.get(f"{h}.{f}") for f in want}
        for f, t in want.items():
            got = states[h][f]
            if got is None or got.shape != t.shape or got.dtype != t.dtype:
                raise GPT2LabError(f"checkpoint {path} is damaged: {h}.{f} is missing or malformed")
    return states, int(meta["next_batch"]), int(meta["tokens_read"])


# ---- results -----------------------------------------------------------------------------
def _result(model, states, settings, tokens_read, complete: bool) -> NeuronStats:
    tensors = {}
    for h, s in states.items():
        for f, t in {**s, **finish(s)}.items():
            tensors[f"{h}.{f}"] = t
    kept = {h: int(s["count"].item()) for h, s in states.items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "complete": complete,
        "model": {
            "name": model.cfg.model_name,
            "fingerprint": model_fingerprint(model),
            "n_layers": model.cfg.n_layers,
            "d_model": model.cfg.d_model,
        },
        "hooks": settings["hooks"],
        "corpus": settings["corpus"],
        "tokens_read": tokens_read,
        "tokens_kept": kept,
        "filters": {"drop": settings["drop"]},
        "seq_len": settings["seq_len"],
        "batch_size": settings["batch_size"],
        "max_tokens": settings["max_tokens"],
        "params": settings["params"],
        "kurtosis": "excess (fisher=True, bias=True)",
        "variance": "population (ddof=0)",
    }
    return NeuronStats(meta, tensors)


@dataclass
class NeuronStats:
    """Results of `neuron_stats`: `meta` (JSON) and `tensors` by "hook.field"."""

    meta: dict
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def hooks(self) -> list[str]:
        return list(self.meta["hooks"])

    @property
    def params(self) -> Params:
        return Params(**self.meta["params"])

    def _hook(self, hook) -> str:
        name = hook_name(self, hook)
        if name not in self.meta["hooks"]:
            raise GPT2LabError(f"no statistics for hook {name!r}; have {', '.join(self.hooks)}")
        return name

    def get(self, hook, name: str) -> torch.Tensor:
        """One tensor of one hook: count, mean, var, skew, kurtosis, frac_active, hist, ..."""
        return self.tensors[f"{self._hook(hook)}.{name}"]

    def _neuron(self, hook, neuron) -> tuple[str, int]:
        h = self._hook(hook)
        n = validate.integer("neuron", neuron, 0, self.meta["hooks"][h] - 1)
        return h, n

    def summary(self, hook, neuron) -> dict:
        """The scalar statistics of one unit."""
        h, n = self._neuron(hook, neuron)
        out = {"count": int(self.get(h, "count").item())}
        for f in ("mean", "var", "skew", "kurtosis", "frac_active"):
            out[f] = float(self.get(h, f)[n])
        return out

    def edges(self) -> torch.Tensor:
        """The histogram's bin edges (bins + 1 of them; under/overflow lie outside)."""
        p = self.params
        return torch.linspace(p.lo, p.hi, p.bins + 1, dtype=torch.float64)

    def top(self, hook, neuron, k: int | None = None) -> list[dict]:
        """The top-k contexts of one unit, best first: value, offset, doc, pos, and the
        context's tokens and activations (`at` is the max token's index in them)."""
        h, n = self._neuron(hook, neuron)
        k = self.params.top_k if k is None else validate.integer("k", k, 1)
        rows = []
        for i in range(min(k, self.params.top_k)):
            if self.get(h, "top_off")[n, i] == EMPTY:
                break
            ctx = self.get(h, "top_ctx")[n, i]
            inside = ctx >= 0
            rows.append({
                "value": float(self.get(h, "top_val")[n, i]),
                "offset": int(self.get(h, "top_off")[n, i]),
                "doc": int(self.get(h, "top_doc")[n, i]),
                "pos": int(self.get(h, "top_pos")[n, i]),
                "tokens": ctx[inside].tolist(),
                "acts": self.get(h, "top_act")[n, i][inside].tolist(),
                "at": int(inside[: self.params.before].sum()),
            })  # fmt: skip
        return rows

    def random_samples(self, hook, neuron) -> list[dict]:
        h, n = self._neuron(hook, neuron)
        keys = self.get(h, "rnd_key")
        return [
            {
                "value": float(self.get(h, "rnd_val")[n, i]),
                "offset": int(self.get(h, "rnd_off")[i]),
                "doc": int(self.get(h, "rnd_doc")[i]),
                "pos": int(self.get(h, "rnd_pos")[i]),
            }
            for i in range(len(keys))
            if keys[i] != EMPTY
        ]

    def quantile_samples(self, hook, neuron, quantiles=DEFAULT_QUANTILES) -> list[dict]:
        """For each q, a random token from the histogram bin holding the q-quantile."""
        h, n = self._neuron(hook, neuron)
        count = int(self.get(h, "count").item())
        cum = self.get(h, "hist")[n].cumsum(0)
        out = []
        for q in validate.as_list(quantiles) or []:
            q = validate.number("quantile", q, 0.0, 1.0)
            rank = max(1, math.ceil(q * count))
            b = int(torch.searchsorted(cum, torch.tensor(rank), right=False))
            out.append({
                "quantile": q,
                "bin": b,
                "value": float(self.get(h, "qs_val")[n, b]),
                "offset": int(self.get(h, "qs_off")[n, b]),
                "doc": int(self.get(h, "qs_doc")[n, b]),
                "pos": int(self.get(h, "qs_pos")[n, b]),
            })  # fmt: skip
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / (RESULTS + ".tmp")
            save_file({k: t.contiguous() for k, t in self.tensors.items()}, str(tmp))
            os.replace(tmp, directory / RESULTS)
            (directory / META).write_text(json.dumps(self.meta, indent=1) + "\n")
        except OSError as e:
            raise GPT2LabError(f"cannot write results to {directory}: {e.strerror or e}") from None
        return directory


def load_stats(directory: str | os.PathLike) -> NeuronStats:
    """Results written by `neuron_stats(out=...)` or `gpt2lab neurons stats`."""
    from safetensors import safe_open

    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.is_file():
        raise GPT2LabError(f"{directory} holds no neuron statistics ({META} is missing)")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError):
        raise GPT2LabError(f"{meta_path} is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GPT2LabError(f"{meta_path} is not a gpt2lab neuron-statistics file")
    path = directory / RESULTS
    if not path.is_file():
        raise GPT2LabError(f"{path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise GPT2LabError(f"{path} is not readable: {str(e).splitlines()[0][:200]}") from None
    return NeuronStats(meta, tensors)
