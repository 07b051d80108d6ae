"""Evaluating a steering vector: layers x coefficients, against an equal-norm random
direction, with the unsteered continuations of the same seeds side by side.

A steering effect is only a finding when it beats two controls: the model unsteered
(what the prompts do anyway) and a random direction of the same norm at the same hook
(what any push of that size does: more noise, fewer fluent words, shifted word counts).
`sweep` runs all three on the same random numbers, so the cells differ by the steering
alone.

Samples and seeds. The continuations of one cell are generated as one batch of fixed
composition: row r = i * n_samples + j is sample j of prompt i, in chunks of at most
`batch_size` rows, the chunk starting at row r0 drawn with seed `seed + r0`. Generation
seeds rows one by one (row b of a call with seed s samples with seed s + b), so row r
samples with seed `seed + r` in every cell (common random numbers), and no two rows
share a seed: a sample's text depends on (seed, r) and the steering, never on what
the other rows did. Coefficient 0 with "add" is the
unsteered model bit for bit (steering's zero-vector guarantee), so it is not rerun.

Metrics of a cell (all over the continuations only, never the prompt):

- `positive`, `negative`: whole-word, case-insensitive occurrences of the `words` lists
  (a word is not counted inside another: "love" does not match "glove"), summed over
  every continuation of the cell;
- `metric`: the mean of a user function `metric(text) -> float` over the continuations;
- `perplexity`: exp of the mean negative log-likelihood, under the *unsteered* model, of
  every continuation token given its prompt and the tokens before it (pooled over the
  cell's tokens; an ending <|endoftext|> is not generated text and is not scored): how
  fluent the steered text is to the model that was not steered;
- `repetition`: the fraction of a continuation's token 3-grams that already occurred
  earlier in the same continuation (0 = no 3-gram repeats, near 1 = a loop), averaged
  over the continuations with at least 3 tokens.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import GPT2LabError
from ..validate import integer, show
from .apply import Steering
from .vector import SteeringVector

KINDS = ("unsteered", "steered", "random")
SAMPLING = {"temperature": 0.8, "top_k": 200}  # the CLI's sampling defaults (nanoGPT's)


@dataclass
class SweepResult:
    """One row per cell: {hook, kind, coefficient, positive, negative, metric,
    perplexity, repetition, n} (kind "unsteered" once, with hook "-" and coefficient 0).
    `samples`: per hook, coefficient and sample, the prompt, its (seed, row) and the
    unsteered, steered and random continuations side by side."""

    rows: list[dict[str, Any]]
    samples: list[dict[str, Any]] = field(default_factory=list)
    words: tuple[list[str], list[str]] | None = None

    @property
    def columns(self) -> list[str]:
        cols = ["hook", "kind", "coefficient"]
        if self.words is not None:
            cols += ["positive", "negative"]
        if any("metric" in r for r in self.rows):
            cols.append("metric")
        return cols + ["perplexity", "repetition", "n"]

    def row(self, kind: str, coefficient: float = 0.0, hook: str | None = None) -> dict:
        """The row of one cell (`hook` may be omitted when the sweep had one hook)."""
        for r in self.rows:
            if r["kind"] == kind and (kind == "unsteered" or r["coefficient"] == coefficient):
                if kind == "unsteered" or hook is None or r["hook"] == hook:
                    return r
        raise GPT2LabError(f"no {kind} row at coefficient {coefficient} (hook {hook})")

    def table(self) -> str:
        """The rows as an aligned text table."""
        cols = self.columns
        cells = [[_fmt(r.get(c)) for c in cols] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
        return "\n".join(line.rstrip() for line in lines)

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def to_json(self, path: str | Path) -> Path:
        """Rows, samples and the word lists as one JSON document (NaN written as null)."""
        path = Path(path)
        doc = {"rows": self.rows, "samples": self.samples,
               "words": None if self.words is None else {"positive": self.words[0],
                                                         "negative": self.words[1]}}  # fmt: skip
        path.write_text(json.dumps(_nan_to_none(doc), ensure_ascii=False, indent=1) + "\n")
        return path

    def plot(self, path: str | Path) -> Path:
        """Each metric against the coefficient, one line per hook, steered solid and
        random dashed, unsteered as a grey level line. Needs matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise GPT2LabError("plotting needs matplotlib: pip install matplotlib") from None
        metrics = [c for c in self.columns if c not in ("hook", "kind", "coefficient", "n")]
        hooks = list(dict.fromkeys(r["hook"] for r in self.rows if r["kind"] != "unsteered"))
        base = self.row("unsteered")
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4), squeeze=False)
        for ax, m in zip(axes[0], metrics, strict=True):
            ax.axhline(_num(base.get(m)), color="grey", lw=1, label="unsteered")
            for i, hook in enumerate(hooks):
                for kind, style in (("steered", "-"), ("random", "--")):
                    pts = sorted(
                        (r["coefficient"], _num(r.get(m)))
                        for r in self.rows
                        if r["hook"] == hook and r["kind"] == kind
                    )
                    ax.plot(*zip(*pts, strict=True), style, marker="o", color=f"C{i}",
                            label=f"{hook} {kind}")  # fmt: skip
            ax.set_xlabel("coefficient")
            ax.set_title(m)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        plt.close(fig)
        return path


