"""Forward-pass benchmark: gpt2lab against transformers at gpt2-medium size, on CPU.

    python benchmarks/forward.py [--quick] [--rounds N] [--tokens 512] [--threads N]

What it measures
1. Prefill throughput: one forward of a [1, tokens] batch, logits for every position,
   under `torch.inference_mode()`, in float32 and then bfloat16 (both models converted
   with `.to(torch.bfloat16)`), plus the fraction of the machine's GEMM speed each
   model reaches.
2. Hook overhead: gpt2lab's plain forward against the same forward with a no-op hook
   on every `hook_resid_post` (float32 only).
3. Peak RSS while loading the checkpoint, gpt2lab.load against
   GPT2LMHeadModel.from_pretrained, each in a fresh subprocess.

Method
- Same weights: a randomly initialised `transformers.GPT2LMHeadModel` (its default
  attention implementation, i.e. what a user gets) is written with `save_pretrained`
  and read back with `gpt2lab.load`, so both models compute the same function; the
  warm-up outputs are compared once (max |logit difference|) to prove it.
- Same process, same input, interleaved: the models are timed alternately (ours,
  theirs, ours, theirs, ...), so drift in machine load hits both alike.
- Best of N: one untimed warm-up each, then N timed rounds; the fastest round is
  reported, since background noise only ever adds time. Every round's time is printed
  too, and the load average at start and end, so a noisy run is visible as such.
- GEMM ceiling: the model's weight matmuls as bare `torch.mm` calls, timed in the same
  interleaved rounds; each model's FLOP/s (formula in `forward_flops`) is reported as
  a fraction of it.
- Load memory: the high-water mark of the resident set (VmHWM) above the post-import
  baseline, in a fresh interpreter per loader.
- transformers is called with `use_cache=False`: neither side keeps a KV cache, so
  both do exactly the same work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from machine import print_machine
from timing import interleaved_rounds, show_rounds

import gpt2lab

# gpt2-medium's dimensions.
N_LAYERS, D_MODEL, N_HEADS, VOCAB, N_CTX = 24, 1024, 16, 50257, 1024
D_MLP = 4 * D_MODEL
HF_CONFIG = dict(
    n_layer=N_LAYERS, n_embd=D_MODEL, n_head=N_HEADS, vocab_size=VOCAB, n_positions=N_CTX
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- timing -------------------------------------------------------------------------
def forward_flops(tokens: int) -> float:
    """FLOPs of one forward over `tokens` positions (a multiply-add counts as 2).

    per token = 2 * n_layers * (4 d^2 + 2 d d_mlp)   weight matmuls: qkv 3d^2, out d^2,
                                                      MLP in and out d*d_mlp each
              + 2 * d * vocab                         logits (tied unembedding)
              + 2 * 2 * n_layers * tokens * d         attention scores q.k and pattern @ v,
                                                      over the full T x T square (a
                                                      causal kernel may skip half of it)
    Biases, LayerNorms, GELU and softmax are left out (under 1% here).
    """
    d = D_MODEL
    per_token = 2 * N_LAYERS * (4 * d * d + 2 * d * D_MLP) + 2 * d * VOCAB
    per_token += 2 * 2 * N_LAYERS * tokens * d
    return tokens * per_token


def gemm_mix(dtype: torch.dtype, tokens: int) -> tuple[Callable[[], None], float]:
    """The machine's GEMM ceiling for this model: its weight matmuls as bare `torch.mm`
    calls, x[tokens, k] @ w[k, n], as many of each shape as one forward runs (one w per
    shape, reused). Returns (run it once, its FLOPs); it is timed alongside the models."""
    shapes = [  # (k, n, calls per forward)
        (D_MODEL, 3 * D_MODEL, N_LAYERS),  # qkv
        (D_MODEL, D_MODEL, N_LAYERS),  # attention output
        (D_MODEL, D_MLP, N_LAYERS),  # MLP in
        (D_MLP, D_MODEL, N_LAYERS),  # MLP out
        (D_MODEL, VOCAB, 1),  # logits
    ]
    operands = [
        (torch.randn(tokens, k, dtype=dtype), torch.randn(k, n, dtype=dtype), calls)
        for k, n, calls in shapes
    ]

    def run() -> None:
        for x, w, calls in operands:
            for _ in range(calls):
                torch.mm(x, w)

    return run, sum(2 * tokens * k * n * calls for k, n, calls in shapes)


# ---- 1. prefill throughput ------------------------------------------------------------
def build_models(directory: Path):
    """A random transformers GPT-2 (medium) and gpt2lab's copy of the same weights."""
    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_CONFIG)).eval()
    theirs.save_pretrained(directory)
    ours = gpt2lab.load(directory)
    return ours, theirs


