"""Where a batch-1 decoding step spends its time outside the weight reads.

    python benchmarks/decode_overhead.py [--layers 24] [--rounds 20] [--dtypes float32,bfloat16,int8]

A decode step reads every weight once; everything else (LayerNorms, attention over the
cache, residual adds, the KV-cache write, Python between the ops, threads waiting for
each other) is overhead that no faster matmul removes. For each dtype this times,
interleaved, best of N:
- `native step` / `eager step`: one `model(token, cache=cache)` call at gpt2-medium size
  (random weights), after a 16-token prompt, logits for the last token (what generation
  runs), with the step forced native (kernels/step.py: ids to logits in one C++ call) or
  eager (the blocks op by op in PyTorch);
- `matmuls`: the eager step's linear / int8 calls alone, on the kernels it chose, with
  1-row inputs;
- `read`: a sum over 512 MB (the memory read speed), so `weights` = the bytes a step
  reads / that speed = the step's floor on this machine;
and prints each step's time outside the weight reads (step - weights) with its share.
A `torch.profiler` table of the eager step's top ops (self CPU time) follows.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from machine import print_machine

import gpt2lab
from gpt2lab.config import GPT2Config
from gpt2lab.quantize import quantize


def build(layers: int, dtype: str) -> gpt2lab.GPT2:
    cfg = dataclasses.replace(GPT2Config.preset("gpt2-medium"), n_layers=layers)
    model = gpt2lab.GPT2(cfg).init_weights(seed=0).eval()
    if dtype == "int8":
        return quantize(model, "int8")
    return model.to(getattr(torch, dtype))


def step_runner(model, mode: str):
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    token = prompt[:, -1:]

    def run():
        cache = model.new_cache(1, 18)
        model(prompt, cache=cache, logits_to_keep=1)
        with gpt2lab.kernels.force("step", mode):
            start = time.perf_counter()
            model(token, cache=cache, logits_to_keep=1)
            return time.perf_counter() - start

    return run


def weight_bytes(model) -> int:
    """Bytes a step reads: every block's weights, the final LayerNorm, the unembedding
    (its int8 copy where the model has one and it is the one used, else the embedding)."""
    parts = [model.blocks, model.ln_final]
    total = sum(
        t.numel() * t.element_size() for m in parts for t in [*m.parameters(), *m.buffers()]
    )
    unembed = model.wte.weight if model.unembed.weight is None else model.unembed.weight
    return total + unembed.numel() * unembed.element_size()


def matmul_runner(model):
    """The step's weight reads alone: every block linear (int8 or dense) and the
    unembedding on one row, as the step calls them."""
    layers = []
    for block in model.blocks:
        layers += [
            (block.attn.c_attn, "none"), (block.attn.c_proj, "none"),
            (block.mlp.c_fc, block.mlp.fused_act or "none"), (block.mlp.c_proj, "none"),
        ]  # fmt: skip
    dtype = model.wte.weight.dtype
    wte = model.wte.weight
    xs = {n: torch.randn(1, 1, n).to(dtype) for n in {model.cfg.d_model, model.cfg.d_mlp}}

    def run():
        start = time.perf_counter()
        for layer, act in layers:
            layer(xs[layer.in_features], act=act)
        gpt2lab.kernels.linear.linear(xs[model.cfg.d_model], wte)
        return time.perf_counter() - start

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--dtypes", default="float32,bfloat16,int8")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import gpt2lab.kernels.linear  # noqa: F401

    dtypes = args.dtypes.split(",")
    models = {d: build(args.layers, d) for d in dtypes}
    runs = {}
    for d, m in models.items():
        runs[f"{d} native step"] = step_runner(m, "native")
        runs[f"{d} eager step"] = step_runner(m, "eager")
        runs[f"{d} matmuls"] = matmul_runner(m)
    data = torch.ones(512 * 2**20 // 4)

    def read():
        start = time.perf_counter()
        data.sum()
        return time.perf_counter() - start

    runs["read"] = read
    best = {k: float("inf") for k in runs}
    with torch.inference_mode():
        for run in runs.values():  # warm-up: kernels built and chosen
            run()
            run()
        for _ in range(args.rounds):
            for name, run in runs.items():
                best[name] = min(best[name], run())
    print_machine(
        f"gpt2-medium shapes, {args.layers} layers, best of {args.rounds} interleaved rounds"
    )
    gbps = data.numel() * 4 / best["read"] / 1e9
    print(f"\n## Per-token time outside the weight reads (batch 1, 17th token; read speed "
          f"{gbps:.1f} GB/s)\n")  # fmt: skip
    print("| dtype | weights ms | native step ms | outside | eager step ms | outside "
          "| eager matmuls alone ms |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for d in dtypes:
        floor = weight_bytes(models[d]) / gbps / 1e6
        nat, eag = best[f"{d} native step"] * 1e3, best[f"{d} eager step"] * 1e3
        print(f"| {d} | {floor:.2f} | {nat:.2f} | {nat - floor:.2f} ({(nat - floor) / nat:.0%}) "
              f"| {eag:.2f} | {eag - floor:.2f} ({(eag - floor) / eag:.0%}) "
              f"| {best[f'{d} matmuls'] * 1e3:.2f} |")  # fmt: skip
    if args.no_profile:
        return
    from torch.profiler import ProfilerActivity, profile

    for d in dtypes:
        run = runs[f"{d} eager step"]
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                run()
        print(f"\n## {d}: top ops of 5 eager steps (prompt + token each), by self CPU time\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
