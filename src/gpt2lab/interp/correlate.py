"""Cross-model neuron correlations: which neurons of one model have a twin in another.

Gurnee et al. 2024, "Universal Neurons in GPT2 Language Models": run two models with the
same tokenizer over one token stream and, for every pair of neurons (one per model) of
the chosen layer pairs, take the Pearson correlation of their activations over the kept
tokens. A neuron's best match is its largest r in the other model. The baseline asks
what the best match would be if the other model's neurons were arbitrary directions of
the same activation space: its activations of each layer are rotated by a Haar-random
orthogonal Q (QR of a Gaussian matrix, signs fixed by diag(R)). The reference code's
"rotation" is a Gaussian matrix with normalised rows, which is not orthogonal, so it
changes the variances it compares against; ours is checked to satisfy Q^T Q = I.

    excess = best r - best r under the rotation baseline
    universal = excess > threshold          (0.5 by default, as in the paper)

The paper averages both terms over four other seeds; with one other model the mean is
over one, so the criterion is the same formula.

How it streams, exactly and in bounded memory
---------------------------------------------
Everything is float64. Each neuron's activations are shifted by a per-neuron reference
(its mean over the first window of the stream, the same on every rank), so the sums
below stay small and the textbook formula loses no precision:

    n, Sx = sum x', Sxx = sum x'^2 per neuron,  Sxy = sum x' y'^T per layer pair
    r = (Sxy - Sx Sy^T / n) / sqrt((Sxx - Sx^2 / n)(Syy - Sy^2 / n))

The rotated baseline needs no second co-moment: cov(x, yQ) = cov(x, y) Q, and the
rotated variances are per-neuron sums of (y' Q)^2 accumulated alongside.

The co-moments of all layer pairs can be far larger than memory (two gpt2-medium:
98,304^2 pairs, 77 GB). They are accumulated in passes: `plan_passes` packs the
(layer_a, layer_b) blocks into groups whose accumulators fit `memory_gb`, and each pass
streams the corpus once for its group. When a pass ends its blocks are turned into
correlations, folded into each neuron's running best / worst / baseline match and
freed (optionally written to disk in float16). Memory, in bytes, of one pass:

    8 * sum over its blocks of d_a * d_b          co-moments
  + 8 * sum over its layers of d^2                 the rotations Q of those layers
  + 12 * tokens_per_batch * sum of its layer widths   one batch's activations
  + 32 * max block size                            finishing a block (cov, r, rotated r)

The models and the per-neuron vectors come on top. The result records the plan, the
formula's figure and the measured peak RSS.

Checkpoints hold the current pass's sums and the finished passes' matches; a resumed
run continues from the next window and equals an uninterrupted one bit for bit. Under
torchrun each rank takes every world-th window (`windows(rank=, world=)`) and the sums
are all-reduced at the end of every pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import GPT2LabError
from ..progress import progress_bar, resolve
from ..validate import boolean, integer, number, output_folder, show
from .corpus import drop_ids, open_corpus
from .corpus import windows as corpus_windows

DEFAULT_HOOK = "blocks.{layer}.mlp.hook_post"
RESULT_FILE = "correlations.safetensors"
STATE_FILE = "state{rank}.safetensors"
_SIDES = ("a", "b")


# ---- arguments -------------------------------------------------------------------------


def layer_pairs(spec: Any, n_a: int, n_b: int) -> list[tuple[int, int]]:
    """The (layer of A, layer of B) pairs of a spec: "all", "same" or "window=K"
    (|l_a - l_b| <= K), in layer-a-major order."""
    text = spec.strip().lower() if isinstance(spec, str) else None
    window = None
    if text == "all":
        window = max(n_a, n_b)
    elif text == "same":
        window = 0
    elif text is not None and (m := re.fullmatch(r"window\s*=\s*(\d+)", text)):
        window = int(m.group(1))
    if window is None:
        raise GPT2LabError(f"layers must be 'all', 'same' or 'window=K' (K >= 0), got {show(spec)}")
    pairs = [(a, b) for a in range(n_a) for b in range(n_b) if abs(a - b) <= window]
    if not pairs:  # cannot happen with n_a, n_b >= 1; kept for clarity
        raise GPT2LabError(f"layers {spec!r} selects no layer pair")
    return pairs


def hook_template(model: Any, hook: Any, which: str) -> str:
    """`hook` as a template with `{layer}`: a full template, a name of layer 0's hook
    ("blocks.0.mlp.hook_post") or the part after the layer ("mlp.hook_post")."""
    if not isinstance(hook, str) or not hook.strip():
        raise GPT2LabError(f"hook must be a hook name such as {DEFAULT_HOOK!r}, got {show(hook)}")
    hook = hook.strip()
    if "{layer}" not in hook:
        m = re.fullmatch(r"blocks\.\d+\.(.+)", hook)
        hook = "blocks.{layer}." + (m.group(1) if m else hook)
    try:
        name = hook.format(layer=0)
    except (KeyError, IndexError, ValueError):
        raise GPT2LabError(f"hook {hook!r}: the only placeholder allowed is {{layer}}") from None
    if name.endswith(("hook_pattern", "hook_attn_scores")):
        raise GPT2LabError(f"hook {name!r} is [batch, head, query, key]: no neuron axis per token")
    if name not in model.hook_dict:
        close = [n for n in model.hook_dict if n.startswith("blocks.0.")]
        hint = ", ".join(n.removeprefix("blocks.0.") for n in close[:12])
        raise GPT2LabError(f"model {which} has no hook point {name!r} (per-layer hooks: {hint})")
    return hook


def haar_rotation(d: int, seed: int) -> torch.Tensor:
    """A Haar-distributed orthogonal [d, d] matrix in float64: Q of the QR decomposition of
    a Gaussian matrix, each column's sign flipped by sign(diag(R)) (Mezzadri 2007; without
    the fix Q is orthogonal but not uniformly distributed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs


