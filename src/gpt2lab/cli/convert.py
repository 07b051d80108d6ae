"""`gpt2lab convert SRC DST --format gguf|hf`: a model from one file format to the other.

SRC is anything `gpt2lab.load` reads (a checkpoint folder, a preset, bundled, a .gguf);
DST is a .gguf file (llama.cpp, see gpt2lab.gguf_io) or a folder in HF's layout."""

from __future__ import annotations

import typer

from .core import app
from .options import MODEL_HELP, check_output

FORMATS = ("gguf", "hf")


@app.command()
def convert(
    src: str = typer.Argument(..., help=f"the model: {MODEL_HELP}, or a GPT-2 .gguf file"),
    dst: str = typer.Argument(..., help="output: a .gguf file, or a folder for --format hf"),
    format: str | None = typer.Option(
        None, "--format", help="gguf or hf (default: gguf when DST ends in .gguf, else hf)"
    ),
    dtype: str = typer.Option(
        "f32", "--dtype", help="GGUF matrices: f32, bf16 or q8_0 (llama.cpp's 8-bit format)"
    ),
) -> None:
    """Write a model as a llama.cpp GGUF (`--dtype q8_0` for 8 bits) or as an HF
    checkpoint folder (a GGUF read back, for transformers)."""
    from ..checkpoint import load
    from ..errors import GPT2LabError
    from ..gguf_io import SAVE_DTYPES

    fmt = format or ("gguf" if dst.lower().endswith(".gguf") else "hf")
    if fmt not in FORMATS:
        raise GPT2LabError(f"--format must be gguf or hf, got {fmt!r}")
    if fmt == "gguf" and dtype.lower() not in SAVE_DTYPES:
        raise GPT2LabError(f"unknown --dtype {dtype!r} for GGUF (use f32, bf16 or q8_0)")
    if fmt == "hf" and dtype != "f32":
        raise GPT2LabError("--dtype is for --format gguf; an HF folder keeps float32 weights")
    check_output(dst, folder=fmt == "hf", option="DST")
    model = load(src)
    if fmt == "gguf":
        model.save(dst, format="gguf", dtype=dtype)
    else:
        model.save(dst)
    typer.echo(f"wrote {dst} ({fmt}{', ' + dtype.lower() if fmt == 'gguf' else ''})")
