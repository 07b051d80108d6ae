"""The `gpt2lab` Typer app, its command groups, and `main()`, which runs it so that every
failure is one line on stderr, never a traceback: "gpt2lab: error: ..." with exit code 1
for what a user can cause (our GPT2LabError, an OS error naming the path, a file that is
not text, out of memory) and exit code 2 for usage errors (typer's, and lm-eval's
argparse errors under `gpt2lab eval`); anything else is a bug, reported as
"gpt2lab: internal error: ..." with exit code 1 (GPT2LAB_DEBUG=1 shows the traceback).

The commands live in one module per group of jobs and register themselves on `app` (or
on a group) when `gpt2lab.cli` imports them."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import typer

from ..errors import GPT2LabError, one_line

app = typer.Typer(
    help="GPT-2, open all the way: run, generate, score, train and look inside it.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings are wrapped as paragraphs, not line by line
)

# Command groups: `gpt2lab steer ...` and `gpt2lab neurons ...`. Each module registers its
# commands on its group (imports inside the commands keep `gpt2lab --help` fast). `gpt2lab
# --help` lists the groups after the plain commands, whatever the order they were added in.
steer_app = typer.Typer(
    help="Steering vectors: make them, sweep layers x coefficients, export to llama.cpp.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
neurons_app = typer.Typer(
    help="Neurons over a corpus: statistics, top contexts, cards, cross-model correlations.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(steer_app, name="steer")
app.add_typer(neurons_app, name="neurons")


# ---- one line per failure ---------------------------------------------------------------
DEBUG_ENV = "GPT2LAB_DEBUG"  # =1: let exceptions through, with their traceback


def _message(e: BaseException) -> str:
    """str(e) on one line (errors.one_line), or something sensible when that is empty (or
    itself fails): the cause's message, or where to look for details."""
    try:
        text = one_line(str(e))
    except Exception:  # a broken __str__ must not break the error report
        text = ""
    if text:
        return text
    cause = e.__cause__ or e.__context__
    if cause is not None and cause is not e:
        return f"{type(e).__name__} caused by {type(cause).__name__}: {_message(cause)}"
    return f"{type(e).__name__} (no details given; {DEBUG_ENV}=1 shows where it came from)"


def describe_os_error(e: OSError) -> str:
    """`PATH: reason` (like coreutils), e.g. `out/x.png: Permission denied`."""
    reason = e.strerror or _message(e)
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else one_line(reason)


def _usage_error(e: typer.TyperException) -> str:
    """typer's usage errors (a missing argument, a value of the wrong type) in one line
    that points at the command's help, instead of a usage box."""
    ctx = getattr(e, "ctx", None)
    command = ctx.command_path if ctx is not None else "gpt2lab"
    return f"{one_line(e.format_message()) or _message(e)} (see '{command} --help')"


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(message, err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the CLI; every failure ends as one line on stderr and a non-zero exit code:
    2 for usage errors, 1 for errors the user caused (our GPT2LabError, OS errors such
    as a missing or unwritable path, a file that is not text) and, as a last resort,
    1 with "internal error" for anything else (a bug; GPT2LAB_DEBUG=1 re-raises)."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        result = app(args=argv, prog_name="gpt2lab", standalone_mode=False)
    except typer.TyperException as e:  # usage errors and the like: typer's own
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `gpt2lab`: the help text
            e.show()
            sys.exit(e.exit_code)
        _fail(f"gpt2lab: error: {_usage_error(e)}", e.exit_code)
    except typer.Abort:
        _fail("gpt2lab: aborted", 1)
    except KeyboardInterrupt:
        _fail("gpt2lab: interrupted", 130)
    except BrokenPipeError:  # `gpt2lab ... | head`: the reader left; nothing to report
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (so the exit flush stays quiet)
        sys.exit(1)
    except Exception as e:
        if debug:
            raise
        _fail(_error_line(e))
    if result == 130:  # typer turns Ctrl-C into exit code 130, silently
        typer.echo("gpt2lab: interrupted", err=True)
    sys.exit(result if isinstance(result, int) else 0)


def _out_of_memory(e: Exception) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (GPU) or its CPU allocator's failure
    (a RuntimeError saying "can't allocate memory")."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


def _error_line(e: Exception) -> str:
    """The one stderr line for an exception raised by a command."""
    if isinstance(e, GPT2LabError):
        return f"gpt2lab: error: {_message(e)}"
    if isinstance(e, OSError):
        return f"gpt2lab: error: {describe_os_error(e)}"
    if isinstance(e, UnicodeDecodeError):
        return f"gpt2lab: error: a file is not UTF-8 text ({_message(e)})"
    if _out_of_memory(e):
        return "gpt2lab: error: out of memory (try a smaller input, batch or model)"
    return (
        f"gpt2lab: internal error: {type(e).__name__}: {_message(e)} "
        f"(a bug: please report it; {DEBUG_ENV}=1 shows the traceback)"
    )
