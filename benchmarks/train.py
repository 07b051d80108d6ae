"""Training benchmark: gpt2lab's training step against a plain transformers loop, on CPU.

    python benchmarks/train.py [--quick] [--steps N] [--rounds R] [--mode fp32|bf16|both]
                               [--profile]

What it measures
Training throughput (tokens/s) and MFU of a small GPT-2 (6 layers, d_model 384,
6 heads, vocab 50257, context 256) trained with batch 8 x 256 tokens, in float32 and
with bfloat16 autocast, for
- gpt2lab: `gpt2lab.GPT2` with the optimizer of `gpt2lab.training.optim.make_optimizer`
  (built from a `TrainConfig` holding the settings below), i.e. what `gpt2lab train`
  runs, and
- transformers: `GPT2LMHeadModel` (its default attention implementation, dropout set to
  0.0 since gpt2lab has none) with `torch.optim.AdamW` in its default implementation,
  i.e. what a plain hand-written loop runs. (torch picks foreach only when every
  parameter is on CUDA-like devices, so on the CPU the default is the single-tensor
  for-loop; gpt2lab asks for `fused=True`.)

Method
- Same step, same code: one function (`train_step`) runs both sides; only the model's
  forward call, the loss function and the optimizer differ: gpt2lab's trainer uses
  `gpt2lab.training.loss.cross_entropy` (in place on the logits), the transformers
  loop `F.cross_entropy(logits.float().flatten(0, 1), y.flatten())`. It is the trainer's step: lr from
  `gpt2lab.training.optim.lr_at` -> forward (under `torch.autocast("cpu", bfloat16)`
  in bf16 mode) -> the loss -> backward -> `loss.item()` -> clip_grad_norm_(1.0) -> optimizer.step() ->
  zero_grad(set_to_none=True).
- Same hyperparameters: AdamW lr 6e-4 (no warmup, cosine over 1000 steps, so ~6e-4
  throughout), betas (0.9, 0.95), weight decay 0.1 on matrices (dim >= 2: linear
  weights and both embeddings) and 0 on biases / LayerNorms, for both sides.
- Same weights: a randomly initialised GPT2LMHeadModel is written with
  `save_pretrained` and read back with `gpt2lab.load`; each mode starts both sides
  from these weights again. The fp32 logits are compared once before training.
- Same data: batch i is the same for both sides (8 random windows, from a seeded
  generator, of a fixed random token tensor). The per-step losses of the two sides
  are compared at the end of each mode, as a check that both train the same model.
- Interleaved: blocks of `--steps` training steps alternate between the sides
  (ours, theirs, theirs, ours, ... : the order flips every round), after untimed
  warm-up steps, so drift in machine load hits both alike. Best of `--rounds` rounds
  (the fastest block's time per step) is reported, since background noise only ever
  adds time; every round is printed too, and the medians are reported as well.

MFU = tokens/s * flops_per_token / peak, as in nanoGPT:
    flops_per_token = 6 * N + 12 * n_layers * d_model * seq_len
where N counts the parameters without the position embedding but with the (tied)
token embedding, which is also the lm head: 6 FLOPs per weight per token (forward 2,
backward 4), plus the attention scores and pattern @ v. `peak` is this CPU's measured
matmul speed in the mode's dtype (float32 or bfloat16): the fastest of several
[2048, 2048] @ [2048, 2048] `torch.mm` calls, measured once per round between the
timed blocks, so it sees the same machine load as the models.

`--profile` runs torch.profiler over one step of each side afterwards and prints the
ops sorted by self CPU time, plus the time per phase of the step.

Both sides share the process, so process-wide settings hit both alike: the thread
count, and glibc malloc's. By default glibc serves each block over 32 MB with a fresh
mmap and unmaps it on free, so every [2048, 50257] logits-sized temporary (411 MB in
fp32) is page-faulted in again every step; `MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=100000000000` keeps freed memory in the heap instead and makes
both sides markedly faster. Such `MALLOC_*` variables are printed with the machine.
Timings are only meaningful on an otherwise idle machine: with 2 threads on 2 cores,
any other process stalls every parallel region, and ops-heavy code the most.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from machine import print_machine
from torch.profiler import ProfilerActivity, record_function

import gpt2lab
from gpt2lab.training.config import TrainConfig
from gpt2lab.training.loss import cross_entropy
from gpt2lab.training.optim import lr_at, make_optimizer

N_LAYERS, D_MODEL, N_HEADS, VOCAB, N_CTX = 6, 384, 6, 50257, 256
BATCH, SEQ = 8, 256
TOKENS_PER_STEP = BATCH * SEQ
HF_CONFIG = dict(
    n_layer=N_LAYERS, n_embd=D_MODEL, n_head=N_HEADS, vocab_size=VOCAB, n_positions=N_CTX,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
)  # fmt: skip
MODES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEED = 1337


# ---- configuration, data, models ----------------------------------------------------
def train_config(mode: str) -> TrainConfig:
    """The gpt2lab run configuration this benchmark's step follows."""
    cfg = TrainConfig()
    m, t = cfg.model, cfg.train
    m.n_layers, m.d_model, m.n_heads, m.n_ctx = N_LAYERS, D_MODEL, N_HEADS, N_CTX
    t.device, t.dtype, t.seed = "cpu", "float32" if mode == "fp32" else "bfloat16", SEED
    t.batch_size, t.seq_len, t.grad_accum = BATCH, SEQ, 1
    t.lr, t.warmup_steps, t.max_steps = 6e-4, 0, 1000
    t.beta1, t.beta2, t.weight_decay, t.grad_clip = 0.9, 0.95, 0.1, 1.0
    return cfg