def sweep(
    model: Any,
    vector: SteeringVector,
    prompts: str | Sequence[str],
    *,
    coefficients: Sequence[float],
    hooks: str | Sequence[str] | None = None,
    n_samples: int = 8,
    max_new_tokens: int = 24,
    seed: int = 0,
    words: tuple[Sequence[str], Sequence[str]] | None = None,
    metric: Callable[[str], float] | None = None,
    random_baseline: bool = True,
    operator: str = "add",
    positions: Any = "all",
    batch_size: int = 64,
    **sampling: Any,
) -> SweepResult:
    """Steer with each hook of `vector` separately (`hooks` to choose some) at each
    coefficient, and with an equal-norm random direction at the same hook and
    coefficients; score all cells and the unsteered model (see the module docstring).

    Sampling options go to `model.generate` (default: temperature 0.8, top-k 200, as
    the CLI samples). The random direction at a hook is a Gaussian drawn from a
    generator seeded with `seed` and the hook's index, scaled to the vector's norm
    there (position by position for an ActAdd sequence)."""
    if not isinstance(vector, SteeringVector):
        raise GPT2LabError(f"sweep takes a SteeringVector, got {show(vector)}")
    vector.check(model)
    prompts = _prompts(prompts)
    coefficients = _coefficients(coefficients)
    hooks = _hooks(vector, hooks)
    n_samples = integer("n_samples", n_samples, 1)
    max_new_tokens = integer("max_new_tokens", max_new_tokens, 1)
    seed = integer("seed", seed, 0, 2**62)
    batch_size = integer("batch_size", batch_size, 1)
    patterns = _words(words)
    if metric is not None and not callable(metric):
        raise GPT2LabError(f"metric must be a function text -> number, got {show(metric)}")
    if not isinstance(random_baseline, bool):
        raise GPT2LabError(f"random_baseline must be True or False, got {show(random_baseline)}")
    Steering(vector, 1.0, operator, positions)  # checks operator and positions up front
    options = {**SAMPLING, **sampling, "max_new_tokens": max_new_tokens}
    for fixed in ("seed", "steer", "return_result"):
        if fixed in options:
            raise GPT2LabError(f"sweep sets {fixed} itself; give seed= to sweep")

    batch = [p for p in prompts for _ in range(n_samples)]

    def run(steering: Steering | None) -> list[list[int]]:
        tokens = []
        for start in range(0, len(batch), batch_size):
            chunk = batch[start : start + batch_size]
            result = model.generate(
                chunk, steer=steering, seed=seed + start, return_result=True, **options
            )
            tokens += result.tokens
        return tokens

    def cell(tokens: list[list[int]]) -> dict[str, Any]:
        return _metrics(model, batch, tokens, patterns, metric)

    base_tokens = run(None)
    rows = [{"hook": "-", "kind": "unsteered", "coefficient": 0.0, **cell(base_tokens)}]
    decode = model.tokenizer.decode
    samples = []
    for h, hook in enumerate(hooks):
        single = vector.only(hook)
        kinds = [("steered", single)]
        if random_baseline:
            kinds.append(("random", random_like(single, seed=seed * 1_000_003 + h)))
        texts: dict[tuple[str, float], list[str]] = {}
        for c in coefficients:
            for kind, v in kinds:
                if c == 0 and operator == "add":
                    tokens = base_tokens
                else:
                    tokens = run(Steering(v, c, operator, positions))
                rows.append({"hook": hook, "kind": kind, "coefficient": c, **cell(tokens)})
                texts[kind, c] = [decode(t) for t in tokens]
        for c in coefficients:
            for r, prompt in enumerate(batch):
                samples.append({
                    "hook": hook, "coefficient": c, "prompt": prompt,
                    "seed": seed + r, "row": r,
                    "unsteered": decode(base_tokens[r]), "steered": texts["steered", c][r],
                    "random": texts["random", c][r] if random_baseline else None,
                })  # fmt: skip
    word_lists = None if patterns is None else (patterns[0][0], patterns[1][0])
    return SweepResult(rows, samples, word_lists)


def random_like(vector: SteeringVector, *, seed: int) -> SteeringVector:
    """A Gaussian direction at each hook of `vector`, scaled to its norm there (per
    position for a sequence): the equal-norm random baseline."""
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for hook, d in vector.directions.items():
        r = torch.randn(d.shape, generator=gen, dtype=torch.float32)
        out[hook] = r / r.norm(dim=-1, keepdim=True) * d.norm(dim=-1, keepdim=True)
    return SteeringVector(out, {"method": "random baseline", "seed": int(seed)})


# ---- metrics ---------------------------------------------------------------------------
def count_words(texts: Sequence[str], pattern: re.Pattern | None) -> int:
    """Whole-word, case-insensitive occurrences of a word list (a compiled pattern)."""
    return 0 if pattern is None else sum(len(pattern.findall(t)) for t in texts)


