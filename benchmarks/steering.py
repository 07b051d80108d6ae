"""Steering benchmark: what a steering vector adds to generation time (goal: <= 3%).

    python benchmarks/steering.py [--quick] [--rounds N] [--new-tokens 64] [--sizes ...]

What it measures: greedy decoding of `new_tokens` tokens after a short prompt, batch 1,
KV cache on, float32, CPU, no grad, three ways on the same model:
- plain: `model.generate(prompt)`;
- steered, all: one mean-difference vector added at the middle layer's hook_resid_pre at
  every position (`steer=(v, 4.0)`);
- steered, generated: the same vector at the generated positions only.
Models: gpt2-medium dimensions (random weights, `GPT2Config.preset`) and the bundled
4-layer model. Steering hooks only write, so the model keeps its fused kernels; the
cost is one masked add per step at one hook.

Method: same process, interleaved rounds (each side once per round, in turn), best of
N (noise only adds time), every round printed to stderr; the outputs are checked to
differ (the steering acts) before timing.
"""

from __future__ import annotations

import argparse
import sys

import torch
from machine import print_machine
from timing import interleaved_rounds, show_rounds

import gpt2lab
from gpt2lab import GPT2, GPT2Config
from gpt2lab.steering import Steering, mean_difference

PROMPT = "The meaning of love is"


def build(size: str):
    if size == "bundled":
        return gpt2lab.load("bundled").eval()
    return GPT2(GPT2Config.preset(size)).init_weights(seed=0).eval()


def measure(size: str, new_tokens: int, rounds: int) -> dict[str, float]:
    model = build(size)
    layer = model.cfg.n_layers // 2
    v = mean_difference(model, ["I love it", "so sweet"], ["I hate it", "so bitter"], layers=layer)
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    sides = {
        "plain": dict(options),
        "steered, all": dict(options, steer=(v, 4.0)),
        "steered, generated": dict(options, steer=Steering(v, 4.0, positions="generated")),
    }
    texts = {name: model.generate(PROMPT, **o) for name, o in sides.items()}
    assert texts["plain"] != texts["steered, all"], "the steering changed nothing"
    fns = {name: (lambda o=o: model.generate(PROMPT, **o)) for name, o in sides.items()}
    for fn in fns.values():  # warm-up
        fn()
    times = interleaved_rounds(fns, rounds)
    print(f"{size}:", file=sys.stderr)
    show_rounds(times, file=sys.stderr)
    return {name: min(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sizes", nargs="+", default=["gpt2-medium", "bundled"])
    ap.add_argument("--quick", action="store_true", help="3 rounds")
    args = ap.parse_args()
    rounds = 3 if args.quick else args.rounds
    torch.set_grad_enabled(False)
    n = args.new_tokens
    print(f"# steered generation (greedy, batch 1, {n} new tokens, KV cache, best of {rounds})\n")
    print("| model | plain tok/s | steered (all) tok/s | steered (generated) tok/s | "
          "all / plain (time) | generated / plain (time) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        best = measure(size, n, rounds)
        p, a, g = best["plain"], best["steered, all"], best["steered, generated"]
        print(f"| {size} | {n / p:.1f} | {n / a:.1f} | {n / g:.1f} | {a / p:.3f} | {g / p:.3f} |")
    print()
    print_machine()


if __name__ == "__main__":
    main()