class Batches:
    """Batch i: BATCH random windows of SEQ + 1 tokens from a fixed random token stream."""

    def __init__(self, n_tokens: int = 1 << 20, seed: int = SEED):
        gen = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (n_tokens,), generator=gen)
        self.seed = seed

    def __call__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        starts = torch.randint(0, len(self.tokens) - SEQ - 1, (BATCH,), generator=gen).tolist()
        rows = torch.stack([self.tokens[s : s + SEQ + 1] for s in starts])
        return rows[:, :-1], rows[:, 1:]  # as TokenShards.batch returns them


def hf_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """A plain loop's AdamW: decay on matrices only, torch's default implementation."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))


def optimizer_kind(opt: torch.optim.Optimizer) -> str:
    fused, foreach = opt.defaults.get("fused"), opt.defaults.get("foreach")
    if fused:
        return f"{type(opt).__name__}(fused=True)"
    if foreach:
        return f"{type(opt).__name__}(foreach=True)"
    return f"{type(opt).__name__}, default implementation (the for-loop one on the CPU)"


def flops_per_token(model: torch.nn.Module) -> float:
    """nanoGPT's: 6 * (params - position embedding) + 12 * n_layers * d_model * seq_len."""
    n = sum(p.numel() for p in model.parameters()) - N_CTX * D_MODEL
    return 6 * n + 12 * N_LAYERS * D_MODEL * SEQ


@dataclass
class Side:
    name: str
    model: torch.nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]  # tokens -> logits
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> mean CE
    step: int = 0
    losses: list[float] = field(default_factory=list)


def build_sides(directory: Path, hf_init: torch.nn.Module, cfg: TrainConfig) -> list[Side]:
    ours = gpt2lab.load(directory).train()
    theirs = copy.deepcopy(hf_init).train()  # deepcopy keeps lm_head tied to wte
    return [
        Side("gpt2lab", ours, ours, make_optimizer(ours, cfg, torch.device("cpu")), cross_entropy),
        Side(
            "transformers",
            theirs,
            lambda x: theirs(input_ids=x, labels=None).logits,
            hf_optimizer(theirs, cfg),
            lambda logits, y: F.cross_entropy(logits.float().flatten(0, 1), y.flatten()),
        ),
    ]


