"""`gpt2lab neurons stats|top|show`: neuron statistics over a corpus and neuron cards."""

from __future__ import annotations

import typer

from .core import neurons_app
from .options import check_output, model_option, threads_option, use_threads

HOOK_HELP = (
    "hook with a unit axis ([batch, pos, units]); repeatable (default: blocks.L.mlp.hook_post "
    "of every layer)"
)


@neurons_app.command("stats")
def stats(
    data: list[str] = typer.Option(
        ..., "--data", help="corpus: a `gpt2lab prepare` dataset folder, or text files / folders"
    ),
    model: str | None = model_option(),
    hook: list[str] | None = typer.Option(None, "--hook", help=HOOK_HELP),
    split: str = typer.Option("train", "--split", help="split of a prepared dataset"),
    tokens: int | None = typer.Option(
        None, "--tokens", min=1, help="read at most this many tokens of the corpus (default: all)"
    ),
    seq_len: int = typer.Option(128, "--seq-len", min=1, help="window length"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="windows per forward"),
    top_k: int = typer.Option(20, "--top-k", help="max-activating contexts kept per unit"),
    drop: list[str] | None = typer.Option(
        None,
        "--drop",
        help="token whose positions are not counted (repeatable; default: <|endoftext|>; "
        "--drop none counts every token)",
    ),
    threshold: float = typer.Option(0.0, "--threshold", help="active means activation > this"),
    lo: float = typer.Option(-1.0, "--lo", help="histogram's lower edge"),
    hi: float = typer.Option(5.0, "--hi", help="histogram's upper edge"),
    bins: int = typer.Option(60, "--bins", help="histogram bins between --lo and --hi"),
    out: str = typer.Option("neuron_stats", "--out", help="folder for results and checkpoints"),
    resume: bool = typer.Option(False, "--resume", help="continue from --out's checkpoint"),
    checkpoint_every: int = typer.Option(
        50, "--checkpoint-every", min=1, help="batches between checkpoints"
    ),
    threads: int | None = threads_option(),
) -> None:
    """Per-unit statistics of hooks over a corpus: mean, variance, skew, kurtosis, fraction
    active, histogram, top-k contexts, random and quantile samples (float64 accumulators,
    fixed memory). Checkpoints every --checkpoint-every batches (--resume continues);
    under torchrun the ranks split the batches and merge at the end. Results:
    OUT/neurons.safetensors + OUT/neurons.json."""
    from ..checkpoint import load
    from ..interp.neurons import neuron_stats
    from ..training.distributed import setup, teardown

    use_threads(threads)
    check_output(out, folder=True)
    drops = ["<|endoftext|>"] if not drop else [] if drop == ["none"] else list(drop)
    ctx = setup("cpu")
    try:
        m = load(model).eval()
        result = neuron_stats(
            m, data if len(data) > 1 else data[0], hooks=hook or None, split=split,
            seq_len=seq_len, batch_size=batch_size, max_tokens=tokens, top_k=top_k,
            threshold=threshold, lo=lo, hi=hi, bins=bins, drop=drops, out=out, resume=resume,
            checkpoint_every=checkpoint_every, progress=True if ctx.is_main else False,
        )  # fmt: skip
        if ctx.is_main:
            meta = result.meta
            typer.echo(
                f"{meta['tokens_read']:,} tokens read, "
                f"{next(iter(meta['tokens_kept'].values())):,} counted; "
                f"{len(meta['hooks'])} hooks, {sum(meta['hooks'].values()):,} units"
            )
            typer.echo(f"saved {out}/neurons.safetensors and {out}/neurons.json")
    finally:
        teardown(ctx)


def _hook(layer: int | None, hook: str | None) -> str:
    from ..errors import GPT2LabError

    if (layer is None) == (hook is None):
        raise GPT2LabError("give --layer L (its mlp.hook_post) or --hook NAME, one of the two")
    return hook if hook is not None else f"blocks.{layer}.mlp.hook_post"


@neurons_app.command("top")
def top(
    results: str = typer.Argument(..., help="folder written by `gpt2lab neurons stats`"),
    layer: int | None = typer.Option(None, "--layer", help="layer (its blocks.L.mlp.hook_post)"),
    hook: str | None = typer.Option(None, "--hook", help="or any hook of the results"),
    neuron: int = typer.Option(..., "--neuron", "-n", help="unit index"),
    k: int = typer.Option(10, "-k", help="contexts to print"),
) -> None:
    """Print a unit's statistics and its top-k contexts as text (the max token in [[ ]])."""
    from ..interp.neurons import load_stats
    from ..tokenizer import Tokenizer

    stats_ = load_stats(results)
    name = _hook(layer, hook)
    summary = stats_.summary(name, neuron)
    tok = Tokenizer()
    typer.echo(f"{name} unit {neuron}: " + ", ".join(f"{k_} {v:.4g}" for k_, v in summary.items()))
    for row in stats_.top(name, neuron, k):
        pieces = [tok.decode([t]) for t in row["tokens"]]
        pieces[row["at"]] = f"[[{pieces[row['at']]}]]"
        text = "".join(pieces).replace("\n", "\\n")
        typer.echo(f"{row['value']:9.4f}  doc {row['doc']:>5} pos {row['pos']:>6}  {text}")


@neurons_app.command("show")
def show(
    results: str = typer.Argument(..., help="folder written by `gpt2lab neurons stats`"),
    layer: int | None = typer.Option(None, "--layer", help="layer (its blocks.L.mlp.hook_post)"),
    hook: str | None = typer.Option(None, "--hook", help="or any hook of the results"),
    neuron: int = typer.Option(..., "--neuron", "-n", help="unit index"),
    out: str = typer.Option("neuron.html", "--out", help="HTML file to write"),
    model: str | None = model_option(),
    k: int = typer.Option(10, "-k", help="contexts and tokens shown"),
) -> None:
    """Write a self-contained HTML neuron card: top contexts shaded by activation, the
    histogram, samples, and (MLP neurons) the promoted / suppressed tokens and the
    vocabulary statistics, read from --model's weights."""
    from ..checkpoint import load
    from ..interp.neuron_card import neuron_card, write_card
    from ..interp.neurons import load_stats

    check_output(out)
    stats_ = load_stats(results)
    page = neuron_card(stats_, load(model).eval(), _hook(layer, hook), neuron, k=k)
    write_card(out, page)
    typer.echo(f"wrote {out}")
