"""Decoding benchmark: gpt2lab (fp32, bf16, int8 weights) against transformers, on CPU.

    python benchmarks/generate.py [--quick] [--rounds N] [--new-tokens 64] [--layers 24]
                                  [--threads N] [--llama-cpp build/llama.cpp]

What it measures
1. Batch-1 greedy decoding at gpt2-medium size: a 16-token prompt, then 64 new
   tokens (16 with --quick). transformers fp32 (`hf.generate(do_sample=False,
   max_new_tokens=N, min_new_tokens=N)`) is the reference; against it run
   gpt2lab fp32, bf16 (`load(dtype="bfloat16")`), int8 (`load(quantize="int8")`: int8
   block weights, bf16 activations, bf16 unembedding; decoding on gpt2lab's VNNI
   int8 kernel where it builds; see gpt2lab/quantize.py and gpt2lab/kernels) and,
   for reference, transformers bf16 (`.to(torch.bfloat16)`). tokens/s = new tokens /
   wall time of the whole call (prompt prefill included), and each one's ratio to
   transformers fp32. Decoding one token reads every weight once, so memory speed
   caps it: the memory read speed is measured in the same rounds (a sum over a 512 MB
   tensor runs in every round, between the variants; its best round counts) and each
   variant's tokens/s is also given as a share of that ceiling (read speed / bytes of
   weights per token). On a shared machine (a VM) the read speed itself varies from
   minute to minute, which is why it is measured beside the variants, not before.
2. Batch-8 throughput: 8 prompts of 16 tokens, the same number of new tokens each,
   gpt2lab fp32 vs transformers fp32 (plus gpt2lab bf16 and int8).
3. Quality cost of the faster dtypes: max and mean |logit difference| of gpt2lab bf16
   and int8 against gpt2lab fp32 on a 256-token input (random weights, so the
   logits' own range is printed for scale), and the greedy tokens' agreement with
   fp32; then the perplexity of an embedded public-domain English text (Hamlet,
   III.i and Sonnet 18) under the bundled, trained model in fp32, bf16 and int8.
5. With --llama-cpp DIR (a build from scripts/build_llama_cpp.sh, or --llama-bench
   PATH): llama.cpp at the same precision, on GGUFs written by gpt2lab's own writer
   (gpt2lab.gguf_io) from the same weights: fp32 vs f32, bf16 vs bf16, int8 vs q8_0.
   llama-bench (same thread count) times the same work as gpt2lab's call: prefill 16
   tokens then decode N (`-pg 16,N`), so tok/s = N / that time on both sides; also
   decode alone (`-p 0 -n N`) and prefill alone (`-p 16 -n 0`, against gpt2lab's
   16-token forward with last-position logits, as llama.cpp computes), then batch 8
   (llama-batched-bench: 8 prompts of 16, N tokens each, T_PP + T_TG) against
   gpt2lab's batch-8 generate. llama.cpp's times are its own timers' (one repetition
   per call, after its warm-up; process start and model load not counted), interleaved
   with gpt2lab's rounds. Ceilings: read speed / bytes a step reads (the GGUF's tensors
   but position_embd; q8_0 reads 34 bytes per 32 weights, token_embd included, where
   gpt2lab int8 keeps its unembedding in bf16). On AMX CPUs with a GCC 12 build,
   llama.cpp runs with `--repack 0` (llama.cpp #26954); the run says which.

Method
- Same weights: a randomly initialised `transformers.GPT2LMHeadModel` is written with
  `save_pretrained` and read back with `gpt2lab.load`; the warm-up's greedy tokens
  of gpt2lab fp32 and transformers fp32 are compared (they should be identical).
- Same process, same prompt, interleaved: every variant runs once per round, in turn,
  so drift in machine load hits all alike. One untimed warm-up each, then N rounds;
  the best round is reported (noise only ever adds time); every round is printed.
- Neither side stops early: transformers gets `min_new_tokens`, gpt2lab
  `stop_at_eot=False`, so both generate exactly N tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch
import transformers
from llama_cpp import SAME_PRECISION, LlamaCpp, find_llama_bench, gguf_read_bytes
from machine import print_machine
from timing import interleaved_rounds, show_rounds

import gpt2lab
from gpt2lab.checkpoint import load  # gpt2lab.load does not pass quantize= on (yet)
from gpt2lab.errors import GPT2LabError
from gpt2lab.gguf_io import save_gguf

# gpt2-medium's dimensions (layers: --layers).
N_LAYERS, D_MODEL, N_HEADS, VOCAB, N_CTX = 24, 1024, 16, 50257, 1024
PROMPT_LEN, BATCH = 16, 8

# Public domain: Shakespeare, Hamlet III.i and Sonnet 18 (shared with the tests).
TEXT = (Path(__file__).parents[1] / "tests" / "data" / "hamlet_sonnet18.txt").read_text()


# ---- timing -------------------------------------------------------------------------
READ_MB = 512
READ = "(memory read)"


def timed_with_read_speed(
    fns: dict, rounds: int
) -> tuple[dict[str, list[float]], float, list[float]]:
    """`interleaved_rounds(fns)` with one more entry in every round: a sum over a
    READ_MB tensor (far beyond any cache), which is how a batch-1 decoding step reads
    its weights. Returns the rounds (that entry removed), the memory read speed in GB/s
    (the best round: measured in the same rounds, under the same load, as what it is
    the ceiling of; on a shared machine it varies from minute to minute) and each
    round's read speed, to pair each round with its own ceiling (`paired_share`)."""
    data = torch.ones(READ_MB * 2**20 // 4)
    data.sum()
    times = interleaved_rounds({**fns, READ: data.sum}, rounds)
    speeds = [data.numel() * 4 / t / 1e9 for t in times.pop(READ)]
    return times, max(speeds), speeds


def paired_share(
    seconds: list[float], work: float, speeds: list[float], read_bytes: float
) -> float:
    """The median over rounds of (work / that round's seconds) / (what that round's read
    speed allows: speed / read_bytes), in %: each round against the memory speed of its
    own moment, where the best-of-rounds share sets a best against a best taken minutes
    apart."""
    shares = [work / t / (g * 1e9 / read_bytes) for t, g in zip(seconds, speeds, strict=True)]
    return 100 * statistics.median(shares)


def paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """The median over rounds of theirs / ours (seconds, so > 1: gpt2lab faster), each
    round against the peer's run in the same round: on a machine whose memory speed
    drifts between rounds, the ratio of two bests compares two different moments."""
    return statistics.median(t / o for o, t in zip(ours, theirs, strict=True))


def weight_bytes(model) -> int:
    """Bytes one decoding step reads: every block's weights, the final LayerNorm and the
    unembedding (the token embedding, tied, or an int8 model's int8 copy of it, which its
    decoding step reads); embedding lookups touch one row only."""
    parts = [model.blocks, model.ln_final]
    total = sum(
        t.numel() * t.element_size() for m in parts for t in [*m.parameters(), *m.buffers()]
    )
    u = model.unembed
    unembed = model.wte.weight if u.weight is None else u.weight
    if u.int8_copy is not None and u.int8_copy.layer is not None:  # an int8 model reads its copy
        unembed = u.int8_copy.layer.q_weight
    return total + unembed.numel() * unembed.element_size()


def ratio_table(
    times: dict[str, list[float]],
    tokens: int,
    reference: str,
    ceilings: dict[str, float] | None = None,
    speeds: list[float] | None = None,
) -> None:
    """`ceilings`: name -> the tokens/s memory speed allows at the best read speed, for
    share-of-ceiling columns; `speeds`: each round's read speed, for the paired one."""
    best_ref = min(times[reference])
    med_ref = statistics.median(times[reference])
    extra = " of ceiling | of ceiling, paired rounds |" if ceilings else ""
    print("| model | tok/s | ms/token | vs transformers fp32 | ratio of medians |" + extra)
    print("|---|---:|---:|---:|---:|" + ("---:|---:|" if ceilings else ""))
    for name, ts in times.items():
        best = min(ts)
        row = (
            f"| {name} | {tokens / best:.1f} | {1000 * best / tokens:.1f} "
            f"| {best_ref / best:.2f} | {med_ref / statistics.median(ts):.2f} |"
        )
        if ceilings:
            top = max(speeds)
            per_byte = top * 1e9 / ceilings[name]  # bytes a token reads
            row += (f" {100 * tokens / best / ceilings[name]:.0f}% "
                    f"| {paired_share(ts, tokens, speeds, per_byte):.0f}% |")  # fmt: skip
        print(row)
    print(
        f"\ntok/s = new tokens generated ({tokens} in all) / wall time of the call, best round;"
        "\nvs transformers fp32 > 1: faster than transformers fp32\n"
    )


# ---- models ---------------------------------------------------------------------------
def build_models(directory: Path, n_layers: int):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=n_layers, n_embd=D_MODEL, n_head=N_HEADS, vocab_size=VOCAB, n_positions=N_CTX
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(directory)
    hf_bf16 = transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=torch.bfloat16).eval()
    ours = {
        "fp32": gpt2lab.load(directory),
        "bf16": gpt2lab.load(directory, dtype="bfloat16"),
        "int8": load(directory, quantize="int8"),
    }
    return hf, hf_bf16, ours


