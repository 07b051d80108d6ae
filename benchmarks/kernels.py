"""Native GEMV kernels against torch's paths, in GB/s of weights streamed.

    python benchmarks/kernels.py [--rounds 5] [--threads N] [--rows 1,2,4,8] [--prefill]

What it measures
- Every gpt2-medium weight shape (out x in: c_attn 3072x1024, attn c_proj 1024x1024,
  c_fc 4096x1024, mlp c_proj 1024x4096, the 50257x1024 unembedding) at 1, 2, 4, 8
  rows, per path: float32 (gpt2lab's f32_gemv, F.linear, oneDNN's
  `torch.ops.mkldnn._linear_pointwise`), bf16 (bf16_gemv, F.linear, oneDNN) and int8
  weights with bf16 activations (int8_gemv, `torch._weight_int8pack_mm`, "pack_mm").
- GB/s = the weight's bytes / the time of one call: at a few rows the weights are
  nearly all the memory traffic, so this is the fraction of the memory's read speed a
  kernel reaches, printed next to it (`read`: a float32 `.sum()` over 256 MB, timed in
  the same rounds as the kernels, since the machine's load moves it).
- Each path cycles through enough copies of the weight (>= 256 MB) that none comes
  from cache, as in a decoding step through 24 layers.
- Interleaved rounds (benchmarks/timing.py): each path once per round, in turn, so
  load drift hits all alike; the best round is reported (noise only adds time).
- `--prefill`: the int8 kernel at 64 and 512 rows against `_weight_int8pack_mm` and
  oneDNN bf16 (its rows go four at a time through each weight row, from cache).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from machine import print_machine  # noqa: E402
from timing import interleaved_rounds  # noqa: E402

from gpt2lab.kernels import native  # noqa: E402
from gpt2lab.quantize import quantize_weight  # noqa: E402

SHAPES = {  # name: (out, in)
    "c_attn": (3072, 1024),
    "attn c_proj": (1024, 1024),
    "c_fc": (4096, 1024),
    "mlp c_proj": (1024, 4096),
    "unembed": (50257, 1024),
}
STREAM_BYTES = 256 << 20


def _copies(one: torch.Tensor) -> int:
    return max(2, -(-STREAM_BYTES // (one.numel() * one.element_size())))


def paths(out_f: int, in_f: int, rows: int) -> dict:
    """{path: (one call per weight copy, weight bytes per call, number of copies)}."""
    gen = torch.Generator().manual_seed(0)
    w32 = torch.randn(out_f, in_f, generator=gen) * 0.05
    x32 = torch.randn(rows, in_f, generator=gen)
    xbf = x32.bfloat16()
    e32, ebf = torch.empty(0), torch.empty(0, dtype=torch.bfloat16)
    found = {}

    def add(name, fn, copies, nbytes):
        found[name] = (lambda: [fn(c) for c in copies], nbytes, len(copies))

    def onednn(x):
        return lambda w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    ws = [w32.clone() for _ in range(_copies(w32))]
    if (k := native.f32_gemv()) is not None and native.gemv_supports("f32", in_f):
        add("f32 native", lambda w, k=k: k(x32, w, e32, 0), ws, w32.numel() * 4)
    add("f32 F.linear", lambda w: F.linear(x32, w), ws, w32.numel() * 4)
    add("f32 oneDNN", onednn(x32), ws, w32.numel() * 4)
    wb = [w32.bfloat16() for _ in range(_copies(w32.bfloat16()))]
    if (k := native.bf16_gemv()) is not None and native.gemv_supports("bf16", in_f):
        add("bf16 native", lambda w, k=k: k(xbf, w, ebf, 0), wb, w32.numel() * 2)
    add("bf16 F.linear", lambda w: F.linear(xbf, w), wb, w32.numel() * 2)
    add("bf16 oneDNN", onednn(xbf), wb, w32.numel() * 2)
    q, s = quantize_weight(w32)
    qs = [(q.clone(), q.sum(1, dtype=torch.int32), s, s.bfloat16()) for _ in range(_copies(q))]
    if (k := native.int8_gemv()) is not None and native.gemv_supports("int8", in_f):
        add("int8 native", lambda t, k=k: k(xbf, t[0], t[1], t[2], e32, 0), qs, q.numel())
    add("int8 pack_mm", lambda t: torch._weight_int8pack_mm(xbf, t[0], t[3]), qs, q.numel())
    big = torch.ones(STREAM_BYTES // 4)
    found["read"] = (big.sum, STREAM_BYTES, 1)  # the memory's read speed, same rounds
    return found


def measure(out_f, in_f, rows, rounds):
    found = paths(out_f, in_f, rows)
    for run, _, _ in found.values():
        run()  # warm-up: oneDNN's primitive cache, first-touch
    times = interleaved_rounds({name: v[0] for name, v in found.items()}, rounds)
    return {
        name: nbytes * calls / min(times[name]) / 1e9 for name, (_, nbytes, calls) in found.items()
    }


def _prefill_case(name: str, rows: int, rounds: int) -> dict[str, float]:
    out_f, in_f = SHAPES[name]
    w = torch.randn(out_f, in_f) * 0.05
    q, s = quantize_weight(w)
    qsum, sb, wb = q.sum(1, dtype=torch.int32), s.bfloat16(), w.bfloat16()
    x = torch.randn(rows, in_f).bfloat16()
    fns = {
        "int8pack": lambda: torch._weight_int8pack_mm(x, q, sb),
        "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, wb, None, "none", [], ""),
    }
    if (k := native.int8_gemv()) is not None:
        fns["native"] = lambda: k(x, q, qsum, s, torch.empty(0), 0)
    for fn in fns.values():
        fn()
    times = interleaved_rounds(fns, rounds)
    return {n: 2 * rows * out_f * in_f / min(t) / 1e9 for n, t in times.items()}


def prefill(rounds: int) -> None:
    print("\n## int8 prefill (GFLOP/s)\n")
    print("| rows | shape | int8 native | int8 pack_mm | bf16 oneDNN | native / pack_mm |")
    print("|---:|---|---:|---:|---:|---:|")
    for rows in (64, 512):
        for name in ("c_fc", "mlp c_proj"):
            f = _prefill_case(name, rows, rounds)
            nat = f.get("native", float("nan"))
            print(f"| {rows} | {name} | {nat:.0f} | {f['int8pack']:.0f} | "
                  f"{f['onednn']:.0f} | {nat / f['int8pack']:.2f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--prefill", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    native.f32_gemv()  # build (or load) before any timing
    start_load = os.getloadavg()[0]
    print("# Native GEMV kernels against torch (GB/s of weights read per call)\n")
    print("`read`: the memory's read speed, a float32 `.sum()` over 256 MB, in the same rounds.\n")
    rows_list = [int(r) for r in args.rows.split(",")]
    results = {}
    for name, (out_f, in_f) in SHAPES.items():
        for rows in rows_list:
            results[name, rows] = measure(out_f, in_f, rows, args.rounds)
    names = list(next(iter(results.values())))
    print("| shape (out x in) | rows | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for (name, rows), r in results.items():
        out_f, in_f = SHAPES[name]
        cells = " | ".join(f"{r[n]:.1f}" for n in names)
        print(f"| {name} {out_f}x{in_f} | {rows} | {cells} |")
    print("\n## Ratios: native / best torch path of the same weight type; native / read speed\n")
    print("| shape | rows | f32 | bf16 | int8 | f32 / read | bf16 / read | int8 / read |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, rows), r in results.items():
        cells, reads = [], []
        for kind in ("f32", "bf16", "int8"):
            mine = r.get(f"{kind} native")
            theirs = max(v for n, v in r.items() if n.startswith(kind + " ") and "native" not in n)
            cells.append("-" if mine is None else f"{mine / theirs:.2f}")
            reads.append("-" if mine is None else f"{mine / r['read']:.2f}")
        print(f"| {name} | {rows} | " + " | ".join(cells + reads) + " |")
    if args.prefill:
        prefill(args.rounds)
    print()
    print_machine(f"load average (1 min) at the start: {start_load:.1f}",
                  f"run at {time.strftime('%Y-%m-%d %H:%M')}")  # fmt: skip


if __name__ == "__main__":
    main()
