"""`gpt2lab prepare|train`: tokenize a corpus into shards, train or fine-tune on them."""

from __future__ import annotations

import sys

import typer

from .core import app
from .options import seed_option, threads_option, use_threads


@app.command()
def prepare(
    inputs: list[str] = typer.Argument(..., help="text files, folders, or JSONL files"),
    out: str = typer.Option(..., "--out", "-o", help="output directory for the shards"),
    field: str = typer.Option("text", "--field", help="JSONL field holding the text"),
    val_fraction: float = typer.Option(
        0.05,
        "--val-fraction",
        help="share of documents for validation; a corpus of fewer than 20 documents (one "
        "file) is split by tokens: the last share of each document's tokens",
    ),
    shard_tokens: int = typer.Option(100_000_000, "--shard-tokens", help="tokens per shard file"),
    seed: int = seed_option("seed of the train/val split"),
    threads: int | None = threads_option("tokenizer threads (default: one per core)"),
) -> None:
    """Tokenize a corpus into uint16 train/val token shards plus a manifest.

    Binary and non-UTF-8 files, hidden files and folders holding a gpt2lab dataset (the
    output included) are skipped and counted. The dataset appears at --out only when
    complete; an old one there is replaced then, and kept if the run fails."""
    from ..training.data import prepare as run_prepare
    from ..training.data import skipped_summary, split_summary

    manifest = run_prepare(
        inputs, out, field=field, val_fraction=val_fraction, shard_tokens=shard_tokens,
        seed=seed, progress=sys.stderr.isatty(), num_threads=threads,
    )  # fmt: skip
    typer.echo(f"{out}: {split_summary(manifest)}")
    if summary := skipped_summary(manifest):
        typer.echo(summary)


@app.command()
def train(
    config: str = typer.Argument(..., help="run configuration (TOML)"),
    set_: list[str] = typer.Option(
        [], "--set", help="override a setting: section.key=value (repeatable)"
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="continue from the latest checkpoint in out_dir (it must be of a run with the "
        "same settings; device, nonfinite and the eval/log/checkpoint cadence may change)",
    ),
    new_schedule: bool = typer.Option(
        False,
        "--new-schedule",
        help="with --resume: continue with this configuration's learning-rate schedule "
        "(max_steps, warmup_steps, lr, min_lr) where it differs from the checkpoint's, e.g. "
        "to extend a run with --set train.max_steps=N",
    ),
    fallback: bool = typer.Option(
        False,
        "--fallback",
        help="with --resume: if the latest checkpoint is damaged, move it aside (*.corrupt) "
        "and resume from the newest good one instead of stopping",
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="start a new run in an out_dir that holds another run, removing that run's "
        "checkpoints, log, report and best/final models (nothing else)",
    ),
    threads: int | None = threads_option(),
) -> None:
    """Train from scratch or fine-tune a checkpoint (torchrun for several processes).

    A NaN/inf loss stops the run with an error (train.nonfinite = "skip" skips such
    updates instead, up to train.nonfinite_limit in a row)."""
    from ..training.config import load_config
    from ..training.trainer import train as run_train

    use_threads(threads)
    cfg = load_config(config, set_)
    # the run's last line ("train: done: ...") says where the final and best models are
    run_train(cfg, resume=resume, fallback=fallback, overwrite=overwrite, new_schedule=new_schedule)
