"""Interpretability benchmark: gpt2lab's hooks and activation cache against transformer-lens.

    python benchmarks/interp.py [--quick] [--rounds N] [--tokens 512] [--new-tokens 24]

What it measures (gpt2-medium dimensions, random weights, float32, CPU, no grad)
1. Caching: one forward over [1, tokens] as a plain forward, with every activation
   cached (`run_with_cache()`, TransformerLens' default set: every hook point but the
   opt-in per-head `hook_result`), and with only the residual stream cached
   (`names_filter=lambda n: "resid" in n`); the same three for transformer-lens 3.x
   `HookedTransformer` on the same weights. Cache memory is reported for both.
2. Generation with an active hook: greedy decoding of `new_tokens` tokens after a
   16-token prompt, plain and with a steering hook (a vector added to
   `blocks.12.hook_resid_pre` at every step, KV cache on) — gpt2lab against
   transformer-lens' `generate` with the same hook inside `model.hooks(...)`.

Method: same weights (a random transformers GPT2LMHeadModel saved, then loaded by
gpt2lab and converted by transformer-lens' own GPT-2 converter; outputs compared once),
same process, interleaved rounds, best of N (noise only adds time), every round printed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Callable

import torch
from machine import print_machine
from timing import interleaved_rounds, show_rounds

import gpt2lab

warnings.filterwarnings("ignore")
N_LAYERS, D_MODEL, N_HEADS, VOCAB, N_CTX = 24, 1024, 16, 50257, 1024


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best seconds per name after one warm-up each (every round printed to stderr)."""
    for fn in fns.values():
        fn()
    times = interleaved_rounds(fns, rounds)
    show_rounds(times, file=sys.stderr)
    return {name: min(ts) for name, ts in times.items()}


def build(layers: int):
    import transformers
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    cfg = transformers.GPT2Config(
        n_layer=layers, n_embd=D_MODEL, n_head=N_HEADS, vocab_size=VOCAB, n_positions=N_CTX
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = gpt2lab.load(d).eval()
    tl_cfg = HookedTransformerConfig(
        n_layers=layers, d_model=D_MODEL, n_heads=N_HEADS, d_head=D_MODEL // N_HEADS,
        d_mlp=4 * D_MODEL, d_vocab=VOCAB, n_ctx=N_CTX, act_fn="gelu_new",
        normalization_type="LN", positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel", default_prepend_bos=False, device="cpu",
    )  # fmt: skip
    ref = HookedTransformer(tl_cfg)
    ref.load_and_process_state_dict(
        convert_gpt2_weights(hf, tl_cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False,
    )  # fmt: skip
    return ours, ref.eval()


def cache_bytes(cache) -> int:
    return sum(v.numel() * v.element_size() for v in cache.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 layers, 128 tokens: a smoke run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()
    layers = 4 if args.quick else N_LAYERS
    tokens = 128 if args.quick else args.tokens
    torch.set_grad_enabled(False)

    ours, ref = build(layers)
    x = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(1))
    diff = (ours(x) - ref(x)).abs().max().item()
    resid = lambda n: "resid" in n  # noqa: E731

    print(
        f"# gpt2lab vs transformer-lens: caching ({layers} layers, d_model {D_MODEL}, {tokens} tokens, fp32)\n"
    )
    print(f"same function: max |logit difference| {diff:.2e}\n")
    best = interleaved(
        {
            "gpt2lab forward": lambda: ours(x),
            "gpt2lab run_with_cache": lambda: ours.run_with_cache(x),
            "gpt2lab resid-only cache": lambda: ours.run_with_cache(x, names_filter=resid),
            "TL forward": lambda: ref(x),
            "TL run_with_cache": lambda: ref.run_with_cache(x),
            "TL resid-only cache": lambda: ref.run_with_cache(x, names_filter=resid),
        },
        args.rounds,
    )
    ours_mem = cache_bytes(ours.run_with_cache(x)[1])
    ref_mem = cache_bytes(ref.run_with_cache(x)[1])
    print("| run | gpt2lab tok/s | TL tok/s | gpt2lab vs TL | gpt2lab / own forward (time) |")
    print("|---|---|---|---|---|")
    for run in ("forward", "run_with_cache", "resid-only cache"):
        ours_t, ref_t = best[f"gpt2lab {run}"], best[f"TL {run}"]
        print(
            f"| {run} | {tokens / ours_t:.0f} | {tokens / ref_t:.0f} | {ref_t / ours_t:.2f}x "
            f"| {ours_t / best['gpt2lab forward']:.2f} |"
        )
    print(
        f"\ncache memory (full cache): gpt2lab {ours_mem / 2**20:.0f} MiB, TL {ref_mem / 2**20:.0f} MiB\n"
    )

    steer = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(2))
    hook = [(f"blocks.{layers // 2}.hook_resid_pre", lambda t, hook: t + steer)]
    prompt = x[:, :16]
    n = args.new_tokens

    def ours_gen():
        return ours.generate(prompt, max_new_tokens=n, return_result=True)

    def ours_gen_hooked():
        with ours.hooks(hook):
            return ours_gen()

    def ref_gen():
        return ref.generate(
            prompt, max_new_tokens=n, do_sample=False, verbose=False, stop_at_eos=False
        )

    def ref_gen_hooked():
        with ref.hooks(fwd_hooks=hook):
            return ref_gen()

    with ours.hooks(hook), ref.hooks(fwd_hooks=hook):  # same function with the hook on
        hooked_diff = (ours(prompt) - ref(prompt)).abs().max().item()
    print(f"# generation with a steering hook (greedy, {n} new tokens, KV cache)\n")
    print(f"same function with the hook: max |logit difference| {hooked_diff:.2e}\n")
    best = interleaved(
        {
            "gpt2lab": ours_gen,
            "gpt2lab hooked": ours_gen_hooked,
            "TL": ref_gen,
            "TL hooked": ref_gen_hooked,
        },
        max(1, args.rounds - 1),
    )
    print("| run | gpt2lab tok/s | TL tok/s | gpt2lab vs TL |")
    print("|---|---|---|---|")
    for run in ("", " hooked"):
        o, r = best["gpt2lab" + run], best["TL" + run]
        print(f"| greedy{run or ' plain'} | {n / o:.1f} | {n / r:.1f} | {r / o:.2f}x |")
    print(f"\ngpt2lab hooked / unhooked speed: {best['gpt2lab'] / best['gpt2lab hooked']:.2f}\n")
    print_machine()


if __name__ == "__main__":
    main()
