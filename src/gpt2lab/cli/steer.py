"""`gpt2lab steer make|sweep|show|convert`: steering vectors from the command line.

Vectors are files: `.safetensors` (gpt2lab's, with the record of where they belong) or
`.gguf` (llama.cpp's control vectors, read against the model). `generate --steer
FILE[:COEF]` applies them (see cli/run.py)."""

from __future__ import annotations

import typer

from .core import steer_app
from .options import check_output, model_option, seed_option, threads_option, use_threads

METHODS = ("mean", "actadd", "reading")


def parse_numbers(value: str, option: str) -> list[float]:
    """`-4,0,4` as floats, or a one-line error naming the option."""
    import math

    from ..errors import GPT2LabError

    items = [v.strip() for v in value.split(",")]
    try:
        out = [float(v) for v in items]
    except ValueError:
        out = []
    if not out or not all(math.isfinite(v) for v in out):
        raise GPT2LabError(f"{option} takes comma-separated finite numbers, got {value!r}")
    return out


def parse_steer(value: str) -> tuple[str, float]:
    """`FILE[:COEF]` -> (file, coefficient); a file name may itself hold ':' (the part
    after the last ':' is a coefficient only when the file exists without it)."""
    import math
    from pathlib import Path

    from ..errors import GPT2LabError

    path, sep, coef = value.rpartition(":")
    if not sep or Path(value).exists() or not path:
        return value, 1.0
    try:
        c = float(coef)
    except ValueError:
        raise GPT2LabError(
            f"--steer takes FILE or FILE:COEF with a number after ':', got {value!r}"
        ) from None
    if not math.isfinite(c):
        raise GPT2LabError(f"--steer {value!r}: the coefficient must be finite")
    return path, c


def read_texts(texts: list[str], path: str | None, name: str) -> list[str]:
    """Texts given inline plus those in a file (one per line, blank lines skipped)."""
    from pathlib import Path

    from ..errors import GPT2LabError

    out = list(texts)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise GPT2LabError(f"--{name}-file {path} does not exist or is not a file")
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise GPT2LabError(f"--{name}-file {path} is not UTF-8 text") from None
        out += [line for line in lines if line.strip()]
    if not out:
        raise GPT2LabError(f"no {name} texts: give --{name} TEXT (repeatable) or --{name}-file")
    return out


def _summary(vector) -> list[str]:
    return [
        f"{hook}  shape {list(d.shape)}  norm {float(d.norm()):.4g}"
        for hook, d in vector.directions.items()
    ]


@steer_app.command("make")
def make(
    positive: list[str] = typer.Option([], "--positive", help="a positive text (repeatable)"),
    negative: list[str] = typer.Option([], "--negative", help="a negative text (repeatable)"),
    positive_file: str | None = typer.Option(
        None, "--positive-file", help="positive texts, one per line"
    ),
    negative_file: str | None = typer.Option(
        None, "--negative-file", help="negative texts, one per line"
    ),
    method: str = typer.Option(
        "mean",
        "--method",
        help="mean (mean difference), actadd (one prompt pair, a sequence) or reading "
        "(RepE's first principal component of paired differences)",
    ),
    layers: str | None = typer.Option(None, "--layers", help="layers, e.g. 2 or 1,2,3"),
    hook: list[str] = typer.Option([], "--hook", help="exact hook name (repeatable)"),
    site: str = typer.Option(
        "resid_pre", "--site", help="with --layers: resid_pre, resid_mid, resid_post, ..."
    ),
    read: str = typer.Option("last", "--read", help="read position: last, mean or a token index"),
    model: str | None = model_option(),
    out: str = typer.Option(..., "--out", help="the vector file (.safetensors)"),
    gguf: str | None = typer.Option(None, "--gguf", help="also write a llama.cpp control vector"),
    coefficient: float = typer.Option(1.0, "--coefficient", help="multiplied into --gguf"),
    threads: int | None = threads_option(),
) -> None:
    """Make a steering vector from positive and negative texts; prints each hook's norm."""
    from ..checkpoint import load
    from ..errors import GPT2LabError
    from ..steering import actadd, mean_difference, reading_vector, save_gguf

    use_threads(threads)
    if method not in METHODS:
        raise GPT2LabError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if out.endswith(".gguf"):
        raise GPT2LabError("--out is the .safetensors vector; give --gguf FILE for llama.cpp")
    check_output(out)
    if gguf is not None:
        check_output(gguf, option="--gguf")
    pos = read_texts(positive, positive_file, "positive")
    neg = read_texts(negative, negative_file, "negative")
    if (layers is None) == (not hook):
        raise GPT2LabError("give --layers (with --site) or --hook NAME, one of them")
    where: dict = {"hooks": list(hook)} if hook else {"layers": _layers(layers), "site": site}
    position: str | int = read
    if read not in ("last", "mean"):
        try:
            position = int(read)
        except ValueError:
            raise GPT2LabError(
                f"--read must be last, mean or a token index, got {read!r}"
            ) from None
    lm = load(model)
    if method == "actadd":
        if len(pos) != 1 or len(neg) != 1:
            raise GPT2LabError(
                f"--method actadd takes one positive and one negative prompt, got {len(pos)} "
                f"and {len(neg)}"
            )
        vector = actadd(lm, pos[0], neg[0], **where)
    else:
        make_fn = mean_difference if method == "mean" else reading_vector
        vector = make_fn(lm, pos, neg, read=position, **where)
    if gguf is not None:  # refused (a sequence, a hook llama.cpp has not) before --out is written
        save_gguf(vector, gguf, lm, coefficient)
    vector.save(out)
    for line in _summary(vector):
        typer.echo(line)
    typer.echo(f"saved {out}" + (f" and {gguf}" if gguf else ""))