def prefill(ours, theirs, tokens: int, rounds: int) -> None:
    print(f"## 1. Prefill: one forward of [1, {tokens}] tokens, logits for all positions\n")
    print(f"transformers attention implementation: {theirs.config._attn_implementation}")
    x = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(0))
    flops = forward_flops(tokens)
    rows = []
    for label, dtype in DTYPES.items():
        ours.to(dtype)
        theirs.to(dtype)
        gemm, gemm_flops = gemm_mix(dtype, tokens)
        fns = {
            "gpt2lab": lambda: ours(x),
            "transformers": lambda: theirs(input_ids=x, use_cache=False).logits,
            "GEMM ceiling (torch.mm)": gemm,
        }
        with torch.inference_mode():
            warm = {name: fn() for name, fn in fns.items()}  # warm-up, and the weight check
            diff = (warm["gpt2lab"].float() - warm["transformers"].float()).abs().max().item()
            print(f"\n{label}: max |logit diff| gpt2lab vs transformers = {diff:.3g}")
            del warm
            times = interleaved_rounds(fns, rounds)
        show_rounds(times)
        best = {name: min(ts) for name, ts in times.items()}
        median_ratio = statistics.median(times["transformers"]) / statistics.median(
            times["gpt2lab"]
        )
        rows.append((label, best, median_ratio, gemm_flops / best["GEMM ceiling (torch.mm)"]))

    print("\n| dtype | gpt2lab tok/s | transformers tok/s | ratio | ratio of medians |")
    print("|---|---:|---:|---:|---:|")
    for label, best, median_ratio, _ in rows:
        ours_tps, theirs_tps = tokens / best["gpt2lab"], tokens / best["transformers"]
        print(
            f"| {label} | {ours_tps:.0f} | {theirs_tps:.0f} | {ours_tps / theirs_tps:.2f} "
            f"| {median_ratio:.2f} |"
        )
    print(
        "\nratio = gpt2lab / transformers throughput, best round each (> 1: gpt2lab is faster);"
        "\nratio of medians = the same from median rounds, a cross-check on a noisy machine\n"
    )

    print(f"model FLOPs per forward: {flops / 1e9:.1f} G (formula in forward_flops)\n")
    print(
        "| dtype | GEMM GFLOP/s | gpt2lab GFLOP/s (% of GEMM) | transformers GFLOP/s (% of GEMM) |"
    )
    print("|---|---:|---:|---:|")
    for label, best, _, ceiling in rows:
        cells = [f"{ceiling / 1e9:.0f}"]
        for name in ("gpt2lab", "transformers"):
            achieved = flops / best[name]
            cells.append(f"{achieved / 1e9:.0f} ({100 * achieved / ceiling:.0f}%)")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nGEMM = the model's weight matmuls as bare torch.mm calls (see gemm_mix)\n")


# ---- 2. hook overhead -------------------------------------------------------------------
def hook_overhead(directory: Path, tokens: int, rounds: int) -> None:
    print("## 2. Hook overhead (gpt2lab, fp32)\n")
    model = gpt2lab.load(directory)
    x = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(1))
    resid_post = [(lambda name: name.endswith("hook_resid_post"), lambda act, hook: None)]

    def hooked():
        with model.hooks(resid_post):
            return model(x)

    fns = {"plain": lambda: model(x), "no-op hook x resid_post": hooked}
    with torch.inference_mode():
        for fn in fns.values():
            fn()  # warm-up
        times = interleaved_rounds(fns, rounds)
    show_rounds(times)
    plain = min(times["plain"])
    print("\n| variant | tok/s | time vs plain |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {tokens / min(ts):.0f} | {min(ts) / plain:.3f} |")
    print(f"\n(no-op hook = `lambda x, hook: None` on all {N_LAYERS} hook_resid_post points)\n")


