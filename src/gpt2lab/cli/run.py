"""`gpt2lab info|generate|score`: look at a model, run it on a prompt, score a text."""

from __future__ import annotations

import typer

from ..errors import GPT2LabError
from .core import app
from .options import (
    MODEL_HELP,
    device_option,
    dtype_option,
    load_model,
    model_option,
    seed_option,
    text_argument,
    threads_option,
    use_threads,
)


@app.command()
def info(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    kernels: bool = typer.Option(
        False, "--kernels", help="show the CPU kernels chosen on this machine instead, with GB/s"
    ),
) -> None:
    """Sizes, parameter count, dtype and files of a model (reads headers only, not weights);
    with no model, the bundled one. `--kernels`: which kernel runs each case here, each
    candidate's measured time (`gpt2lab tune` decides them ahead of time)."""
    if kernels:
        from ..kernels.tune import report

        for line in report():
            typer.echo(line)
        return
    from .. import checkpoint
    from ..config import PRESETS, GPT2Config

    try:
        directory = checkpoint.resolve(model)
    except GPT2LabError as e:
        if model not in PRESETS:
            raise
        directory, cfg, missing = None, GPT2Config.preset(model), str(e)
    else:
        cfg, missing = GPT2Config.from_json_file(directory / "config.json"), ""
    rows = [
        ("model", "bundled" if model is None else model),
        ("layers", cfg.n_layers),
        ("d_model", cfg.d_model),
        ("heads", f"{cfg.n_heads} x d_head {cfg.d_head}"),
        ("d_mlp", cfg.d_mlp),
        ("context", cfg.n_ctx),
        ("vocabulary", cfg.d_vocab),
        ("activation", cfg.act_fn),
        ("parameters", f"{cfg.n_params:,} ({cfg.n_params / 1e6:.1f}M)"),
    ]
    if directory is None:
        rows.append(("files", f"not available ({missing})"))
    else:
        rows.append(("directory", str(directory)))
        for f in sorted(directory.iterdir()):
            if f.is_file():
                rows.append(("file", f"{f.name} ({f.stat().st_size / 2**20:.1f} MiB)"))
        dtypes = checkpoint.stored_dtypes(directory)
        if dtypes:
            rows.append(("stored dtype", ", ".join(sorted(dtypes))))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


# The CLI's generate samples by default, as nanoGPT's sample.py does (temperature 0.8,
# top-k 200), with a fixed seed so that a command, and the README's output of it, is
# reproducible. The Python API stays greedy by default, as transformers' generate is.
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_K = 200
SAMPLE_SEED = 0


@app.command()
def generate(
    ctx: typer.Context,
    prompt: str = typer.Argument(
        ...,
        help="text to continue, or @FILE to read it from a file (empty: start from <|endoftext|>)",
    ),
    model: str | None = model_option(),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="tokens to generate"),
    temperature: float | None = typer.Option(
        None,
        "--temperature",
        "-t",
        help=f"sampling temperature (default {SAMPLE_TEMPERATURE}); 0 = greedy",
    ),
    top_k: int | None = typer.Option(
        None,
        "--top-k",
        help=f"sample from the k most likely tokens (default {SAMPLE_TOP_K}; 0 = all); "
        "with --penalty-alpha, the contrastive candidates",
    ),
    greedy: bool = typer.Option(
        False, "--greedy", help="take the most likely token each step (the Python API's default)"
    ),
    top_p: float | None = typer.Option(None, "--top-p", help="nucleus sampling mass, in (0, 1]"),
    min_p: float | None = typer.Option(
        None, "--min-p", help="drop tokens below min_p x the top probability"
    ),
    typical_p: float | None = typer.Option(
        None, "--typical-p", help="locally typical sampling mass"
    ),
    epsilon_cutoff: float | None = typer.Option(
        None, "--epsilon-cutoff", help="drop tokens below this probability"
    ),
    eta_cutoff: float | None = typer.Option(
        None, "--eta-cutoff", help="entropy-dependent cutoff (eta sampling)"
    ),
    repetition_penalty: float | None = typer.Option(
        None, "--repetition-penalty", help="> 1 discourages repeats (CTRL)"
    ),
    frequency_penalty: float | None = typer.Option(
        None, "--frequency-penalty", help="subtract count x this (OpenAI)"
    ),
    presence_penalty: float | None = typer.Option(
        None, "--presence-penalty", help="subtract this once a token appeared"
    ),
    no_repeat_ngram_size: int | None = typer.Option(
        None, "--no-repeat-ngram-size", help="never repeat an n-gram"
    ),
    min_new_tokens: int | None = typer.Option(
        None, "--min-new-tokens", help="no end-of-text before this many"
    ),
    num_beams: int = typer.Option(1, "--num-beams", help="beam search with this many beams"),
    length_penalty: float | None = typer.Option(
        None, "--length-penalty", help="beam score / length**this (default 1.0)"
    ),
    penalty_alpha: float | None = typer.Option(
        None, "--penalty-alpha", help="contrastive search degeneration penalty (with --top-k >= 2)"
    ),
    stop: list[str] = typer.Option([], "--stop", help="stop at this string (repeatable)"),
    max_time: float | None = typer.Option(None, "--max-time", help="stop after this many seconds"),
    seed: int | None = seed_option(
        f"random seed for sampling (default {SAMPLE_SEED}: the same command prints the "
        "same text; change it for another sample)",
        default=None,
    ),
    stream: bool = typer.Option(False, "--stream", help="print tokens as they are generated"),
    steer_files: list[str] = typer.Option(
        [],
        "--steer",
        help="steer with a vector file (.safetensors, or a llama.cpp .gguf control vector) "
        "times COEF (default 1): FILE or FILE:COEF, repeatable",
    ),
    steer_positions: str = typer.Option(
        "all", "--steer-positions", help="all, prompt, generated or from=K (every --steer)"
    ),
    steer_operator: str = typer.Option(
        "add", "--steer-operator", help="add, ablate, ablate_add or cap (every --steer)"
    ),
    dtype: str = dtype_option(int8=True),
    device: str = device_option(),
    threads: int | None = threads_option(),
) -> None:
    """Continue a prompt and print prompt + continuation.

    Samples by default, as nanoGPT's sample.py does: temperature 0.8, top-k 200, seed 0
    (so the same command prints the same text). --greedy (or --temperature 0) takes the
    most likely token each step instead, which is what the Python API's
    model.generate() does unless given sampling options. --num-beams and --penalty-alpha
    select beam and contrastive search, which do not sample."""
    use_threads(threads)
    prompt = text_argument(prompt, "generate")
    sampling = {
        "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
        "typical_p": typical_p, "epsilon_cutoff": epsilon_cutoff, "eta_cutoff": eta_cutoff,
    }  # fmt: skip
    if greedy:
        given = [
            k for k, v in sampling.items() if v is not None and not (k == "temperature" and v == 0)
        ]
        if given:
            option = "--" + given[0].replace("_", "-")
            raise GPT2LabError(f"--greedy does not sample; drop {option} (or --greedy)")
    elif num_beams == 1 and penalty_alpha is None and temperature != 0:  # sampling
        temperature = SAMPLE_TEMPERATURE if temperature is None else temperature
        top_k = SAMPLE_TOP_K if top_k is None else top_k
        seed = SAMPLE_SEED if seed is None else seed
    # checked before the load, as --steer's FILE[:COEF] is
    config = generation_config(ctx.params, temperature=temperature, top_k=top_k, seed=seed)
    from .steer import parse_steer

    pairs = [parse_steer(value) for value in steer_files]
    lm = load_model(model, dtype=dtype, device=device)  # int8: int8 weights, bf16 compute
    steer = None
    if pairs:
        from ..steering import Steering, SteeringVector

        steer = [
            Steering(SteeringVector.load(path, lm), coef, steer_operator, steer_positions)
            for path, coef in pairs
        ]
    if stream:
        typer.echo(prompt, nl=False)
        for piece in lm.stream(prompt, steer=steer, config=config):
            typer.echo(piece, nl=False)
        typer.echo()
    else:
        typer.echo(prompt + lm.generate(prompt, steer=steer, config=config))