def generators(hf, hf_bf16, ours, prompt: torch.Tensor, new_tokens: int, with_hf_bf16: bool):
    """name -> a function running one greedy generation of `new_tokens` tokens."""
    mask = torch.ones_like(prompt)

    def theirs(model):
        return lambda: model.generate(
            input_ids=prompt,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=VOCAB - 1,
        )[:, prompt.shape[1] :]

    def mine(model):
        return lambda: model.generate(prompt, max_new_tokens=new_tokens, stop_at_eot=False)

    fns = {"transformers fp32": theirs(hf)}
    fns.update({f"gpt2lab {name}": mine(model) for name, model in ours.items()})
    if with_hf_bf16:
        fns["transformers bf16"] = theirs(hf_bf16)
    return fns


def ceilings(ours, gbps: float, batch: int) -> dict[str, float]:
    """name -> tokens/s if a step (`batch` tokens) only read the weights at `gbps`."""
    rate = {f"gpt2lab {name}": batch * gbps * 1e9 / weight_bytes(m) for name, m in ours.items()}
    rate["transformers fp32"] = rate["gpt2lab fp32"]  # the same weights, in the same dtype
    rate["transformers bf16"] = rate["gpt2lab bf16"]
    return rate


def decode(hf, hf_bf16, ours, batch: int, new_tokens: int, rounds: int, with_all: bool) -> None:
    prompt = torch.randint(
        0, VOCAB, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch)
    )
    fns = generators(hf, hf_bf16, ours, prompt, new_tokens, with_hf_bf16=with_all)
    if not with_all:
        fns = {k: v for k, v in fns.items() if k != "transformers bf16"}
    with torch.inference_mode():
        warm = {name: fn() for name, fn in fns.items()}  # warm-up, and the same-function check
        theirs = warm["transformers fp32"].tolist()
        for name, out in warm.items():
            if name == "transformers fp32":
                continue
            out = out.tolist() if isinstance(out, torch.Tensor) else out  # [batch][new]
            same = sum(
                a == b for r, s in zip(out, theirs, strict=True) for a, b in zip(r, s, strict=True)
            )
            print(f"  {name}: {same}/{batch * new_tokens} greedy tokens equal transformers fp32's")
        times, gbps, speeds = timed_with_read_speed(fns, rounds)
    show_rounds(times)
    print("  read speed (GB/s) by round: " + " ".join(f"{g:.1f}" for g in speeds))
    rate = ceilings(ours, gbps, batch)
    print(
        f"\nmemory read speed {gbps:.1f} GB/s (best of a {READ_MB} MB sum run in every round); "
        "the tok/s it allows if a step only read the weights: "
        + ", ".join(f"{name} {rate[f'gpt2lab {name}']:.0f}" for name in ours)
        + "\n"
    )
    ratio_table(times, batch * new_tokens, "transformers fp32", rate, speeds)


