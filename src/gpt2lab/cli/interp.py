"""`gpt2lab patch|lens|lens-train`: activation patching and lenses from the command line."""

from __future__ import annotations

import sys

import typer

from ..errors import GPT2LabError
from .core import app
from .options import (
    check_output,
    device_option,
    model_option,
    seed_option,
    threads_option,
    use_threads,
)


@app.command()
def patch(
    clean: str = typer.Argument(..., help="the clean prompt"),
    corrupted: str = typer.Argument(..., help="the corrupted prompt (same number of tokens)"),
    answer: str = typer.Option(..., "--answer", help="the clean answer, one token, e.g. ' Mary'"),
    wrong: str = typer.Option(..., "--wrong", help="the corrupted answer, one token, e.g. ' John'"),
    model: str | None = model_option(),
    what: str = typer.Option(
        "resid_pre",
        "--what",
        help="resid_pre, resid_mid, attn_out, mlp_out, heads, q, k, v or pattern",
    ),
    out: str | None = typer.Option(
        None, "--out", "-o", help="also write the figure: FILE.png or FILE.html"
    ),
    batch: int = typer.Option(8, "--batch", help="patches per forward pass"),
    device: str = device_option(),
    threads: int | None = threads_option(),
) -> None:
    """Activation patching: the normalised logit difference per layer x position (or head)."""
    from ..checkpoint import load
    from ..interp.patching import check_figure_path, patch_prompts, resolve_site

    use_threads(threads)
    resolve_site(what)
    if out is not None:
        check_figure_path(out)
        check_output(out)
    lm = load(model, device=device)
    result = patch_prompts(
        lm, clean, corrupted, answer, wrong, what=what, batch=batch, progress=True
    )
    typer.echo(result.to_text())
    if out is not None:
        typer.echo(f"wrote {result.save(out)}")


@app.command()
def lens(
    prompt: str = typer.Argument(..., help="the text whose layers to read"),
    model: str | None = model_option(),
    tuned: str | None = typer.Option(
        None, "--tuned", help="tuned lens folder (from lens-train); default: the logit lens"
    ),
    target: str | None = typer.Option(
        None, "--target", help="a token to track (p and rank per cell); default: the next token"
    ),
    k: int = typer.Option(1, "--k", "-k", help="top tokens shown per cell"),
    out: str | None = typer.Option(
        None, "--out", "-o", help="also write a heat map: FILE.png (needs matplotlib) or FILE.html"
    ),
    color_by: str = typer.Option("prob", "--color-by", help="heat map: prob, target, entropy, kl"),
    bos: bool = typer.Option(False, "--bos/--no-bos", help="prepend <|endoftext|>"),
    device: str = device_option(),
    threads: int | None = threads_option(),
) -> None:
    """What each layer predicts at each position: the logit lens, or a tuned lens.

    On a terminal the table is paged over positions to fit its width (each page repeats
    the layer labels); piped, it is one wide table."""
    from pathlib import Path

    from rich.console import Console

    from ..checkpoint import load
    from ..interp.lens import COLOR_BY, logit_lens
    from ..interp.tuned_lens import TunedLens

    use_threads(threads)
    if not prompt:
        raise GPT2LabError("the prompt is empty: give some text to look at")
    if k < 1:
        raise GPT2LabError(f"--k must be at least 1, got {k}")
    if color_by not in COLOR_BY:
        raise GPT2LabError(f"--color-by must be one of {', '.join(COLOR_BY)}, got {color_by!r}")
    if out is not None and Path(out).suffix.lower() not in (".png", ".html", ".htm"):
        raise GPT2LabError(f"--out must end in .png or .html, got {out!r}")
    if out is not None:
        check_output(out)
    lm = load(model, device=device)
    if tuned is not None:
        result = TunedLens.load(tuned, lm).apply(prompt, target=target, k=k, prepend_bos=bos)
    else:
        result = logit_lens(lm, prompt, target=target, k=k, prepend_bos=bos)
    console = Console() if sys.stdout.isatty() else Console(width=1000)
    console.print(result.table(k))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        if Path(out).suffix.lower() == ".png":
            result.plot(out, color_by)
        else:
            result.to_html(out, color_by)
        typer.echo(f"wrote {out}")


@app.command("lens-train")
def lens_train(
    data: str = typer.Option(
        ..., "--data", help="token shards folder (trains on train, reports on val) or a text file"
    ),
    out: str = typer.Option(..., "--out", "-o", help="folder to save the tuned lens in"),
    model: str | None = model_option(),
    steps: int = typer.Option(250, "--steps", help="optimizer steps"),
    tokens_per_step: int = typer.Option(4096, "--tokens-per-step", help="tokens per step"),
    seq_len: int = typer.Option(128, "--seq-len", help="tokens per training window"),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (Nesterov) or adamw"),
    lr: float | None = typer.Option(None, "--lr", help="default 1.0 for sgd, 1e-3 for adamw"),
    eval_data: str | None = typer.Option(
        None, "--eval", help="held-out text file or shards folder (val split) to report KL on"
    ),
    eval_tokens: int = typer.Option(16384, "--eval-tokens", help="tokens to report KL on"),
    seed: int = seed_option("seed of the training windows"),
    device: str = device_option(),
    threads: int | None = threads_option(),
) -> None:
    """Train a tuned lens (one affine translator per layer) and report held-out KL."""
    from pathlib import Path

    from ..checkpoint import load
    from ..interp.lens import layer_labels, lens_kl
    from ..interp.tuned_lens import TunedLens

    use_threads(threads)
    if Path(out).is_file():
        raise GPT2LabError(f"--out {out} is a file; give a folder for the tuned lens")
    check_output(out, folder=True)
    if not Path(data).exists():
        raise GPT2LabError(f"--data {data} does not exist")
    if eval_data is not None and not Path(eval_data).exists():
        raise GPT2LabError(f"--eval {eval_data} does not exist")
    if eval_data is None and (Path(data) / "manifest.json").is_file():
        eval_data = data  # a shards folder: its val split is held out
    lm = load(model, device=device)
    tuned = TunedLens(lm)
    history = tuned.fit(
        data, steps=steps, tokens_per_step=tokens_per_step, seq_len=seq_len,
        optimizer=optimizer, lr=lr, seed=seed, progress=True,
    )  # fmt: skip
    tuned.save(out, model=model or "bundled")
    typer.echo(f"saved tuned lens to {out} (last step's mean train KL {history[-1].mean():.4f})")
    if eval_data is not None:
        logit = lens_kl(lm, eval_data, max_tokens=eval_tokens, seq_len=seq_len, progress=True)
        tuned_kl = tuned.kl(eval_data, max_tokens=eval_tokens, seq_len=seq_len, progress=True)
        typer.echo(f"\nheld-out KL(output || lens), nats, on {eval_data}:")
        typer.echo(f"{'layer':<10} {'logit lens':>10} {'tuned lens':>10}")
        for label, a, b in zip(layer_labels(lm), logit.tolist(), tuned_kl.tolist(), strict=True):
            typer.echo(f"{label:<10} {a:>10.4f} {b:>10.4f}")
