"""`gpt2lab eval`: lm-evaluation-harness with the gpt2lab model registered."""

from __future__ import annotations

import typer

from ..errors import GPT2LabError
from .core import app
from .options import threads_option, use_threads


@app.command(
    "eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def evaluate(ctx: typer.Context, threads: int | None = threads_option()) -> None:
    """lm-evaluation-harness with the `gpt2lab` model registered; every argument but
    --threads goes to lm-eval unchanged, e.g. `gpt2lab eval --model gpt2lab --model_args
    pretrained=gpt2 --tasks lambada_openai` (`gpt2lab eval --help` shows lm-eval's
    options)."""
    use_threads(threads)
    try:
        from ..lm_eval_model import main as lm_eval_main
    except ImportError as e:
        raise GPT2LabError(f"lm-eval is not installed ({e}); pip install 'lm-eval>=0.4.13'") from e
    lm_eval_main(list(ctx.args))
