"""A neuron card: one self-contained HTML page about one unit of a `neuron_stats` run.

What a reader needs to judge a neuron at a glance, from the statistics file and the
model's weights: its moments over the corpus, the top contexts with every token shaded
by the unit's activation (red positive, blue negative, relative to the top value; the
max token outlined), the activation histogram (inline SVG, log-scaled counts, under-
and overflow bins at the ends), the quantile and random samples, and, for an MLP
neuron (`blocks.L.mlp.hook_post`), the tokens its output weight promotes and suppresses
(W_out[n] @ W_U, top and bottom k) and the moments of cos(W_out[n], W_U[:, v]) over the
vocabulary with the Universal Neurons class (prediction / suppression).

The page has no scripts and loads nothing: inline CSS, every piece of text (token text
above all, which is arbitrary corpus content) HTML-escaped.
"""

from __future__ import annotations

import html
import math
import os
import re
from pathlib import Path

from ..errors import GPT2LabError
from .neurons import NeuronStats, hook_name, model_fingerprint

MLP_HOOK = re.compile(r"blocks\.(\d+)\.mlp\.hook_post")

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: right; }
th { font-weight: 600; } .left { text-align: left; }
.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; }
.ctx span { padding: 1px 0; border-radius: 2px; }
.ctx .max { outline: 2px solid #000; }
.warn { color: #a40; }
.muted { color: #777; }
"""


def _token(tokenizer, token_id: int) -> str:
    """A token's text for display, escaped, with newlines and tabs made visible."""
    text = tokenizer.decode([token_id]).replace("\n", "\u21b5").replace("\t", "\u2192")
    return html.escape(text)


def _shade(act: float, scale: float) -> str:
    a = 0.0 if scale <= 0 or not math.isfinite(act) else max(-1.0, min(1.0, act / scale))
    color = "220,40,40" if a >= 0 else "40,90,220"
    return f"background: rgba({color},{abs(a):.3f})"


def _context_html(tokenizer, row: dict, scale: float) -> str:
    spans = []
    for i, (t, a) in enumerate(zip(row["tokens"], row["acts"], strict=True)):
        cls = ' class="max"' if i == row["at"] else ""
        spans.append(
            f'<span{cls} style="{_shade(a, scale)}" title="{a:.4g}">{_token(tokenizer, t)}</span>'
        )
    return "".join(spans)


def histogram_svg(
    counts: list[int], edges: list[float], width: int = 640, height: int = 160
) -> str:
    """Bars for [under, bin_1 .. bin_B, over] with log1p-scaled heights."""
    top = max(math.log1p(c) for c in counts) or 1.0
    bar = width / len(counts)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 30}" '
        f'role="img" aria-label="activation histogram">'
    ]
    for i, c in enumerate(counts):
        h = height * math.log1p(c) / top
        fill = "#999" if i in (0, len(counts) - 1) else "#c33"
        if i == 0:
            label = f"< {edges[0]:g}"
        elif i == len(counts) - 1:
            label = f">= {edges[-1]:g}"
        else:
            label = f"[{edges[i - 1]:g}, {edges[i]:g})"
        parts.append(
            f'<rect x="{i * bar:.2f}" y="{height - h:.2f}" width="{max(bar - 1, 0.5):.2f}" '
            f'height="{h:.2f}" fill="{fill}"><title>{html.escape(label)}: {c}</title></rect>'
        )
    for x, text, anchor in (
        (bar, f"{edges[0]:g}", "start"),
        (width - bar, f"{edges[-1]:g}", "end"),
    ):
        parts.append(
            f'<text x="{x:.1f}" y="{height + 16}" font-size="11" text-anchor="{anchor}">{text}</text>'
        )
    parts.append(
        f'<text x="{width / 2:.1f}" y="{height + 28}" font-size="11" text-anchor="middle">'
        "activation (grey: under/overflow; height: log(1 + count))</text></svg>"
    )
    return "".join(parts)


def _vocab_section(model, layer: int, neuron: int, k: int) -> str:
    from .vocab_space import neuron_vocab_stats, value_tokens

    view = value_tokens(model, layer, neuron, k)
    vs = neuron_vocab_stats(model, layers=[layer], neurons=[neuron])  # this neuron only
    kind = {1: "prediction", -1: "suppression", 0: "neither"}[int(vs.kind()[0, 0])]

    def tokens(rows) -> str:
        return "".join(
            f'<tr><td class="left ctx">{html.escape(repr(r.token))}</td><td>{r.score:.4g}</td></tr>'
            for r in rows
        )

    stats = "".join(
        f"<tr><th class='left'>{name}</th><td>{float(getattr(vs, name)[0, 0]):.5g}</td></tr>"
        for name in ("mean", "var", "skew", "kurtosis", "w_in_norm", "w_out_norm", "cos_in_out")
    )
    return (
        "<h2>Vocabulary space (weights)</h2>"
        f"<p>W_out[{neuron}] @ W_U: the tokens this neuron promotes and suppresses when it "
        "fires positively.</p><table><tr><td style='vertical-align:top'>"
        f"<table><tr><th class='left'>promoted</th><th>logit</th></tr>{tokens(view.top)}</table>"
        "</td><td style='vertical-align:top'>"
        f"<table><tr><th class='left'>suppressed</th><th>logit</th></tr>{tokens(view.bottom)}"
        "</table></td></tr></table>"
        "<p>Moments of cos(W_out[n], W_U[:, v]) over the vocabulary (plain kurtosis, 3 for a "
        f"Gaussian); class (kurtosis &gt; 10, sign of the skew): <b>{kind}</b>.</p>"
        f"<table>{stats}</table>"
    )


def neuron_card(stats: NeuronStats, model, hook, neuron: int, *, k: int = 10) -> str:
    """The HTML page for one unit (`hook`: a name or a layer number, meaning that layer's
    mlp.hook_post). `model` gives the tokenizer and the weights; a model other than the
    one the statistics were made with is named on the card."""
    h = stats._hook(hook_name(stats, hook))
    summary = stats.summary(h, neuron)
    rows = stats.top(h, neuron, k)
    tok = model.tokenizer
    scale = max((abs(r["value"]) for r in rows), default=0.0)
    title = f"{h} unit {neuron}"
    meta = stats.meta
    warn = ""
    if model_fingerprint(model) != meta["model"]["fingerprint"]:
        warn = (
            "<p class='warn'>The model given is not the one these statistics were made with "
            "(weight fingerprints differ): the vocabulary section reads the model given.</p>"
        )
    summary_rows = "".join(
        f"<tr><th class='left'>{name}</th><td>{value:.5g}</td></tr>"
        for name, value in summary.items()
        if name != "count"
    )
    contexts = "".join(
        f"<tr><td>{r['value']:.4g}</td><td>{r['doc']}</td><td>{r['pos']}</td>"
        f"<td class='left ctx'>{_context_html(tok, r, scale)}</td></tr>"
        for r in rows
    )
    samples = "".join(
        f"<tr><td class='left'>{label}</td><td>{s['value']:.4g}</td><td>{s['doc']}</td>"
        f"<td>{s['pos']}</td><td>{s['offset']}</td></tr>"
        for label, s in [(f"q = {s['quantile']:g}", s) for s in stats.quantile_samples(h, neuron)]
        + [("random", s) for s in stats.random_samples(h, neuron)]
        if s["offset"] >= 0
    )
    counts = stats.get(h, "hist")[neuron].tolist()
    corpus = meta["corpus"]
    layer = MLP_HOOK.fullmatch(h)
    vocab = (
        _vocab_section(model, int(layer.group(1)), neuron, k)
        if layer
        else "<p class='muted'>Not an MLP neuron: no vocabulary-space view.</p>"
    )
    p = stats.params
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="muted">model {html.escape(str(meta["model"]["name"]))} (fingerprint
{html.escape(meta["model"]["fingerprint"])}); corpus {html.escape(", ".join(corpus.get("paths", [])))}
({html.escape(corpus.get("hash", ""))}); {summary["count"]:,} tokens counted of
{meta["tokens_read"]:,} read; dropped: {html.escape(", ".join(map(repr, meta["filters"]["drop"])))}.</p>
{warn}
<h2>Activation over the corpus</h2>
<table>{summary_rows}</table>
<p class="muted">variance: population; kurtosis: excess (0 for a Gaussian); active: &gt; {p.threshold:g}.</p>
{histogram_svg(counts, stats.edges().tolist())}
<h2>Top {len(rows)} contexts</h2>
<table><tr><th>value</th><th>doc</th><th>pos</th><th class="left">context (outlined: the max token)</th></tr>
{contexts}</table>
<h2>Samples</h2>
<p class="muted">Quantile samples: a random token from the histogram bin holding that quantile.</p>
<table><tr><th class="left">sample</th><th>value</th><th>doc</th><th>pos</th><th>offset</th></tr>
{samples}</table>
{vocab}
</body></html>
"""


def write_card(path: str | os.PathLike, page: str) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    except OSError as e:
        raise GPT2LabError(f"cannot write {path}: {e.strerror or e}") from None
    return path