def fingerprint(model: Any) -> str:
    """sha256 of a model's weights (names, dtypes, shapes, bytes): which weights a result
    was computed with, independent of where they were loaded from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def plan_passes(
    pairs: list[tuple[int, int]], width_a: int, width_b: int, tokens: int, budget: int
) -> list[list[tuple[int, int]]]:
    """Pack the layer-pair blocks, in order, into passes whose memory (the module
    docstring's formula) stays within `budget` bytes."""
    fixed = 32 * width_a * width_b
    passes: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    for pair in pairs:
        trial = current + [pair]
        if current and pass_bytes(trial, width_a, width_b, tokens) + fixed > budget:
            passes.append(current)
            trial = [pair]
        if pass_bytes(trial, width_a, width_b, tokens) + fixed > budget:
            need = (pass_bytes(trial, width_a, width_b, tokens) + fixed) / 2**30
            raise GPT2LabError(
                f"memory_gb={budget / 2**30:.3g} is too small: one layer pair needs "
                f"{need:.3g} GB (co-moments, rotations and a batch of {tokens} tokens); "
                "give more memory or a smaller batch"
            )
        current = trial
    passes.append(current)
    return passes


def pass_bytes(blocks: list[tuple[int, int]], width_a: int, width_b: int, tokens: int) -> int:
    """Accumulator and activation bytes of one pass (see the module docstring)."""
    layers_a, layers_b = {a for a, _ in blocks}, {b for _, b in blocks}
    co = 8 * len(blocks) * width_a * width_b
    rot = 8 * (len(layers_a) * width_a**2 + len(layers_b) * width_b**2)
    acts = 12 * tokens * (len(layers_a) * width_a + len(layers_b) * width_b)
    return co + rot + acts


# ---- the token stream ------------------------------------------------------------------


@dataclass(frozen=True)
class _Batch:
    index: int
    tokens: torch.Tensor
    keep: torch.Tensor


def _tensor_windows(rows, *, batch_size, max_tokens, start, rank, world, drop_ids):
    """windows() for a [rows, seq_len] tensor of token ids: batch b is rows
    [b * batch_size, (b + 1) * batch_size), kept unless its id is in `drop_ids`."""
    n_rows = rows.shape[0]
    if max_tokens is not None:
        n_rows = min(n_rows, max_tokens // rows.shape[1])
    b = start
    while b * batch_size < n_rows:
        if b % world == rank:
            t = rows[b * batch_size : min((b + 1) * batch_size, n_rows)]
            keep = ~torch.isin(t, torch.tensor(drop_ids, dtype=t.dtype))
            yield _Batch(b, t, keep)
        b += 1


class _Stream:
    """The token stream, from a token tensor [rows, seq_len] or a corpus (a path, or a
    TokenSource of `gpt2lab.interp.corpus`), read window by window."""

    def __init__(self, source, tokenizer, *, seq_len, batch_size, max_tokens, drop):
        self.seq_len, self.batch_size, self.max_tokens = seq_len, batch_size, max_tokens
        self.drop = tuple(drop)
        if isinstance(source, torch.Tensor):
            if source.dim() != 2 or source.dtype.is_floating_point or source.dtype == torch.bool:
                raise GPT2LabError(
                    "a token tensor must be 2-D integer ids [rows, seq_len], got "
                    f"{source.dtype} of shape {tuple(source.shape)}"
                )
            if source.shape[1] != seq_len:
                raise GPT2LabError(
                    f"seq_len={seq_len} but the token tensor's rows are {source.shape[1]} long"
                )
            self.rows = source.long()
            self.drop_ids = drop_ids(tokenizer, self.drop)
            digest = hashlib.sha256(self.rows.numpy().tobytes()).hexdigest()
            self.description = {"kind": "tensor", "shape": list(source.shape), "sha256": digest}
        else:
            self.rows = None
            is_path = isinstance(source, (str, os.PathLike))
            self.source = open_corpus(source, tokenizer) if is_path else source
            # without "tokens": count_tokens() adds it to the source's description later
            described = getattr(self.source, "description", {})
            self.description = {k: v for k, v in described.items() if k != "tokens"}

    def tokens(self) -> int:
        """Tokens of the stream this run reads (for the progress bar)."""
        if self.rows is not None:
            n = self.rows.numel()
        else:
            n = self.source.count_tokens()
        return n if self.max_tokens is None else min(n, self.max_tokens)

    def windows(self, start: int = 0, rank: int = 0, world: int = 1):
        if self.rows is not None:
            yield from _tensor_windows(
                self.rows, batch_size=self.batch_size, max_tokens=self.max_tokens, start=start,
                rank=rank, world=world, drop_ids=self.drop_ids,
            )  # fmt: skip
            return
        for w in corpus_windows(
            self.source, seq_len=self.seq_len, batch_size=self.batch_size,
            max_tokens=self.max_tokens, start=start, rank=rank, world=world, drop=self.drop,
        ):  # fmt: skip
            yield _Batch(w.index, w.tokens, w.keep)


def _window_digest(b: _Batch) -> int:
    h = hashlib.sha256(str(b.index).encode())
    h.update(b.tokens.to(torch.int64).numpy().tobytes())
    h.update(b.keep.numpy().tobytes())
    return int.from_bytes(h.digest()[:16], "big")


# ---- accumulation ----------------------------------------------------------------------


class _Pass:
    """The float64 sums of one pass: per neuron n, Sx, Sxx and Sxx of the rotated
    activations for each layer the pass touches, and the co-moments of its blocks (one
    [d_a, d_b * k] tensor per layer of A, its k layers of B contiguous)."""

    def __init__(self, blocks, width_a, width_b, device):
        self.blocks = blocks
        self.layers = {"a": sorted({a for a, _ in blocks}), "b": sorted({b for _, b in blocks})}
        self.rows: dict[int, list[int]] = {}
        for a, b in blocks:
            self.rows.setdefault(a, []).append(b)
        self.col = {b: i * width_b for i, b in enumerate(self.layers["b"])}
        f64 = {"dtype": torch.float64, "device": device}
        self.sums: dict[str, torch.Tensor] = {"n": torch.zeros((), **f64)}
        for side, width in (("a", width_a), ("b", width_b)):
            for layer in self.layers[side]:
                for kind in ("sx", "sxx", "srr"):
                    self.sums[f"{kind}.{side}.{layer}"] = torch.zeros(width, **f64)
        for a, bs in self.rows.items():
            self.sums[f"acc.{a}"] = torch.zeros(width_a, width_b * len(bs), **f64)

    def add(self, acts, rotations) -> None:
        """Fold one batch in: acts[side] = ({layer: shifted activations [tokens, d]}, the
        same as one matrix [tokens, sum of d], the pass's layers side by side)."""
        self.sums["n"] += acts["a"][1].shape[0]
        for side in _SIDES:
            for layer, x in acts[side][0].items():
                self.sums[f"sx.{side}.{layer}"] += x.sum(0)
                self.sums[f"sxx.{side}.{layer}"] += (x * x).sum(0)
                rx = x @ rotations[side][layer]
                self.sums[f"srr.{side}.{layer}"] += (rx * rx).sum(0)
        ycat = acts["b"][1]
        for a, bs in self.rows.items():
            lo = self.col[bs[0]]
            cols = ycat[:, lo : lo + self.sums[f"acc.{a}"].shape[1]]
            self.sums[f"acc.{a}"].addmm_(acts["a"][0][a].T, cols)

    def all_reduce(self) -> None:
        import torch.distributed as dist

        for t in self.sums.values():
            dist.all_reduce(t)


class _Matches:
    """Each neuron's running best match, worst (most negative) match and best match under
    the rotation baseline, over the blocks finished so far."""

    def __init__(self, n_layers: dict[str, int], widths: dict[str, int]):
        self.t: dict[str, torch.Tensor] = {}
        for s in _SIDES:
            shape = (n_layers[s], widths[s])
            self.t[f"{s}.best_r"] = torch.full(shape, -math.inf, dtype=torch.float64)
            self.t[f"{s}.best_layer"] = torch.full(shape, -1, dtype=torch.int64)
            self.t[f"{s}.best_neuron"] = torch.full(shape, -1, dtype=torch.int64)
            self.t[f"{s}.min_r"] = torch.full(shape, math.inf, dtype=torch.float64)
            self.t[f"{s}.baseline_r"] = torch.full(shape, -math.inf, dtype=torch.float64)

    def update(self, side: str, layer: int, other: int, r, r_rot) -> None:
        """r: [this side's neurons, the other layer's neurons], on any device."""
        hi, idx = (t.cpu() for t in torch.nan_to_num(r, nan=-math.inf).max(dim=1))
        lo = torch.nan_to_num(r, nan=math.inf).min(dim=1).values.cpu()
        base = torch.nan_to_num(r_rot, nan=-math.inf).max(dim=1).values.cpu()
        better = hi > self.t[f"{side}.best_r"][layer]
        self.t[f"{side}.best_r"][layer] = torch.where(better, hi, self.t[f"{side}.best_r"][layer])
        self.t[f"{side}.best_layer"][layer][better] = other
        self.t[f"{side}.best_neuron"][layer][better] = idx[better]
        self.t[f"{side}.min_r"][layer] = torch.minimum(self.t[f"{side}.min_r"][layer], lo)
        self.t[f"{side}.baseline_r"][layer] = torch.maximum(
            self.t[f"{side}.baseline_r"][layer], base
        )


def _finish(p: _Pass, rotations, matches: _Matches, blocks_dir, block_dtype) -> None:
    """Turn a pass's sums into correlations, fold them into `matches`, write blocks."""
    n = p.sums["n"]
    stats = {}
    for side in _SIDES:
        for layer in p.layers[side]:
            sx = p.sums[f"sx.{side}.{layer}"]
            q = rotations[side][layer]
            sx_rot = sx @ q
            var = (p.sums[f"sxx.{side}.{layer}"] - sx * sx / n).clamp_min(0)
            var_rot = (p.sums[f"srr.{side}.{layer}"] - sx_rot * sx_rot / n).clamp_min(0)
            stats[side, layer] = (sx, var.sqrt(), var_rot.sqrt())
    for a, bs in p.rows.items():
        acc = p.sums[f"acc.{a}"]
        sx_a, sd_a, sd_rot_a = stats["a", a]
        for j, b in enumerate(bs):
            sx_b, sd_b, sd_rot_b = stats["b", b]
            width_b = sx_b.shape[0]
            cov = acc[:, j * width_b : (j + 1) * width_b] - torch.outer(sx_a, sx_b) / n
            r = cov / torch.outer(sd_a, sd_b)
            r_a_rot = (cov @ rotations["b"][b]) / torch.outer(sd_a, sd_rot_b)
            matches.update("a", a, b, r, r_a_rot)
            r_b_rot = (rotations["a"][a].T @ cov) / torch.outer(sd_rot_a, sd_b)
            matches.update("b", b, a, r.T, r_b_rot.T)
            if blocks_dir is not None:
                from safetensors.torch import save_file

                name = str(blocks_dir / f"r.{a}.{b}.safetensors")
                save_file({"r": r.to(getattr(torch, block_dtype)).cpu()}, name)
            del cov, r, r_a_rot, r_b_rot


# ---- results ---------------------------------------------------------------------------


@dataclass
class Correlations:
    """Each neuron's best match in the other model, per side ("a" and "b"): tensors
    [n_layers, d] named `best_r`, `best_layer`, `best_neuron`, `min_r`, `baseline_r`
    (NaN / -1 for neurons of layers that no chosen pair touches), and `meta` (models
    and their weight fingerprints, corpus hash, tokens, layer pairs, hook, threshold,
    rotation seed, memory plan and measured peak RSS)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def side(self, side: str) -> str:
        if side not in _SIDES:
            raise GPT2LabError(f"side must be 'a' or 'b', got {show(side)}")
        return side

    def best_r(self, side: str = "a") -> torch.Tensor:
        return self.tensors[f"{self.side(side)}.best_r"]

    def baseline_r(self, side: str = "a") -> torch.Tensor:
        return self.tensors[f"{self.side(side)}.baseline_r"]

    def excess(self, side: str = "a") -> torch.Tensor:
        """Best r minus best r under the rotation baseline, [n_layers, d]."""
        return self.best_r(side) - self.baseline_r(side)

    def universal(self, side: str = "a", threshold: float | None = None) -> torch.Tensor:
        """Boolean [n_layers, d]: excess correlation above the threshold (default: the
        run's, 0.5 unless given)."""
        t = self.meta["threshold"] if threshold is None else number("threshold", threshold, 0, 1)
        return self.excess(side) > t

    def top(self, side: str = "a", k: int = 20) -> list[dict[str, Any]]:
        """The k neurons with the largest excess correlation, as rows of a table."""
        k = integer("k", k, 1)
        ex = torch.nan_to_num(self.excess(side), nan=-math.inf).flatten()
        width = self.best_r(side).shape[1]
        rows = []
        for i in torch.argsort(ex, descending=True, stable=True)[:k].tolist():
            if ex[i] == -math.inf:
                break
            layer, neuron = divmod(i, width)
            s = self.side(side)
            rows.append({
                "layer": layer, "neuron": neuron,
                "best_r": float(self.tensors[f"{s}.best_r"][layer, neuron]),
                "baseline_r": float(self.tensors[f"{s}.baseline_r"][layer, neuron]),
                "excess": float(ex[i]),
                "match_layer": int(self.tensors[f"{s}.best_layer"][layer, neuron]),
                "match_neuron": int(self.tensors[f"{s}.best_neuron"][layer, neuron]),
                "universal": bool(ex[i] > self.meta["threshold"]),
            })  # fmt: skip
        return rows

    def table(self, side: str = "a", k: int = 20) -> str:
        """The top-k table as text, with the share of universal neurons."""
        u = self.universal(side)
        total = int(torch.isfinite(self.best_r(side)).sum())
        head = (
            f"model {side.upper()} ({self.meta['models'][side]['name']}): "
            f"{int(u.sum())} of {total} neurons universal "
            f"({100 * int(u.sum()) / max(total, 1):.2f}%, excess > {self.meta['threshold']})"
        )
        lines = [head, " layer  neuron  best_r  baseline  excess  match (layer:neuron)"]
        for row in self.top(side, k):
            lines.append(
                f"{row['layer']:6d}  {row['neuron']:6d}  {row['best_r']:6.3f}  "
                f"{row['baseline_r']:8.3f}  {row['excess']:6.3f}  "
                f"{row['match_layer']}:{row['match_neuron']}{'  *' if row['universal'] else ''}"
            )
        return "\n".join(lines)

    def save(self, directory: str | os.PathLike) -> Path:
        """correlations.safetensors (tensors, float64) with the metadata as JSON in its
        header and beside it (correlations.json)."""
        from safetensors.torch import save_file

        d = output_folder(directory)
        text = json.dumps(self.meta, indent=1, sort_keys=True)
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(d / RESULT_FILE),
                  metadata={"gpt2lab": text})  # fmt: skip
        (d / "correlations.json").write_text(text + "\n")
        return d / RESULT_FILE


def load_correlations(path: str | os.PathLike) -> Correlations:
    """A saved result, from its folder or its .safetensors file."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = p / RESULT_FILE
    if not p.is_file():
        raise GPT2LabError(f"{p} does not exist (not a correlations result)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["gpt2lab"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own error, a missing key, bad JSON
        raise GPT2LabError(f"{p} is not a correlations result ({type(e).__name__})") from None
    return Correlations(tensors, meta)


# ---- the run ---------------------------------------------------------------------------


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _activations(model, names, last_layer, tokens, keep, shift):
    """Each named hook's activations at the kept positions, float64, minus `shift`: a
    dict {layer: [kept tokens, d]} of column blocks of one matrix, returned too (written
    in place, layer by layer, so a batch costs 12 bytes per activation at most: the
    float32 cache and the float64 matrix)."""
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            tokens.to(model.device), names_filter=list(names.values()),
            stop_at_layer=last_layer + 1,
            return_cache_object=False,
        )  # fmt: skip
    keep = keep.to(model.device)
    widths = {layer: math.prod(cache[name].shape[2:]) for layer, name in names.items()}
    out = torch.empty(int(keep.sum()), sum(widths.values()), dtype=torch.float64,
                      device=model.device)  # fmt: skip
    views, col = {}, 0
    for layer, name in names.items():
        view = out[:, col : col + widths[layer]]
        view.copy_(cache.pop(name).flatten(2)[keep])
        if shift is not None:
            view -= shift[layer]
        views[layer] = view
        col += widths[layer]
    return views, out


def _check_models(model_a, model_b) -> None:
    from ..model import GPT2

    for which, m in (("A", model_a), ("B", model_b)):
        if not isinstance(m, GPT2):
            raise GPT2LabError(f"model {which} must be a gpt2lab GPT2, got {type(m).__name__}")
    va, vb = model_a.cfg.d_vocab, model_b.cfg.d_vocab
    if model_a.device != model_b.device:
        raise GPT2LabError(
            f"the two models must be on one device, got {model_a.device} and {model_b.device}"
        )
    if va != vb or type(model_a.tokenizer) is not type(model_b.tokenizer):
        raise GPT2LabError(
            f"the two models must share a tokenizer: vocabularies of {va} and {vb} tokens"
        )


def correlate(
    model_a,
    model_b,
    source,
    *,
    layers: str = "all",
    hook: str = DEFAULT_HOOK,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    threshold: float = 0.5,
    memory_gb: float = 4.0,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int = 200,
    save_blocks: bool = False,
    block_dtype: str = "float16",
    drop: tuple[str, ...] = ("<|endoftext|>",),
    names: tuple[str, str] | None = None,
    log=None,
    progress: bool | None = None,
) -> Correlations:
    """Pearson r of every neuron pair of the chosen layer pairs of two models over one
    token stream, each neuron's best match, the rotation baseline and the universal
    criterion (module docstring).

    `source`: a corpus folder from `gpt2lab prepare` or text files (see
    `gpt2lab.interp.corpus.open_corpus`), or a token tensor [rows, seq_len]. `layers`:
    "all", "same" or "window=K". `hook`: a per-layer hook with a neuron axis (trailing
    dimensions are flattened). `max_tokens` bounds the stream; `drop` names tokens left
    out. `memory_gb` bounds each pass (see `plan_passes`). With `out`, the result is saved
    there and checkpoints are written every `checkpoint_every` batches and after each
    pass; `resume=True` continues from them. `save_blocks` writes every block's r to
    out/blocks/r.{layer_a}.{layer_b}.safetensors in `block_dtype` (float16 by default:
    2 bytes a pair). Under torchrun (an initialised process group) each rank takes its
    share of the windows and every rank returns the same result. `log(str)` gets a line
    per pass; `progress` shows a bar per pass (None: on a terminal only; True: also
    periodic lines in a log)."""
    _check_models(model_a, model_b)
    models = {"a": model_a, "b": model_b}
    templates = {s: hook_template(models[s], hook, s.upper()) for s in _SIDES}
    n_layers = {s: models[s].cfg.n_layers for s in _SIDES}
    pairs = layer_pairs(layers, n_layers["a"], n_layers["b"])
    threshold = number("threshold", threshold, 0, 1)
    memory_gb = number("memory_gb", memory_gb, 0, low_open=True)
    seed = integer("seed", seed, 0, 2**31)
    batch_size = integer("batch_size", batch_size, 1)
    checkpoint_every = integer("checkpoint_every", checkpoint_every, 1)
    n_ctx = min(model_a.cfg.n_ctx, model_b.cfg.n_ctx)
    seq_len = integer("seq_len", min(n_ctx, 512) if seq_len is None else seq_len, 2, n_ctx)
    if max_tokens is not None:
        max_tokens = integer("max_tokens", max_tokens, 1)
    resume, save_blocks = boolean("resume", resume), boolean("save_blocks", save_blocks)
    if block_dtype not in ("float16", "float32", "float64"):
        raise GPT2LabError(
            f"block_dtype must be 'float16', 'float32' or 'float64', got {show(block_dtype)}"
        )
    if resume and out is None:
        raise GPT2LabError("resume needs out= (the folder holding the checkpoint)")
    stream = _Stream(source, model_a.tokenizer, seq_len=seq_len, batch_size=batch_size,
                     max_tokens=max_tokens, drop=drop)  # fmt: skip
    rank, world = _dist()
    say = log or (lambda line: None)

    # Widths from a one-token probe (a hook's trailing dimensions, flattened).
    device = model_a.device
    probe = torch.zeros(1, 1, dtype=torch.long)
    widths = {}
    for s in _SIDES:
        name = templates[s].format(layer=0)
        acts = _activations(
            models[s], {0: name}, 0, probe, torch.ones(1, 1, dtype=torch.bool), None
        )
        widths[s] = acts[1].shape[1]
    budget = int(memory_gb * 2**30)
    plan = plan_passes(pairs, widths["a"], widths["b"], batch_size * seq_len, budget)
    names = names or ("A", "B")
    config = {
        "models": {
            s: {"name": str(names[i]), "fingerprint": fingerprint(models[s]),
                "n_layers": n_layers[s], "width": widths[s]}
            for i, s in enumerate(_SIDES)
        },
        "hook": templates["a"], "layers": layers if isinstance(layers, str) else str(layers),
        "pairs": [list(p) for p in pairs], "seq_len": seq_len, "batch_size": batch_size,
        "max_tokens": max_tokens, "drop": list(drop), "rotation_seed": seed, "world": world,
        "corpus": stream.description,
        "passes": [[list(p) for p in blocks] for blocks in plan],
    }  # fmt: skip
    out_dir = Path(out) if out is not None else None
    blocks_dir = None
    if out_dir is not None:
        output_folder(out_dir)
        if save_blocks:
            blocks_dir = output_folder(out_dir / "blocks")
    state_path = out_dir / STATE_FILE.format(rank=f".rank{rank}" if world > 1 else "") if (
        out_dir is not None) else None  # fmt: skip

    all_layers = {s: sorted({p[i] for p in pairs}) for i, s in enumerate(_SIDES)}
    hook_names = {s: {i: templates[s].format(layer=i) for i in all_layers[s]} for s in _SIDES}
    matches = _Matches(n_layers, widths)
    start_pass, next_window, digest, tokens_total, shift, acc = 0, 0, 0, 0, None, None
    if resume:
        start_pass, next_window, digest, tokens_total, shift, acc = _load_state(
            state_path, config, matches, device
        )
    if shift is None:  # the same reference on every rank: the stream's first window
        zero = torch.zeros(max(widths.values()), dtype=torch.float64, device=device)
        shift = {s: {i: zero[: widths[s]].clone() for i in all_layers[s]}
                 for s in _SIDES}  # fmt: skip
        first = next(iter(stream.windows()), None)
        if first is not None and first.keep.any():
            for s in _SIDES:
                acts = _activations(models[s], hook_names[s], max(all_layers[s]), first.tokens,
                                    first.keep, None)  # fmt: skip
                for layer, x in acts[0].items():
                    shift[s][layer] = x.mean(0)

    def save_state(p_index, window, p, digest):
        if state_path is not None:
            _save_state(state_path, config, p_index, window, digest, tokens_total, shift, p,
                        matches)  # fmt: skip

    peak_plan = 0
    for p_index in range(start_pass, len(plan)):
        blocks = plan[p_index]
        p = _Pass(blocks, widths["a"], widths["b"], device)
        if acc is not None:  # resumed mid-pass
            p.sums.update(acc)
            acc = None
        else:
            next_window = 0
        peak_plan = max(
            peak_plan, pass_bytes(blocks, widths["a"], widths["b"], batch_size * seq_len)
        )
        rotations = {
            s: {
                i: haar_rotation(widths[s], _rotation_seed(seed, s, i)).to(device)
                for i in p.layers[s]
            }
            for s in _SIDES
        }
        use = {s: {i: hook_names[s][i] for i in p.layers[s]} for s in _SIDES}
        visible = progress if rank == 0 else False
        total = -(-stream.tokens() // world) if resolve(visible) else 0  # count only to show
        with progress_bar(total, f"correlate pass {p_index + 1}/{len(plan)}", visible,
                          unit="tokens") as advance:  # fmt: skip
            since = 0
            for batch in stream.windows(start=next_window, rank=rank, world=world):
                if p_index == 0:
                    digest = (digest + _window_digest(batch)) % 2**128
                if batch.keep.any():
                    acts = {s: _activations(models[s], use[s], max(p.layers[s]), batch.tokens,
                                            batch.keep, shift[s]) for s in _SIDES}  # fmt: skip
                    p.add(acts, rotations)
                    del acts
                next_window = batch.index + 1
                advance(batch.tokens.numel())
                since += 1
                if since >= checkpoint_every:
                    save_state(p_index, next_window, p, digest)
                    since = 0
        if world > 1:
            p.all_reduce()
        n = int(p.sums["n"])
        if n < 2:
            raise GPT2LabError(
                "the corpus has no tokens after filtering" if n == 0 else
                "the corpus has one token after filtering; correlations need at least two"
            )  # fmt: skip
        tokens_total = n
        _finish(p, rotations, matches, blocks_dir if rank == 0 else None, block_dtype)
        say(f"pass {p_index + 1}/{len(plan)}: {len(blocks)} layer pairs over {n:,} tokens")
        del p, rotations
        save_state(p_index + 1, 0, None, digest)

    if world > 1:
        import torch.distributed as dist

        digests: list[Any] = [None] * world
        dist.all_gather_object(digests, digest)
        digest = sum(digests) % 2**128
    tensors = {k: v.clone() for k, v in matches.t.items()}
    if device.type == "cuda":
        meta_device = {"peak_device_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    else:
        meta_device = {}
    for v in tensors.values():
        if v.dtype == torch.float64:
            v[~torch.isfinite(v)] = math.nan
    meta = dict(config)
    meta.update({
        "threshold": threshold, "tokens": tokens_total, "corpus_hash": f"{digest:032x}",
        "criterion": "universal when best_r - baseline_r > threshold",
        "memory": {"budget_gb": memory_gb, "planned_pass_gb": peak_plan / 2**30,
                   "finish_block_gb": 32 * widths["a"] * widths["b"] / 2**30,
                   "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                   "device": str(device), **meta_device},
    })  # fmt: skip
    result = Correlations(tensors, meta)
    if out_dir is not None and rank == 0:
        result.save(out_dir)
    return result


def _rotation_seed(seed: int, side: str, layer: int) -> int:
    return (seed * 1_000_003 + (0 if side == "a" else 500_000) + layer) % 2**63


_CHECKED = ("models", "hook", "pairs", "seq_len", "batch_size", "max_tokens", "drop", "corpus",
            "rotation_seed", "world", "passes")  # fmt: skip


def _save_state(path, config, p_index, window, digest, tokens, shift, p, matches) -> None:
    """Everything a resume needs, written atomically (a temporary file, then rename)."""
    from safetensors.torch import save_file

    tensors = {f"match.{k}": v for k, v in matches.t.items()}
    for s in _SIDES:
        for layer, v in shift[s].items():
            tensors[f"shift.{s}.{layer}"] = v
    if p is not None:
        tensors.update({f"sum.{k}": v for k, v in p.sums.items()})
    meta = {k: config[k] for k in _CHECKED}
    meta.update({"pass": p_index, "next_window": window, "digest": f"{digest:032x}",
                 "tokens": tokens})  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"gpt2lab": json.dumps(meta)})  # fmt: skip
    os.replace(tmp, path)


def _load_state(path, config, matches, device):
    from safetensors import safe_open

    if path is None or not path.is_file():
        raise GPT2LabError(f"nothing to resume: {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["gpt2lab"])
        # fresh (64-byte aligned) copies: MKL's float64 kernels round differently on
        # differently aligned buffers, and a resume must equal an uninterrupted run bit for bit
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    on_device = {k: v.to(device) for k, v in tensors.items() if not k.startswith("match.")}
    tensors.update(on_device)
    for key in _CHECKED:
        if meta.get(key) != config[key]:
            raise GPT2LabError(
                f"cannot resume from {path}: its {key} differs from this run's "
                f"({show(meta.get(key))} vs {show(config[key])})"
            )
    for k in matches.t:
        matches.t[k] = tensors[f"match.{k}"]
    shift: dict[str, dict[int, torch.Tensor]] = {s: {} for s in _SIDES}
    acc = {}
    for k, v in tensors.items():
        if k.startswith("shift."):
            _, s, layer = k.split(".")
            shift[s][int(layer)] = v
        elif k.startswith("sum."):
            acc[k[4:]] = v
    digest = int(meta["digest"], 16)
    return meta["pass"], meta["next_window"], digest, meta["tokens"], shift, acc or None
