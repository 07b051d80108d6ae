"""`gpt2lab tune`: decide the CPU kernel for each case of a model ahead of time."""

from __future__ import annotations

import typer

from .core import app
from .options import threads_option, use_threads


@app.command()
def tune(
    model: str = typer.Option(
        "gpt2-medium",
        "--model",
        help="preset (gpt2, gpt2-medium, ...) or checkpoint folder: "
        "only its shapes are used, with random weights",
    ),
    dtypes: str = typer.Option(
        "float32,bfloat16,int8", "--dtypes", help="comma-separated: float32, bfloat16, int8"
    ),
    rows: str = typer.Option(
        "1,2,4,8,16,64,256",
        "--rows",
        help="comma-separated row counts (decode steps, batches, prefills)",
    ),
    threads: int | None = threads_option(),
) -> None:
    """Time every candidate kernel for the model's weight shapes on this CPU and keep the
    winners in the kernel cache file, so no later run measures on first use. `gpt2lab info
    --kernels` shows the result."""
    from ..config import PRESETS, GPT2Config
    from ..errors import GPT2LabError
    from ..kernels.tune import tune as run

    use_threads(threads)
    if model in PRESETS:
        cfg = GPT2Config.preset(model)
    else:
        from .. import checkpoint

        cfg = GPT2Config.from_json_file(checkpoint.resolve(model) / "config.json")
    try:
        row_counts = [int(r) for r in rows.split(",") if r.strip()]
    except ValueError:
        raise GPT2LabError(
            f"--rows: {rows!r} is not a comma-separated list of whole numbers"
        ) from None
    names = [d.strip() for d in dtypes.split(",") if d.strip()]
    run(cfg, names, row_counts, say=typer.echo)