def word_pattern(words: Sequence[str]) -> re.Pattern | None:
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def repetition_rate(tokens: Sequence[int], n: int = 3) -> float:
    """The fraction of the n-grams of `tokens` that occurred earlier in it (NaN if it
    has fewer than n tokens)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return math.nan
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


@torch.inference_mode()
def continuation_nll(model: Any, prompt: str, continuations: list[list[int]]) -> tuple[float, int]:
    """(summed negative log-likelihood, token count) of continuations of one prompt
    under the model as it is (unsteered), each token given the prompt and those before
    it. The prompt is tokenized as generate tokenizes it (BOS by the model's default)."""
    tok = model.tokenizer
    ids = tok.encode(prompt)
    if model._bos(None) or not ids:
        ids = [tok.eot_token] + ids
    rows = [c for c in continuations if c]
    if not rows:
        return 0.0, 0
    width = len(ids) + max(len(c) for c in rows)
    step = max(1, 2**26 // (width * model.cfg.d_vocab))  # about 256 MB of float32 logits
    total, count = 0.0, 0
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        tokens = torch.full((len(chunk), width), tok.eot_token, dtype=torch.long)
        for i, c in enumerate(chunk):  # right padding: no real token attends to it
            tokens[i, : len(ids) + len(c)] = torch.tensor(ids + c)
        logits = model(tokens.to(model.device)).float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        picked = logprobs.gather(2, tokens[:, 1:, None].to(model.device))[..., 0].cpu()
        for i, c in enumerate(chunk):
            lp = picked[i, len(ids) - 1 : len(ids) - 1 + len(c)]
            total -= float(lp.double().sum())
            count += len(c)
    return total, count


def _metrics(model, batch, tokens, patterns, metric) -> dict[str, Any]:
    texts = [model.tokenizer.decode(t) for t in tokens]
    out: dict[str, Any] = {}
    if patterns is not None:
        out["positive"] = count_words(texts, patterns[0][1])
        out["negative"] = count_words(texts, patterns[1][1])
    if metric is not None:
        values = []
        for t in texts:
            v = metric(t)
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise GPT2LabError(f"metric(text) must return a number, got {show(v)}")
            values.append(float(v))
        out["metric"] = sum(values) / len(values)
    nll, count = 0.0, 0
    for prompt in dict.fromkeys(batch):
        rows = [t for p, t in zip(batch, tokens, strict=True) if p == prompt]
        a, b = continuation_nll(model, prompt, rows)
        nll, count = nll + a, count + b
    out["perplexity"] = math.exp(nll / count) if count else math.nan
    reps = [x for x in (repetition_rate(t) for t in tokens) if not math.isnan(x)]
    out["repetition"] = sum(reps) / len(reps) if reps else math.nan
    out["n"] = len(tokens)
    return out


# ---- checking what was given -----------------------------------------------------------
def _prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise GPT2LabError(
            f"prompts must be a text or a non-empty list of texts, got {show(prompts)}"
        )
    for p in prompts:
        if not isinstance(p, str) or not p:
            raise GPT2LabError(f"each prompt must be non-empty text, got {show(p)}")
    return list(prompts)


def _coefficients(values: Any) -> list[float]:
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        raise GPT2LabError(f"coefficients must be a non-empty list of numbers, got {show(values)}")
    out = []
    for c in values:
        if not isinstance(c, numbers.Real) or isinstance(c, bool) or not math.isfinite(c):
            raise GPT2LabError(f"each coefficient must be a finite number, got {show(c)}")
        out.append(float(c))
    return list(dict.fromkeys(out))


def _hooks(vector: SteeringVector, hooks: Any) -> list[str]:
    if hooks is None:
        return vector.hooks
    if isinstance(hooks, str):
        hooks = [hooks]
    if not isinstance(hooks, (list, tuple)) or not hooks:
        raise GPT2LabError(f"hooks must be a hook name or a list of them, got {show(hooks)}")
    for h in hooks:
        if h not in vector.directions:
            raise GPT2LabError(
                f"this vector has no direction at {h!r}; it has {', '.join(vector.hooks)}"
            )
    return list(dict.fromkeys(hooks))


def _words(words: Any) -> tuple | None:
    """((positive list, pattern), (negative list, pattern)) or None."""
    if words is None:
        return None
    if not isinstance(words, (list, tuple)) or len(words) != 2:
        raise GPT2LabError(
            f"words must be a pair (positive words, negative words), got {show(words)}"
        )
    out = []
    for name, ws in zip(("positive", "negative"), words, strict=True):
        if isinstance(ws, str):
            ws = [w.strip() for w in ws.split(",")]
        if not isinstance(ws, (list, tuple)) or not all(isinstance(w, str) and w for w in ws):
            raise GPT2LabError(
                f"the {name} words must be a list of non-empty words, got {show(ws)}"
            )
        out.append((list(ws), word_pattern(ws)))
    if not out[0][0] and not out[1][0]:
        raise GPT2LabError("words: both word lists are empty")
    return tuple(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x
