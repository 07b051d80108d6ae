"""The `gpt2lab` command line: one sub-command per job, one module per group of jobs.

Every failure is one line on stderr, never a traceback: "gpt2lab: error: ..." with exit
code 1 for what a user can cause (our GPT2LabError, an OS error naming the path, a
file that is not text, out of memory) and exit code 2 for usage errors (typer's, and
lm-eval's argparse errors under `gpt2lab eval`); anything else is a bug, reported as
"gpt2lab: internal error: ..." with exit code 1 (GPT2LAB_DEBUG=1 shows the traceback).
Outputs (--out) are checked before any work starts.

    core.py        the Typer app, the steer / neurons groups, main() and the error lines
    options.py     the shared options (--model, --device, --dtype, --threads, --seed), @FILE
                   text arguments, --threads applied, outputs checked before any work
    run.py         info, generate, score
    training.py    prepare, train
    interp.py      patch, lens, lens-train
    evaluation.py  eval (lm-evaluation-harness)
    convert.py     convert (GGUF / HF);  tune.py: tune (kernel choice)
    steer.py       steer make|sweep|show|convert;  neurons.py: neurons stats|top|show;
                   correlate.py: neurons correlate

Importing this package imports every command module, which registers its commands (the
order here is the order of `gpt2lab --help`). The names below stay importable from
`gpt2lab.cli` (the script entry point is `gpt2lab.cli:main`)."""

from __future__ import annotations

from ..errors import one_line  # noqa: F401  (the CLI's one-line folding is the library's)
from .core import DEBUG_ENV, app, describe_os_error, main, neurons_app, steer_app  # noqa: F401
from .options import (  # noqa: F401
    MODEL_HELP,
    THREADS_HELP,
    check_output,
    device_option,
    dtype_option,
    load_model,
    model_option,
    seed_option,
    text_argument,
    threads_option,
    use_threads,
)

# The command modules, in the order `gpt2lab --help` lists their commands (groups last;
# `neurons correlate` before `neurons stats|top|show`, as it always was).
# isort: off
from . import run, training, interp, evaluation, convert, tune  # noqa: F401
from . import serve  # noqa: F401  (`gpt2lab serve`: registers itself on app)
from . import steer, correlate, neurons  # noqa: F401
# isort: on

from .evaluation import evaluate  # noqa: F401
from .interp import lens, lens_train, patch  # noqa: F401
from .run import SAMPLE_SEED, SAMPLE_TEMPERATURE, SAMPLE_TOP_K, generate, info, score  # noqa: F401
from .training import prepare, train  # noqa: F401