def _layers(value: str) -> list[int]:
    from ..errors import GPT2LabError

    try:
        out = [int(v) for v in value.split(",")]
    except ValueError:
        raise GPT2LabError(f"--layers takes comma-separated layer indices, got {value!r}") from None
    return out


@steer_app.command("sweep")
def sweep_command(
    vector: str = typer.Argument(..., help="the vector file (.safetensors or .gguf)"),
    prompt: list[str] = typer.Option(..., "--prompt", help="a prompt to continue (repeatable)"),
    coefficients: str = typer.Option("-4,0,4", "--coefficients", help="comma-separated"),
    hook: list[str] = typer.Option([], "--hook", help="sweep only this hook (repeatable)"),
    samples: int = typer.Option(8, "--samples", help="seeded samples per prompt and cell"),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", "-n", help="tokens per sample"),
    seed: int = seed_option("seed of the samples and the random baseline"),
    positive_words: str | None = typer.Option(
        None, "--positive-words", help="comma-separated words to count"
    ),
    negative_words: str | None = typer.Option(
        None, "--negative-words", help="comma-separated words to count"
    ),
    no_random: bool = typer.Option(False, "--no-random", help="skip the random baseline"),
    csv: str | None = typer.Option(None, "--csv", help="write the rows as CSV"),
    json: str | None = typer.Option(None, "--json", help="write rows and samples as JSON"),
    plot: str | None = typer.Option(None, "--plot", help="write a plot (needs matplotlib)"),
    model: str | None = model_option(),
    threads: int | None = threads_option(),
) -> None:
    """Steer each hook of a vector at each coefficient, next to the unsteered model and an
    equal-norm random direction (same seeds); prints the table of word counts,
    perplexity under the unsteered model and 3-gram repetition."""
    from ..checkpoint import load
    from ..errors import GPT2LabError
    from ..steering import SteeringVector
    from ..steering.sweep import sweep

    use_threads(threads)
    coefs = parse_numbers(coefficients, "--coefficients")
    for path, option in ((csv, "--csv"), (json, "--json"), (plot, "--plot")):
        if path is not None:
            check_output(path, option=option)
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise GPT2LabError("--plot needs matplotlib: pip install matplotlib") from None
    words = None
    if positive_words is not None or negative_words is not None:
        words = tuple(
            [w.strip() for w in (ws or "").split(",") if w.strip()]
            for ws in (positive_words, negative_words)
        )
    lm = load(model)
    v = SteeringVector.load(vector, lm)
    result = sweep(
        lm, v, prompt, coefficients=coefs, hooks=list(hook) or None, n_samples=samples,
        max_new_tokens=max_new_tokens, seed=seed, words=words, random_baseline=not no_random,
    )  # fmt: skip
    typer.echo(result.table())
    for path, write in ((csv, result.to_csv), (json, result.to_json), (plot, result.plot)):
        if path is not None:
            write(path)
            typer.echo(f"saved {path}")


@steer_app.command("show")
def show_command(
    vector: str = typer.Argument(..., help="the vector file (.safetensors)"),
    model: str | None = model_option("check against (and for .gguf, read with) this model"),
) -> None:
    """The vector's record: hooks, shapes and norms, method, read position, model, data."""
    import json as json_module

    from ..steering import SteeringVector

    lm = None
    if model is not None or vector.endswith(".gguf"):
        from ..checkpoint import load

        lm = load(model)
    v = SteeringVector.load(vector, lm)
    for line in _summary(v):
        typer.echo(line)
    for key, value in v.meta.items():
        text = value if isinstance(value, str) else json_module.dumps(value, ensure_ascii=False)
        typer.echo(f"{key}: {text}")


@steer_app.command("convert")
def convert(
    source: str = typer.Argument(..., help="a .safetensors or .gguf vector"),
    target: str = typer.Argument(..., help="the other format (.gguf or .safetensors)"),
    model: str | None = model_option(),
    coefficient: float = typer.Option(
        1.0, "--coefficient", help="multiplied into the vector written"
    ),
) -> None:
    """Convert between gpt2lab's .safetensors vectors and llama.cpp's .gguf control vectors
    (direction.k is blocks.k.hook_resid_post, also written from blocks.k+1.hook_resid_pre)."""
    from pathlib import Path

    from ..checkpoint import load
    from ..errors import GPT2LabError
    from ..steering import SteeringVector, save_gguf

    kinds = {Path(p).suffix for p in (source, target)}
    if kinds != {".gguf", ".safetensors"}:
        raise GPT2LabError(
            "convert takes one .safetensors and one .gguf file (either way round), got "
            f"{source} and {target}"
        )
    check_output(target, option="TARGET")
    lm = load(model)
    v = SteeringVector.load(source, lm)
    if target.endswith(".gguf"):
        save_gguf(v, target, lm, coefficient)
    else:
        (v * coefficient if coefficient != 1.0 else v).save(target)
    for line in _summary(v):
        typer.echo(line)
    typer.echo(f"saved {target}")