# ---- llama.cpp ---------------------------------------------------------------------------
def llama_section(ours, llama: LlamaCpp, new_tokens: int, rounds: int) -> None:
    print(f"## 5. llama.cpp at the same precision ({llama.threads} threads both sides)\n")
    print(f"llama.cpp: {llama.bench}; {llama.repack_note}\n")
    with tempfile.TemporaryDirectory(prefix="gpt2lab-bench-gguf-") as tmp:
        files = {n: save_gguf(ours["fp32"], Path(tmp) / f"bench-{k}.gguf", k)
                 for n, k in SAME_PRECISION.items()}  # fmt: skip
        one = torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
        eight = torch.randint(
            0, VOCAB, (BATCH, PROMPT_LEN), generator=torch.Generator().manual_seed(BATCH)
        )
        ll: dict[str, dict[str, list[float]]] = {n: {} for n in files}

        def peer(name: str):
            def run() -> None:
                for k, t in llama.bench_times(files[name], PROMPT_LEN, new_tokens).items():
                    ll[name].setdefault(k, []).append(t)

            return run

        def peer_batched(name: str):
            def run() -> None:
                t = llama.batched_time(files[name], PROMPT_LEN, new_tokens, BATCH)
                ll[name].setdefault("b8", []).append(t)

            return run

        fns, fns8 = {}, {}
        for n, m in ours.items():
            fns[f"gpt2lab {n}"] = lambda m=m: m.generate(one, max_new_tokens=new_tokens,
                                                         stop_at_eot=False)  # fmt: skip
            fns[f"gpt2lab {n} prefill"] = lambda m=m: m(one, logits_to_keep=1)
            fns[f"llama.cpp {SAME_PRECISION[n]}"] = peer(n)
            fns8[f"gpt2lab {n} batch {BATCH}"] = lambda m=m: m.generate(
                eight, max_new_tokens=new_tokens, stop_at_eot=False
            )
            if llama.batched is not None:
                fns8[f"llama.cpp {SAME_PRECISION[n]} batch {BATCH}"] = peer_batched(n)
        with torch.inference_mode():
            for fn in [*fns.values(), *fns8.values()]:  # warm-up
                fn()
            ll.update({n: {} for n in files})  # the warm-up's times are not kept
            times, gbps, speeds = timed_with_read_speed(fns, rounds)
            times8 = interleaved_rounds(fns8, max(1, rounds // 2))
        read = {n: gguf_read_bytes(f) for n, f in files.items()}
    for n in ours:  # llama.cpp's own timers replace the wall time of its processes
        times[f"llama.cpp {SAME_PRECISION[n]}"] = ll[n]["pg"]
        if llama.batched is not None:
            times8[f"llama.cpp {SAME_PRECISION[n]} batch {BATCH}"] = ll[n]["b8"]
    show_rounds(times)
    show_rounds(times8)
    for n in ours:
        print(f"  llama.cpp {SAME_PRECISION[n]:<14} decode-only rounds (s): "
              + " ".join(f"{t:.3f}" for t in ll[n]["tg"])
              + "; prefill: " + " ".join(f"{t:.4f}" for t in ll[n]["pp"]))  # fmt: skip
    print(f"\nmemory read speed {gbps:.1f} GB/s (best of a {READ_MB} MB sum run in every round; "
          "by round: " + " ".join(f"{g:.1f}" for g in speeds) + ")\n")  # fmt: skip
    N = new_tokens
    print(
        f"Batch 1: prefill {PROMPT_LEN} tokens then decode {N} (tok/s = {N} / time, best round)\n"
    )
    print("| precision | gpt2lab tok/s | of ceiling (paired rounds) | llama.cpp tok/s "
          "| of ceiling (paired rounds) | gpt2lab / llama.cpp | paired rounds "
          "| llama.cpp decode only, tok/s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n, m in ours.items():
        k = SAME_PRECISION[n]
        ours_ts = N / min(times[f"gpt2lab {n}"])
        theirs = N / min(ll[n]["pg"])
        c_ours, c_theirs = gbps * 1e9 / weight_bytes(m), gbps * 1e9 / read[n]
        p_ours = paired_share(times[f"gpt2lab {n}"], N, speeds, weight_bytes(m))
        p_theirs = paired_share(ll[n]["pg"], N, speeds, read[n])
        paired = paired_ratio(times[f"gpt2lab {n}"], ll[n]["pg"])
        print(f"| {n} / {k} | {ours_ts:.1f} | {100 * ours_ts / c_ours:.0f}% ({p_ours:.0f}%) "
              f"| {theirs:.1f} | {100 * theirs / c_theirs:.0f}% ({p_theirs:.0f}%) "
              f"| {ours_ts / theirs:.2f} | {paired:.2f} | {N / min(ll[n]['tg']):.1f} |")  # fmt: skip
    print(f"\nPrefill of {PROMPT_LEN} tokens, batch 1 (tok/s = {PROMPT_LEN} / time, best round)\n")
    print("| precision | gpt2lab tok/s | llama.cpp tok/s | gpt2lab / llama.cpp |")
    print("|---|---:|---:|---:|")
    for n in ours:
        a = PROMPT_LEN / min(times[f"gpt2lab {n} prefill"])
        b = PROMPT_LEN / min(ll[n]["pp"])
        print(f"| {n} / {SAME_PRECISION[n]} | {a:.0f} | {b:.0f} | {a / b:.2f} |")
    print(f"\nBatch {BATCH}: {BATCH} prompts of {PROMPT_LEN}, {N} new tokens each "
          f"(tok/s = {BATCH * N} / time, best round)\n")  # fmt: skip
    if llama.batched is None:
        print("skipped: no llama-batched-bench next to llama-bench\n")
        return
    print("| precision | gpt2lab tok/s | llama.cpp tok/s | gpt2lab / llama.cpp |")
    print("|---|---:|---:|---:|")
    for n in ours:
        k = SAME_PRECISION[n]
        a = BATCH * N / min(times8[f"gpt2lab {n} batch {BATCH}"])
        b = BATCH * N / min(times8[f"llama.cpp {k} batch {BATCH}"])
        print(f"| {n} / {k} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    print()


# ---- quality ---------------------------------------------------------------------------
def logit_quality(ours) -> None:
    print("## 3. Quality cost on the benchmark model (random weights), 256-token input\n")
    x = torch.randint(0, VOCAB, (1, 256), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        ref = ours["fp32"](x)
        print(f"fp32 logits: max |logit| {ref.abs().max():.3g}, std {ref.std():.3g}\n")
        print("| dtype | max abs logit diff vs fp32 | mean abs diff | argmax agrees with fp32 |")
        print("|---|---:|---:|---:|")
        for name in ("bf16", "int8"):
            got = ours[name](x).float()
            diff = (got - ref).abs()
            agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
            print(f"| {name} | {diff.max():.3g} | {diff.mean():.3g} | {100 * agree:.1f}% |")
    print()


def perplexity_quality() -> None:
    print("## 4. Perplexity of Hamlet III.i + Sonnet 18 under the bundled (trained) model\n")
    try:
        models = {
            "fp32": gpt2lab.load(),
            "bf16": gpt2lab.load(dtype="bfloat16"),
            "int8": load(quantize="int8"),
        }
    except GPT2LabError as e:
        print(f"skipped: the bundled model is not available ({e})\n")
        return
    cfg = models["fp32"].cfg
    n = len(models["fp32"].tokenizer.encode(TEXT))
    stride = cfg.n_ctx // 2
    print(
        f"bundled model: {cfg.n_layers} layers, d_model {cfg.d_model}, context {cfg.n_ctx}; "
        f"text: {n} tokens, sliding window {cfg.n_ctx}, stride {stride}\n"
    )
    print("| dtype | perplexity | change vs fp32 |")
    print("|---|---:|---:|")
    with torch.inference_mode():
        ppl = {name: m.perplexity(TEXT, stride=stride) for name, m in models.items()}
    for name, p in ppl.items():
        print(f"| {name} | {p:.4f} | {100 * (p / ppl['fp32'] - 1):+.3f}% |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 16 new tokens, 2 rounds")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 5; 2 with --quick)")
    parser.add_argument("--new-tokens", type=int, help="tokens to generate (default 64)")
    parser.add_argument("--layers", type=int, default=N_LAYERS, help="layers (default 24)")
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's; 1 is steadier when busy)"
    )
    parser.add_argument(
        "--llama-cpp",
        "--llama-bench",
        dest="llama",
        metavar="DIR",
        help="also time llama.cpp: its build folder (build/llama.cpp), bin/ or llama-bench",
    )
    args = parser.parse_args()
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    new_tokens = args.new_tokens if args.new_tokens is not None else (16 if args.quick else 64)
    if rounds < 1 or new_tokens < 1 or args.layers < 1:
        parser.error("--rounds, --new-tokens and --layers must be at least 1")
    if PROMPT_LEN + new_tokens > N_CTX:
        parser.error(f"--new-tokens must be at most {N_CTX - PROMPT_LEN}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    llama = LlamaCpp(find_llama_bench(args.llama), torch.get_num_threads()) if args.llama else None

    load_at_start = os.getloadavg()[0]
    size = "gpt2-medium size" if args.layers == N_LAYERS else f"{args.layers}-layer gpt2-medium"
    print(
        f"# Greedy decoding, gpt2lab vs transformers, {size}, prompt {PROMPT_LEN} tokens, "
        f"{new_tokens} new tokens, best of {rounds}\n"
    )
    if load_at_start > 0.5:
        print(
            f"note: 1-minute load average {load_at_start:.1f} on {os.cpu_count()} cores at start; "
            "if other work is still running, timings will be noisy\n"
        )
    with tempfile.TemporaryDirectory(prefix="gpt2lab-bench-gen-") as tmp:
        hf, hf_bf16, ours = build_models(Path(tmp), args.layers)
    print(f"transformers attention implementation: {hf.config._attn_implementation}\n")
    print("## 1. Batch 1\n")
    decode(hf, hf_bf16, ours, 1, new_tokens, rounds, with_all=True)
    print(f"## 2. Batch {BATCH} throughput\n")
    del hf_bf16
    decode(hf, None, ours, BATCH, new_tokens, max(1, rounds // 2), with_all=False)
    logit_quality(ours)
    del hf
    perplexity_quality()
    if llama is not None:
        llama_section(ours, llama, new_tokens, rounds)
    del ours
    print_machine(f"load average (1 min) at start: {load_at_start:.2f}")


if __name__ == "__main__":
    main()
