"""The options and checks every command shares, defined once so that `--model`, `--device`,
`--dtype`, `--threads` and `--seed` read the same (names, short flags, defaults, help) on
every command that has them, and every output is checked the same way before any work.

Each option is a function returning a fresh `typer.Option` (typer keeps state on the
object, so commands must not share one instance); use it as the parameter's default:
`device: str = device_option()`. Nothing here imports torch at import time (`gpt2lab
--help` stays fast)."""

from __future__ import annotations

import os

import typer

from ..errors import GPT2LabError

MODEL_HELP = (
    "checkpoint folder in HF layout (a training run's out_dir/best or out_dir/final), preset "
    "(gpt2, gpt2-medium, gpt2-large, gpt2-xl), HF repo id, or bundled (the tiny model "
    "shipped with gpt2lab, the default)"
)
THREADS_HELP = "CPU threads for this command (default: torch's choice, one per core)"
DEVICE_HELP = "cpu, cuda, cuda:1, ..."
DTYPE_HELP = "float32, bfloat16 or float16"
DTYPE_INT8_HELP = "float32, bfloat16, float16 or int8 (int8 weights, bf16 compute)"


def model_option(help: str = MODEL_HELP) -> typer.models.OptionInfo:
    """--model/-m NAME (default None: the bundled model), anything `gpt2lab.load` takes."""
    return typer.Option(None, "--model", "-m", help=help)


def device_option() -> typer.models.OptionInfo:
    """--device DEVICE, default cpu."""
    return typer.Option("cpu", "--device", help=DEVICE_HELP)


def dtype_option(*, int8: bool = False) -> typer.models.OptionInfo:
    """--dtype NAME of the loaded weights, default float32; `int8=True` on commands that
    also load int8 weights (see `load_model`)."""
    return typer.Option("float32", "--dtype", help=DTYPE_INT8_HELP if int8 else DTYPE_HELP)


def threads_option(help: str = THREADS_HELP) -> typer.models.OptionInfo:
    """--threads N, the same on every command that computes (N >= 1, checked by typer)."""
    return typer.Option(None, "--threads", min=1, help=help)


def seed_option(help: str, default: int | None = 0) -> typer.models.OptionInfo:
    """--seed N; the help says what the seed decides (a split, samples, windows, ...)."""
    return typer.Option(default, "--seed", help=help)


def use_threads(threads: int | None) -> None:
    """Apply --threads before any work: torch's intra-op threads for this process. A
    process-wide setting is right in the CLI (one job per process) and is never made by
    the library. On a busy machine fewer threads than cores can be much faster."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def load_model(model: str | None, *, dtype: str = "float32", device: str = "cpu"):
    """`gpt2lab.load` for --model/--dtype/--device; --dtype int8 means int8 weights with
    bf16 compute (load's quantize="int8"), which load's dtype does not take."""
    from ..checkpoint import load

    if dtype == "int8":
        return load(model, device=device, quantize="int8")
    return load(model, dtype=dtype, device=device)


def text_argument(value: str, command: str) -> str:
    """A text argument as given, or the contents of FILE for `@FILE` (strict UTF-8, read
    as is, a final newline included); `@@...` is the literal text `@...`. Failures are
    one-line errors naming the file."""
    from pathlib import Path

    if not value.startswith("@"):
        return value
    if value.startswith("@@"):
        return value[1:]
    if value == "@":
        raise GPT2LabError(
            f"give a file name after @ ({command} @FILE), or the text itself (@@ for a literal @)"
        )
    path = Path(value[1:]).expanduser()
    if not path.is_file():
        raise GPT2LabError(f"{path} does not exist or is not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GPT2LabError(
            f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None


def check_output(path: str, *, folder: bool = False, option: str = "--out") -> None:
    """Fail before any work (a model load, minutes of training) on an output we could not
    write: a file where a folder is wanted or the reverse, a file in the way of a parent
    folder, no permission, a read-only or pseudo file system (/proc). Missing parent
    folders are fine (they are created on writing); the nearest existing one must take
    a new file, which creating and removing a hidden probe file tests directly."""
    import tempfile
    from pathlib import Path

    target = Path(path)
    if folder and target.exists() and not target.is_dir():
        raise GPT2LabError(f"{option} {path} is a file; give a folder")
    if not folder and target.is_dir():
        raise GPT2LabError(f"{option} {path} is a folder; give a file name")
    if not str(path) or (not folder and not target.name):
        raise GPT2LabError(f"{option} needs a {'folder' if folder else 'file'} name")
    start = target if folder else target.parent
    existing = next((a for a in (start, *start.parents) if a.exists()), Path("."))
    if not existing.is_dir():
        raise GPT2LabError(f"{option} {path}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".gpt2lab-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise GPT2LabError(f"{option} {path}: cannot write in {existing}: {e.strerror or e}") from e