# ---- the step ------------------------------------------------------------------------
def train_step(side: Side, batches: Batches, cfg: TrainConfig, autocast, mark=None) -> None:
    """One step of gpt2lab's Trainer.train (grad_accum 1, one process), for either side.

    `mark(name)` (a profiler range) labels the phases when profiling."""
    mark = mark or (lambda name: nullcontext())
    t = cfg.train
    lr = lr_at(side.step, cfg)
    for group in side.optimizer.param_groups:
        group["lr"] = lr
    x, y = batches(side.step)
    with mark("forward"):
        with autocast:
            logits = side.forward(x)
    with mark("loss"):
        loss = side.loss(logits, y) / t.grad_accum
    with mark("backward"):
        loss.backward()
    total = loss.item()
    with mark("clip"):
        torch.nn.utils.clip_grad_norm_(
            [p for p in side.model.parameters() if p.requires_grad], t.grad_clip
        )
    with mark("optimizer.step"):
        side.optimizer.step()
    with mark("zero_grad"):
        side.optimizer.zero_grad(set_to_none=True)
    side.step += 1
    side.losses.append(total)


def make_autocast(mode: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else nullcontext()


def time_interleaved(
    sides: list[Side], batches: Batches, cfg: TrainConfig, mode: str, steps: int, rounds: int
) -> dict[str, list[float]]:
    """Seconds per step of each block of `steps` steps, per side; sides alternate."""
    autocast = make_autocast(mode)
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    times["peak"] = []  # FLOP/s of the matmul probe, once per round
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            start = time.perf_counter()
            for _ in range(steps):
                train_step(side, batches, cfg, autocast)
            times[side.name].append((time.perf_counter() - start) / steps)
        times["peak"].append(peak_flops(MODES[mode]))
    return times


# ---- the machine's matmul peak ---------------------------------------------------------
def peak_flops(dtype: torch.dtype, n: int = 2048, reps: int = 4) -> float:
    """FLOP/s of the fastest of `reps` [n, n] @ [n, n] torch.mm calls."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ---- one mode -------------------------------------------------------------------------------
def run_mode(mode: str, directory: Path, hf_init, batches: Batches, args) -> dict:
    cfg = train_config(mode)
    sides = build_sides(directory, hf_init, cfg)
    autocast = make_autocast(mode)
    print(f"\n## {mode}: {args.warmup} warm-up steps each, then {args.rounds} rounds")
    print(f"of {args.steps} steps per side, interleaved\n")
    for _ in range(args.warmup):
        for side in sides:
            train_step(side, batches, cfg, autocast)
    times = time_interleaved(sides, batches, cfg, mode, args.steps, args.rounds)
    peaks = times.pop("peak")
    peak = max(peaks)
    for name, ts in times.items():
        print(f"  {name:<13} s/step per round: " + " ".join(f"{t:.3f}" for t in ts))
    print(
        f"  matmul peak ({MODES[mode]}) per round, GFLOP/s: "
        + " ".join(f"{p / 1e9:.0f}" for p in peaks)
    )

    ours, theirs = sides
    diffs = [abs(a - b) for a, b in zip(ours.losses, theirs.losses, strict=True)]
    print(
        f"  losses, step 1: gpt2lab {ours.losses[0]:.5f}, transformers {theirs.losses[0]:.5f}; "
        f"step {len(diffs)}: {ours.losses[-1]:.5f}, {theirs.losses[-1]:.5f}; "
        f"max |diff| over {len(diffs)} steps {max(diffs):.2g}"
    )
    result = {"mode": mode, "peak": peak, "times": times}
    if args.profile:
        result["profiles"] = {s.name: profile_step(s, batches, cfg, autocast) for s in sides}
    return result


def profile_step(side: Side, batches: Batches, cfg: TrainConfig, autocast) -> str:
    train_step(side, batches, cfg, autocast)  # warm
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(side, batches, cfg, autocast, mark=record_function)
    events = prof.key_averages()
    phases = [e for e in events if e.key in PHASES]
    lines = [
        "phases: "
        + ", ".join(
            f"{e.key} {e.cpu_time_total / 1e3:.0f} ms"
            for e in sorted(phases, key=lambda e: PHASES.index(e.key))
        )
    ]
    ops = [e for e in events if e.key not in PHASES]
    ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    lines.append(f"{'op':<44} {'self ms':>9} {'%':>6} {'calls':>6}")
    for e in ops[:22]:
        lines.append(
            f"{e.key[:44]:<44} {e.self_cpu_time_total / 1e3:>9.1f} "
            f"{100 * e.self_cpu_time_total / total:>6.1f} {e.count:>6}"
        )
    return "\n".join(lines)


PHASES = ["forward", "loss", "backward", "clip", "optimizer.step", "zero_grad"]


# ---- reporting -----------------------------------------------------------------------------
def report(results: list[dict], fpt: float, args) -> None:
    print("\n## Results\n")
    print(
        f"best of {args.rounds} rounds x {args.steps} steps, batch {BATCH} x {SEQ} "
        f"= {TOKENS_PER_STEP} tokens/step\n"
    )
    print("| mode | gpt2lab tok/s | transformers tok/s | ratio | gpt2lab MFU | transformers MFU |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        tps = {name: TOKENS_PER_STEP / min(ts) for name, ts in r["times"].items()}
        ours, theirs = tps["gpt2lab"], tps["transformers"]
        mfu = [100 * v * fpt / r["peak"] for v in (ours, theirs)]
        print(
            f"| {r['mode']} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} "
            f"| {mfu[0]:.1f}% | {mfu[1]:.1f}% |"
        )
    print("\n| mode | gpt2lab median tok/s | transformers median tok/s | ratio of medians |")
    print("|---|---:|---:|---:|")
    for r in results:
        med = {n: TOKENS_PER_STEP / statistics.median(ts) for n, ts in r["times"].items()}
        ratio = med["gpt2lab"] / med["transformers"]
        print(f"| {r['mode']} | {med['gpt2lab']:.0f} | {med['transformers']:.0f} | {ratio:.2f} |")
    print(
        "\nratio = gpt2lab / transformers tokens/s (> 1: gpt2lab is faster). "
        f"MFU = tok/s x {fpt / 1e6:.1f} MFLOP/token / matmul peak "
        "(" + ", ".join(f"{r['mode']} {r['peak'] / 1e9:.0f} GFLOP/s" for r in results) + ")\n"
    )
    for r in results:
        for name, text in r.get("profiles", {}).items():
            print(f"### Profile, {r['mode']}, {name}: one step, ops by self CPU time\n")
            print("```\n" + text + "\n```\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 warm-up, 1 x 1 step")
    parser.add_argument("--steps", type=int, help="steps per timed block (default 3)")
    parser.add_argument("--rounds", type=int, help="timed blocks per side (default 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps per side (default 2)")
    parser.add_argument("--mode", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--profile", action="store_true", help="also profile one step each")
    args = parser.parse_args()
    args.steps = args.steps or (1 if args.quick else 3)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if min(args.steps, args.rounds) < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be at least 1, --warmup at least 0")
    modes = list(MODES) if args.mode == "both" else [args.mode]

    print(
        f"# Training: gpt2lab vs a transformers loop, GPT-2 {N_LAYERS} layers x {D_MODEL} "
        f"({N_HEADS} heads), vocab {VOCAB}, batch {BATCH} x {SEQ}, CPU\n"
    )
    transformers.utils.logging.disable_progress_bar()
    batches = Batches()
    with tempfile.TemporaryDirectory(prefix="gpt2lab-bench-train-") as tmp:
        directory = Path(tmp)
        torch.manual_seed(0)
        hf_init = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_CONFIG))
        hf_init.save_pretrained(directory)
        ours = gpt2lab.load(directory)
        fpt = flops_per_token(ours)
        assert fpt == flops_per_token(hf_init), "the two models differ in size"
        x, _ = batches(0)
        with torch.no_grad():
            diff = (ours(x) - hf_init.eval()(input_ids=x).logits).abs().max().item()
        print(f"transformers attention implementation: {hf_init.config._attn_implementation}")
        for name, opt in (
            ("gpt2lab", make_optimizer(ours, train_config("fp32"), torch.device("cpu"))),
            ("transformers", hf_optimizer(hf_init, train_config("fp32"))),
        ):
            print(f"{name} optimizer: {optimizer_kind(opt)}")
        print(f"parameters: {sum(p.numel() for p in ours.parameters()):,} (tied lm head)")
        print(f"flops per token: {fpt / 1e6:.1f} M (6 N + 12 L d T, N without wpe)")
        print(f"fp32 max |logit diff| gpt2lab vs transformers at init: {diff:.3g}")
        del ours
        results = [run_mode(mode, directory, hf_init, batches, args) for mode in modes]
    report(results, fpt, args)
    malloc = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    print_machine(f"malloc settings: {malloc or 'glibc defaults'}")


if __name__ == "__main__":
    main()
