"""Cross-model neuron correlation benchmark: throughput and memory of `correlate`.

    python benchmarks/correlate.py [--batches 4,12] [--batch-size 4] [--seq-len 256]
                                   [--rounds 1] [--medium]

What it measures (CPU, float32 models, float64 statistics, no grad)
1. Throughput, two bundled-size models: the bundled model (4 layers x 1024 MLP neurons)
   and a copy of it with re-initialised random weights, over a stream of random token
   ids, all 16 layer pairs (16.8M neuron pairs). Compared with the two plain forwards
   the correlation needs (tokens/s of `a(x); b(x)`, logits included) and with the two
   hooked forwards it actually runs (`run_with_cache(names_filter=mlp.hook_post,
   stop_at_layer=4)`, no unembedding). Each run is timed at two stream lengths: the
   difference gives the streaming rate (the per-pass rotations' QR and the finishing
   of the blocks are a fixed cost, independent of the stream's length); the total rate
   at the longer length is shown too.
2. Memory: each correlation runs in a child process that reports its peak RSS, next to
   the plan's own figure (the module docstring's formula) and a child that only loads
   the two models and runs the plain forwards.
3. With --medium: the same for two gpt2-medium-width random models cut to 2 layers
   (4096 neurons per layer), with a budget that forces several passes, to check the
   formula where the blocks are big (128 MiB each); and the plan for two full
   gpt2-medium (24 x 4096 neurons each, 77 GB of co-moments) within a 16 GB budget.

Method: same process for the timings, interleaved rounds, best of N; children for RSS.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import print_machine
from timing import interleaved_rounds, show_rounds

import gpt2lab
from gpt2lab.interp.correlate import correlate, layer_pairs, pass_bytes, plan_passes

HOOK = "blocks.{layer}.mlp.hook_post"


def bundled_pair():
    a = gpt2lab.load("bundled").eval()
    b = copy.deepcopy(a).init_weights(seed=1).eval()
    return a, b


def medium_pair():
    cfg = gpt2lab.GPT2Config(n_layers=2, d_model=1024, n_heads=16, n_ctx=256, d_mlp=4096)
    return tuple(gpt2lab.GPT2(cfg).init_weights(seed=s).eval() for s in (0, 1))


def stream(rows: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, 50257, (rows, seq_len), generator=torch.Generator().manual_seed(0))


def child(args) -> None:
    """One measured job in a fresh process; prints {"rss_gb", "seconds", ...} as JSON."""
    torch.set_grad_enabled(False)
    a, b = medium_pair() if args.child_models == "medium" else bundled_pair()
    x = stream(args.child_rows, args.seq_len)
    t = time.perf_counter()
    info = {}
    if args.child == "forward":
        for i in range(0, x.shape[0], args.batch_size):
            a(x[i : i + args.batch_size]), b(x[i : i + args.batch_size])
    else:
        res = correlate(a, b, x, seq_len=args.seq_len, batch_size=args.batch_size,
                        memory_gb=args.memory_gb)  # fmt: skip
        info = {
            "passes": len(res.meta["passes"]),
            "planned_gb": res.meta["memory"]["planned_pass_gb"],
        }
    info["seconds"] = time.perf_counter() - t
    info["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(info))


def run_child(args, what: str, models: str, rows: int, memory_gb: float) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--child-models", models,
           "--child-rows", str(rows), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--memory-gb", str(memory_gb)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="4,12", help="two stream lengths, in batches")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--memory-gb", type=float, default=4.0)
    ap.add_argument("--medium", action="store_true", help="also the gpt2-medium-width check")
    ap.add_argument("--medium-only", action="store_true", help="only the gpt2-medium-width check")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-models", default="bundled", help=argparse.SUPPRESS)
    ap.add_argument("--child-rows", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    torch.set_grad_enabled(False)
    if not args.medium_only:
        bundled(args)
    if args.medium or args.medium_only:
        medium(args)
    print_machine(f"stream: {Path(__file__).name}, random token ids")


def bundled(args) -> None:
    a, b = bundled_pair()
    short, long = (int(n) for n in args.batches.split(","))
    bs, T = args.batch_size, args.seq_len
    xs = {n: stream(n * bs, T) for n in (short, long)}
    names = [HOOK.format(layer=i) for i in range(4)]

    def forwards(x, hooked: bool):
        def run():
            for i in range(0, x.shape[0], bs):
                if hooked:
                    a.run_with_cache(x[i : i + bs], names_filter=names, stop_at_layer=4)
                    b.run_with_cache(x[i : i + bs], names_filter=names, stop_at_layer=4)
                else:
                    a(x[i : i + bs]), b(x[i : i + bs])

        return run

    def corr(x):
        return lambda: correlate(a, b, x, seq_len=T, batch_size=bs, memory_gb=args.memory_gb)

    fns = {}
    for n in (short, long):
        fns[f"plain {n}"] = forwards(xs[n], False)
        fns[f"hooked {n}"] = forwards(xs[n], True)
        fns[f"correlate {n}"] = corr(xs[n])
    for name, fn in fns.items():  # warm-up (the short stream only for correlate)
        if name != f"correlate {long}":
            fn()
    times = interleaved_rounds(fns, args.rounds)
    show_rounds(times, file=sys.stderr)
    best = {k: min(v) for k, v in times.items()}
    tokens = {n: n * bs * T for n in (short, long)}
    extra = tokens[long] - tokens[short]

    def rate(kind):  # streaming tokens/s: the difference of the two lengths
        return extra / max(best[f"{kind} {long}"] - best[f"{kind} {short}"], 1e-9)

    print("# Cross-model neuron correlations: bundled model vs a re-initialised copy\n")
    print(f"all layer pairs: 4 x 4 layers of 1024 MLP neurons (16.8M pairs), float64; "
          f"batches of {bs} x {T} tokens; streams of {tokens[short]:,} and {tokens[long]:,} "
          f"tokens (random ids); best of {args.rounds}\n")  # fmt: skip
    plain = rate("plain")
    print("| run | streaming tok/s | ratio to two plain forwards | total tok/s at "
          f"{tokens[long]:,} tokens |")  # fmt: skip
    print("|---|---|---|---|")
    for kind, label in (("plain", "two plain forwards (logits)"),
                        ("hooked", "two hooked forwards (mlp.hook_post, stop at layer 4)"),
                        ("correlate", "correlate, all layer pairs")):  # fmt: skip
        print(f"| {label} | {rate(kind):.0f} | {rate(kind) / plain:.2f} | "
              f"{tokens[long] / best[f'{kind} {long}']:.0f} |")  # fmt: skip
    fixed = best[f"correlate {long}"] - tokens[long] / rate("correlate")
    print(f"\nfixed cost per run (rotations' QR, finishing 16 blocks): {fixed:.1f} s\n")

    fwd = run_child(args, "forward", "bundled", long * bs, args.memory_gb)
    cor = run_child(args, "correlate", "bundled", long * bs, args.memory_gb)
    print("| process (bundled pair) | peak RSS | planned pass memory | passes |")
    print("|---|---|---|---|")
    print(f"| load + two plain forwards | {fwd['rss_gb']:.2f} GB | | |")
    print(f"| correlate all pairs | {cor['rss_gb']:.2f} GB | {cor['planned_gb']:.3f} GB | "
          f"{cor['passes']} |\n")  # fmt: skip


def medium(args) -> None:
    """gpt2-medium-width blocks (128 MiB each): measured RSS against the plan."""
    bs, T = args.batch_size, args.seq_len
    finish = 32 * 4096**2 / 2**30
    print("# gpt2-medium width: 2 x 2 layers of 4096 neurons, random weights, 512 tokens\n")
    print("| memory_gb | passes | planned pass + finishing | peak RSS | RSS of load + forwards |")
    print("|---|---|---|---|---|")
    base = run_child(args, "forward", "medium", 2, 1.0)
    for budget in (2.0, 1.0):
        r = run_child(args, "correlate", "medium", 2, budget)
        print(f"| {budget} | {r['passes']} | {r['planned_gb'] + finish:.2f} GB | "
              f"{r['rss_gb']:.2f} GB | {base['rss_gb']:.2f} GB |")  # fmt: skip
    pairs = layer_pairs("all", 24, 24)
    plan = plan_passes(pairs, 4096, 4096, bs * T, 16 * 2**30)
    worst = max(pass_bytes(p, 4096, 4096, bs * T) for p in plan) / 2**30
    print(f"\nplan for two full gpt2-medium, all 576 layer pairs (77.3 GB of co-moments), "
          f"16 GB budget, batches of {bs} x {T}: {len(plan)} passes over the stream, at most "
          f"{worst:.1f} GB each + {finish:.1f} GB to finish a block, with the two models "
          f"(2 x 1.4 GB): within 24 GB\n")  # fmt: skip


if __name__ == "__main__":
    main()
