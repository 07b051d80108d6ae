"""`gpt2lab neurons correlate A B --data DIR`: cross-model neuron correlations."""

from __future__ import annotations

import typer

from .core import neurons_app
from .options import MODEL_HELP, check_output, seed_option, threads_option, use_threads


@neurons_app.command("correlate")
def correlate(
    model_a: str = typer.Argument(..., help=f"model A: {MODEL_HELP}"),
    model_b: str = typer.Argument(..., help="model B (same tokenizer as A), named the same ways"),
    data: list[str] = typer.Option(
        ..., "--data", help="corpus: a `gpt2lab prepare` dataset folder, or text files / folders"
    ),
    split: str = typer.Option("train", "--split", help="split of a prepared dataset"),
    layers: str = typer.Option(
        "all", "--layers", help="layer pairs: all, same, or window=K (|layer_a - layer_b| <= K)"
    ),
    hook: str = typer.Option(
        "blocks.{layer}.mlp.hook_post", "--hook", help="per-layer hook with a neuron axis"
    ),
    tokens: int | None = typer.Option(
        None,
        "--tokens",
        help="read at most this many tokens of the corpus, filtered tokens included (default: all)",
    ),
    seq_len: int | None = typer.Option(
        None, "--seq-len", help="window length (default: min(context, 512))"
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="windows per forward"),
    memory_gb: float = typer.Option(
        4.0,
        "--memory-gb",
        help="memory for one pass (GB): its layer-pair blocks of float64 co-moments, their "
        "rotations and one batch; a smaller budget means more passes over the corpus",
    ),
    threshold: float = typer.Option(
        0.5, "--threshold", help="universal when best r - baseline r is above this (0..1)"
    ),
    seed: int = seed_option("seed of the random rotations (the baseline)"),
    out: str = typer.Option("correlations", "--out", help="folder for the result and checkpoints"),
    resume: bool = typer.Option(False, "--resume", help="continue from --out's checkpoint"),
    checkpoint_every: int = typer.Option(
        200, "--checkpoint-every", help="batches between checkpoints"
    ),
    save_blocks: bool = typer.Option(
        False, "--save-blocks", help="also write every layer pair's r (float16) to OUT/blocks"
    ),
    drop: list[str] = typer.Option(
        ["<|endoftext|>"],
        "--drop",
        help="token left out of the statistics, still read as "
        "context (repeatable; the paper also drops '\\n')",
    ),
    top: int = typer.Option(20, "--top", help="rows of the table printed per model"),
    threads: int | None = threads_option(),
) -> None:
    """Pearson r of every neuron pair of two models over one token stream (float64, streamed,
    in passes that fit --memory-gb), each neuron's best match, an orthogonal random-rotation
    baseline and the universal neurons (best r - baseline > --threshold; Gurnee et al. 2024).

    Under torchrun every rank reads its share of the corpus and the sums are all-reduced.
    Prints a table of the top neurons of each model; the result goes to --out
    (correlations.safetensors + correlations.json)."""
    import sys

    from ..checkpoint import load
    from ..interp.corpus import open_corpus
    from ..interp.correlate import correlate as run
    from ..training.distributed import setup, teardown

    use_threads(threads)
    check_output(out, folder=True)
    ctx = setup("cpu")
    try:
        a, b = load(model_a).eval(), load(model_b).eval()
        source = open_corpus(data if len(data) > 1 else data[0], a.tokenizer, split=split)

        def log(line: str) -> None:
            if ctx.is_main:
                print(line, file=sys.stderr, flush=True)

        result = run(
            a, b, source, layers=layers, hook=hook, seq_len=seq_len, batch_size=batch_size,
            max_tokens=tokens, threshold=threshold, memory_gb=memory_gb, seed=seed, out=out,
            resume=resume, checkpoint_every=checkpoint_every, save_blocks=save_blocks,
            drop=tuple(drop), names=(model_a, model_b), log=log, progress=True,
        )  # fmt: skip
        if ctx.is_main:
            mem = result.meta["memory"]
            typer.echo(
                f"{result.meta['tokens']:,} tokens, {len(result.meta['pairs'])} layer pairs in "
                f"{len(result.meta['passes'])} pass(es); planned {mem['planned_pass_gb']:.3f} "
                f"GB per pass + {mem['finish_block_gb']:.3f} GB to finish a block, peak RSS "
                f"{mem['peak_rss_gb']:.3f} GB"
            )
            for side in ("a", "b"):
                typer.echo("\n" + result.table(side, top))
            typer.echo(f"\nsaved {out}/correlations.safetensors")
    finally:
        teardown(ctx)