def generation_config(params: dict, **overrides):
    """The command's options that are GenerationConfig fields (the CLI names them as the
    Python API does: --top-k is top_k), with `overrides` (the CLI's sampling defaults)
    applied, as one validated `GenerationConfig`. Options left unset (None, no --stop)
    are not given, so the config's own defaults hold."""
    import dataclasses

    from ..generation.config import GenerationConfig

    fields = {f.name for f in dataclasses.fields(GenerationConfig)}
    options = {
        name: value
        for name, value in {**params, **overrides}.items()
        if name in fields and value is not None and value != [] and value != ()
    }
    return GenerationConfig.from_options(**options)


@app.command()
def score(
    text: str = typer.Argument(..., help="the text to score, or @FILE to read it from a file"),
    model: str | None = model_option(),
    stride: int | None = typer.Option(
        None, "--stride", help="sliding-window stride (default: the context)"
    ),
    tokens: bool = typer.Option(False, "--tokens", help="also print a per-token table"),
    words: bool = typer.Option(False, "--words", help="also print a per-word surprisal table"),
    bos: bool = typer.Option(
        True,
        "--bos/--no-bos",
        help="prepend <|endoftext|> as context so the first token is scored too, as "
        "model.perplexity/score do by default (lm-eval and TransformerLens score GPT-2 this "
        "way); --no-bos takes the tokens as given, reproducing HF's perplexity guide",
    ),
    dtype: str = dtype_option(),
    device: str = device_option(),
    threads: int | None = threads_option(),
) -> None:
    """Perplexity of a text (HF's sliding window), with per-token or per-word surprisal.

    The numbers of model.perplexity and model.score (--bos is their bos=True default)."""
    from ..checkpoint import load

    use_threads(threads)
    text = text_argument(text, "score")
    lm = load(model, dtype=dtype, device=device)
    progress = True  # a transient bar on a terminal, periodic lines in a log (progress.py)
    ppl, nll, n = lm.perplexity(
        text, stride=stride, bos=bos, return_details=True, progress=progress
    )
    typer.echo(f"perplexity {ppl:.4f}  ({n} tokens scored, mean NLL {nll / n:.4f} nats)")
    if tokens or words:
        scored = lm.score(text, bos=bos, progress=progress)
        if tokens:
            typer.echo("\n  pos  token                 logprob  surprisal (bits)")
            for i, (tok, lp) in enumerate(zip(scored.strings, scored.logprobs, strict=True)):
                typer.echo(f"{i:5d}  {tok!r:20.20}  {lp:9.4f}  {-lp / 0.6931471805599453:9.3f}")
        if words:
            typer.echo("\nword                  surprisal (bits)")
            for w in scored.words():
                typer.echo(f"{w.text!r:20.20}  {w.surprisal:9.3f}")