# ---- 3. peak RSS while loading -------------------------------------------------------------
# Run as `python -c PROBE <directory>` in a fresh interpreter. The baseline is the
# resident set after the imports; the peak is the high-water mark after loading. It is
# read from /proc/self/status (VmHWM) rather than getrusage's ru_maxrss: Linux carries
# ru_maxrss over from the parent across fork+exec, so a child of this (multi-GiB)
# process would report the parent's peak. VmHWM belongs to the new address space only.
# Pages of a memory-mapped file count as resident too once touched, so a 1-token
# forward (which reads every weight) is run after loading and the RSS measured again.
PROBE = """
import json, sys, time
import torch
{imports}

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

base, base_file = status("VmRSS"), status("RssFile")
start = time.perf_counter()
model = {load}
seconds = time.perf_counter() - start
peak = status("VmHWM")
with torch.inference_mode():
    model(torch.zeros(1, 1, dtype=torch.long))
print(json.dumps(dict(
    base=base, peak=peak, seconds=seconds, dtype=str(next(model.parameters()).dtype),
    used=status("VmRSS"), file_backed=status("RssFile") - base_file,
)))
"""
LOADERS = {
    "gpt2lab.load": ("import gpt2lab", "gpt2lab.load(sys.argv[1])"),
    "GPT2LMHeadModel.from_pretrained": (
        "from transformers import GPT2LMHeadModel",
        "GPT2LMHeadModel.from_pretrained(sys.argv[1])",
    ),
}


def load_memory(directory: Path) -> None:
    print("## 3. Peak RSS while loading the checkpoint (fresh subprocess each)\n")
    weights = directory / "model.safetensors"
    size = weights.stat().st_size
    print(f"checkpoint: {weights.name}, fp32, {size / 2**30:.2f} GiB (x file = multiple of this)\n")
    print(
        "| loader | dtype | load s | peak during load - baseline | x file "
        "| RSS after a 1-token forward - baseline | x file | of which file-backed |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, (imports, load) in LOADERS.items():
        code = PROBE.format(imports=imports, load=load)
        out = subprocess.run(
            [sys.executable, "-c", code, str(directory)], capture_output=True, text=True, check=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        peak, used = r["peak"] - r["base"], r["used"] - r["base"]
        print(
            f"| {name} | {r['dtype'].removeprefix('torch.')} | {r['seconds']:.1f} "
            f"| {peak / 2**30:.2f} GiB | {peak / size:.2f} "
            f"| {used / 2**30:.2f} GiB | {used / size:.2f} | {r['file_backed'] / 2**30:.2f} GiB |"
        )
    print(
        "\nfile-backed = pages of the memory-mapped checkpoint: shared with the page cache and"
        "\nreclaimable, unlike anonymous memory (a loader that maps the file reads it lazily)\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 128 tokens, 2 rounds")
    parser.add_argument("--rounds", type=int, help="timed rounds per model (default 5)")
    parser.add_argument("--tokens", type=int, help="tokens in the prefill batch (default 512)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's; 1 is steadier on a busy machine)",
    )
    args = parser.parse_args()
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    tokens = args.tokens if args.tokens is not None else (128 if args.quick else 512)
    if not 1 <= tokens <= N_CTX:
        parser.error(f"--tokens must be in [1, {N_CTX}]")
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    load_at_start = os.getloadavg()[0]
    print(f"# gpt2lab vs transformers, gpt2-medium size, {tokens} tokens, best of {rounds}\n")
    if load_at_start > 0.5:
        print(
            f"note: 1-minute load average {load_at_start:.1f} on {os.cpu_count()} cores at start; "
            "if other work is still running, timings will be noisy\n"
        )
    with tempfile.TemporaryDirectory(prefix="gpt2lab-bench-") as tmp:
        directory = Path(tmp)
        ours, theirs = build_models(directory)
        prefill(ours, theirs, tokens, rounds)
        del ours, theirs
        hook_overhead(directory, tokens, max(2, math.ceil(rounds / 2)))
        load_memory(directory)
    print_machine(f"load average (1 min) at start: {load_at_start:.2f}")


if __name__ == "__main__":
    main()
