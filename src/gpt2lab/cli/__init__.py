"""The `gpt2lab` command line: one sub-command per job.

Every failure is one line on stderr, never a traceback: "gpt2lab: error: ..." with exit
code 1 for what a user can cause (our GPT2LabError, an OS error naming the path, a
file that is not text, out of memory) and exit code 2 for usage errors (typer's, and
lm-eval's argparse errors under `gpt2lab eval`); anything else is a bug, reported as
"gpt2lab: internal error: ..." with exit code 1 (GPT2LAB_DEBUG=1 shows the traceback).
Outputs (--out) are checked before any work starts.
"""

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

MODEL_HELP = (
    "checkpoint folder in HF layout (a training run's out_dir/best or out_dir/final), preset "
    "(gpt2, gpt2-medium, gpt2-large, gpt2-xl), HF repo id, or bundled (the tiny model "
    "shipped with gpt2lab, the default)"
)


THREADS_HELP = "CPU threads for this command (default: torch's choice, one per core)"


def threads_option() -> typer.models.OptionInfo:
    """--threads N, the same on every command that computes (N >= 1, checked by typer)."""
    return typer.Option(None, "--threads", min=1, help=THREADS_HELP)


def use_threads(threads: int | None) -> None:
    """Apply --threads before any work: torch's intra-op threads for this process. A
    process-wide setting is right in the CLI (one job per process) and is never made by
    the library. On a busy machine fewer threads than cores can be much faster."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


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
    prompt: str = typer.Argument(
        ...,
        help="text to continue, or @FILE to read it from a file (empty: start from <|endoftext|>)",
    ),
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
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
    seed: int | None = typer.Option(
        None,
        "--seed",
        help=f"random seed for sampling (default {SAMPLE_SEED}: the same command prints the "
        "same text; change it for another sample)",
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
    dtype: str = typer.Option(
        "float32", "--dtype", help="float32, bfloat16, float16 or int8 (int8 weights, bf16 compute)"
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    threads: int | None = threads_option(),
) -> None:
    """Continue a prompt and print prompt + continuation.

    Samples by default, as nanoGPT's sample.py does: temperature 0.8, top-k 200, seed 0
    (so the same command prints the same text). --greedy (or --temperature 0) takes the
    most likely token each step instead, which is what the Python API's
    model.generate() does unless given sampling options. --num-beams and --penalty-alpha
    select beam and contrastive search, which do not sample."""
    from ..checkpoint import load

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

    options = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, typical_p=typical_p, epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff,
        repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        min_new_tokens=min_new_tokens, stop=stop or None, max_time=max_time, seed=seed,
        penalty_alpha=penalty_alpha,
    )  # fmt: skip
    options = {k: v for k, v in options.items() if v is not None}
    if num_beams != 1:
        options["num_beams"] = num_beams
    if length_penalty is not None:  # without beams, the API says it needs them
        options["length_penalty"] = length_penalty
    from .steer import parse_steer

    pairs = [parse_steer(value) for value in steer_files]  # FILE[:COEF], checked before the load
    if dtype == "int8":  # int8 weights, bf16 compute
        lm = load(model, device=device, quantize="int8")
    else:
        lm = load(model, dtype=dtype, device=device)
    if pairs:
        from ..steering import Steering, SteeringVector

        options["steer"] = [
            Steering(SteeringVector.load(path, lm), coef, steer_operator, steer_positions)
            for path, coef in pairs
        ]
    if stream:
        typer.echo(prompt, nl=False)
        for piece in lm.stream(prompt, **options):
            typer.echo(piece, nl=False)
        typer.echo()
    else:
        typer.echo(prompt + lm.generate(prompt, **options))


@app.command()
def score(
    text: str = typer.Argument(..., help="the text to score, or @FILE to read it from a file"),
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
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
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
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
    seed: int = typer.Option(0, "--seed", help="seed of the train/val split"),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="tokenizer threads (default: one per core)"
    ),
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


@app.command()
def patch(
    clean: str = typer.Argument(..., help="the clean prompt"),
    corrupted: str = typer.Argument(..., help="the corrupted prompt (same number of tokens)"),
    answer: str = typer.Option(..., "--answer", help="the clean answer, one token, e.g. ' Mary'"),
    wrong: str = typer.Option(..., "--wrong", help="the corrupted answer, one token, e.g. ' John'"),
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    what: str = typer.Option(
        "resid_pre",
        "--what",
        help="resid_pre, resid_mid, attn_out, mlp_out, heads, q, k, v or pattern",
    ),
    out: str | None = typer.Option(
        None, "--out", "-o", help="also write the figure: FILE.png or FILE.html"
    ),
    batch: int = typer.Option(8, "--batch", help="patches per forward pass"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
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
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
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
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
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
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    steps: int = typer.Option(250, "--steps", help="optimizer steps"),
    tokens_per_step: int = typer.Option(4096, "--tokens-per-step", help="tokens per step"),
    seq_len: int = typer.Option(128, "--seq-len", help="tokens per training window"),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (Nesterov) or adamw"),
    lr: float | None = typer.Option(None, "--lr", help="default 1.0 for sgd, 1e-3 for adamw"),
    eval_data: str | None = typer.Option(
        None, "--eval", help="held-out text file or shards folder (val split) to report KL on"
    ),
    eval_tokens: int = typer.Option(16384, "--eval-tokens", help="tokens to report KL on"),
    seed: int = typer.Option(0, "--seed", help="seed of the training windows"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
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


if __name__ == "__main__":
    main()


# Command groups: `gpt2lab steer ...` and `gpt2lab neurons ...`. Each module registers its
# commands on its group (imports inside the commands keep `gpt2lab --help` fast).
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

from . import convert, correlate, neurons, steer, tune  # noqa: E402,F401  (they register their commands)
from . import serve  # noqa: E402,F401  (`gpt2lab serve`: registers itself on app)
