"""Deciding a model's kernel cases ahead of time (`gpt2lab tune`), and showing what was
decided (`gpt2lab info --kernels`).

A case is otherwise decided on first use, in the middle of someone's first generation;
tuning runs the same measurement on random weights of the model's shapes (no weights
are read), so every later process on this machine finds the answers in the cache file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..errors import GPT2LabError
from . import native
from .choose import Choice, chooser, file_key, machine_key, row_bucket
from .linear import linear

DTYPES = ("float32", "bfloat16", "int8")
ROWS = (1, 2, 4, 8, 16, 64, 256)


def weight_shapes(cfg) -> dict[str, tuple[int, int]]:
    """[out, in] of each weight a decoding step multiplies by."""
    D, M = cfg.d_model, cfg.d_mlp
    return {"attn.c_attn": (3 * D, D), "attn.c_proj": (D, D), "mlp.c_fc": (M, D),
            "mlp.c_proj": (D, M), "unembed": (cfg.d_vocab, D)}  # fmt: skip


def tune(
    cfg,
    dtypes: Iterable[str] = DTYPES,
    rows: Iterable[int] = ROWS,
    say: Callable[[str], None] = lambda line: None,
) -> list[tuple[tuple, Choice]]:
    """Decide every (dtype, rows, weight) case of a model with config `cfg` anew (answers
    from earlier runs are measured again: tune on an idle machine); returns the cases
    with their choices."""
    from ..quantize import Int8Copy, Int8Linear

    dtypes, rows = list(dtypes), sorted(set(rows))
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise GPT2LabError(f"tune: dtypes must be among {', '.join(DTYPES)}; got {bad or 'none'}")
    if not rows or rows[0] < 1:
        raise GPT2LabError("tune: rows must be whole numbers >= 1")
    gen = torch.Generator().manual_seed(0)
    decided = []
    c = chooser()
    with c._lock:
        c._loaded, c._from_file = True, {}  # measure again, then overwrite in the file
        c.choices.clear()
    for dtype in dtypes:
        compute = torch.float32 if dtype == "float32" else torch.bfloat16
        for name, (out, inp) in weight_shapes(cfg).items():
            w = (torch.randn(out, inp, generator=gen) * 0.02).to(compute)
            b = torch.zeros(out, dtype=compute) if name != "unembed" else None
            acts = ["none", "gelu_tanh"] if name == "mlp.c_fc" else ["none"]
            layer = None
            if dtype == "int8" and name != "unembed":
                layer = Int8Linear.from_linear(_as_linear(w, b))
            for n in rows:
                x = torch.randn(n, inp, generator=gen).to(compute)
                for act in acts:
                    with torch.inference_mode():
                        if layer is not None:
                            layer(x, act)
                            key = ("int8", "bfloat16", row_bucket(n), out, inp, act)
                        elif dtype == "int8":  # the int8 model's unembedding: bf16 or a copy
                            linear(x, w, b, act, int8=Int8Copy())
                            key = ("dense_or_int8", "bfloat16", row_bucket(n), out, inp, act)
                        else:
                            linear(x, w, b, act)
                            key = ("linear", str(compute).removeprefix("torch."), row_bucket(n),
                                   out, inp, act)  # fmt: skip
                    choice = chooser().choices.get(key)
                    if choice is not None:
                        decided.append((key, choice))
                        say(describe(file_key(key), choice))
        if 1 in rows:
            decided += _tune_step(cfg, dtype, say)
    return decided


def _tune_step(cfg, dtype: str, say) -> list[tuple[tuple, Choice]]:
    """The native decoding step against the eager one (kernels/step.py), on a model of
    these shapes with random weights: decided by the model's first one-token step."""
    from ..model import GPT2
    from ..quantize import quantize

    model = GPT2(cfg).init_weights(seed=0).eval()
    if dtype == "int8":
        model = quantize(model, "int8")
    elif dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    kind = {"float32": "f32", "bfloat16": "bf16", "int8": "int8"}[dtype]
    key = ("step", kind, 1, cfg.n_layers, cfg.d_model, cfg.d_mlp)
    with torch.inference_mode():
        cache = model.new_cache(1, 2)
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    choice = chooser().choices.get(key)
    if choice is None:  # the step does not apply here (no native kernels, another shape)
        return []
    say(describe(file_key(key), choice))
    return [(key, choice)]


def _as_linear(w: torch.Tensor, b: torch.Tensor | None) -> torch.nn.Linear:
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        layer.weight.copy_(w.float())
        if b is not None:
            layer.bias.copy_(b.float())
    return layer


def describe(key: str, choice: Choice) -> str:
    """One line: the case, the winner with its GB/s, every candidate's best time."""
    ranked = sorted(choice.seconds.items(), key=lambda kv: kv[1])
    times = ", ".join(f"{n} {s * 1e6:.0f} us" for n, s in ranked)
    gbps = f" {choice.gbps:.1f} GB/s" if choice.gbps else ""
    return f"{key:<38} -> {choice.name}{gbps} ({times}; {choice.source})"


def native_state(kind: str) -> str:
    """Whether gpt2lab's native `kind` kernel runs here (building it if not built yet)."""
    getter = getattr(native, f"{kind}_gemv", None)
    if getter is None:
        return "not in this version"
    return "built" if getter() is not None else "not available (CPU, switched off, or no build)"


def report() -> list[str]:
    """What `gpt2lab info --kernels` prints: the machine key, the cache file, which
    native kernels this CPU has, and every case decided so far (this process's and the
    cache file's)."""
    c = chooser()
    with c._lock:
        c._load()
        known = {file_key(k): v for k, v in c.choices.items()}
        for k, v in c._from_file.items():
            known.setdefault(k, v)
    lines = [f"machine     {machine_key()}", f"cache file  {c.path}"]
    for kind in ("f32", "bf16", "int8"):
        lines.append(f"native {kind:<5}{native_state(kind)}")
    if not known:
        lines.append("no case decided yet on this machine (run `gpt2lab tune`, or any model)")
    lines += [describe(key, known[key]) for key in sorted(known)]
    return lines
