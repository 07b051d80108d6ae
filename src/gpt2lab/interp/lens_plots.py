"""Showing a `LensResult`: a rich table, a self-contained HTML heat map, a PNG heat map.

All three lay the result out the same way, rows (embeddings first, the model's output
last) against input positions, with the top-1 token in each cell, so a reader can move
between them. The HTML needs nothing but a browser (inline styles, no scripts); the
PNG needs matplotlib, an optional extra, and is drawn without pyplot so that it never
touches a notebook's global plotting state.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import GPT2LabError

if TYPE_CHECKING:
    from rich.table import Table

    from .lens import LensResult

CAPTIONS = {
    "prob": "probability of the top-1 token",
    "target": "probability of the target token",
    "entropy": "entropy (nats)",
    "kl": "KL(model output || lens) (nats)",
}


def show_token(s: str, width: int = 12) -> str:
    """A token as a short quoted literal, so spaces and newlines stay visible; a long
    one is cut in the middle of the literal and keeps its closing quote ('Psychiat…')."""
    text = repr(s)
    return text if len(text) <= width else text[: max(1, width - 2)] + "…" + text[-1]


def _scale(result: LensResult, color_by: str) -> tuple[torch.Tensor, float]:
    """The values to colour by and the value that maps to the darkest colour."""
    values = result.values(color_by)
    if color_by in ("prob", "target"):
        return values, 1.0
    finite = values[torch.isfinite(values)]
    top = float(finite.max()) if finite.numel() else 1.0
    return values, top if top > 0 else 1.0


# ---- terminal ----------------------------------------------------------------------
class LensTable:
    """The lens as terminal tables, layers as rows and positions as columns (as in the
    HTML and PNG), paged over positions so that every page fits the console it is
    printed on: each page repeats the layer labels, and cells are never squeezed (a
    rich table that does not fit cuts every cell to `'…`). A rich renderable:
    `Console().print(result.table())`; `pages(width)` gives the tables themselves.
    """

    def __init__(self, result: LensResult, k: int = 1):
        from rich.cells import cell_len

        self.result, self.k = result, max(1, min(k, result.k))
        self.title = (
            f"{result.lens}: top-{self.k} token and probability per layer (rows) and position"
        )
        if result.target is not None:  # its own line: the heading stays within 80 columns
            self.title += f"\np and rank of {result.target!r}: each cell's last line"
        self.label_width = max(cell_len(x) for x in ["layer", *result.labels])
        self.headers, self.columns, self.widths = [], [], []
        for pos, s in enumerate(result.strings):
            header = f"{pos}\n{show_token(s)}"
            cells = [self._cell(row, pos) for row in range(len(result.labels))]
            self.headers.append(header)
            self.columns.append(cells)
            lines = header.split("\n") + [x for c in cells for x in c.plain.split("\n")]
            self.widths.append(max(cell_len(x) for x in lines))

    def _cell(self, row: int, pos: int):
        from rich.text import Text

        r = self.result
        cell = Text()
        for j in range(self.k):
            p = float(r.top_probs[row, pos, j])
            hit = int(r.top_ids[row, pos, j]) == int(r.target_ids[pos])
            style = "bold green" if hit else ("bold" if p >= 0.5 else "")
            if j:
                cell.append("\n")
            cell.append(f"{show_token(r.top_strings[row][pos][j])} {p:.2f}", style=style)
        if r.target is not None:
            tp, rank = float(r.target_probs[row, pos]), int(r.target_ranks[row, pos])
            cell.append(f"\np={tp:.2f} #{rank}", style="dim")
        return cell

    def page_ranges(self, width: int) -> list[range]:
        """Consecutive positions per page: as many as fit in `width` columns (at least
        one), counting rich's borders and padding (3 cells a column, 1 for the edge)."""
        pages, start, used = [], 0, 1 + self.label_width + 3
        for pos, w in enumerate(self.widths):
            if pos > start and used + w + 3 > width:
                pages.append(range(start, pos))
                start, used = pos, 1 + self.label_width + 3
            used += w + 3
        pages.append(range(start, len(self.widths)))
        return pages

    def pages(self, width: int) -> list[Table]:
        from rich.table import Table

        ranges = self.page_ranges(width)
        tables = []
        n = len(self.widths)
        for span in ranges:
            title = f"positions {span[0]}-{span[-1]} (of {n})" if len(ranges) > 1 else None
            table = Table(title=title, show_lines=True, title_justify="left")
            table.add_column("layer", style="bold", no_wrap=True, min_width=self.label_width)
            for pos in span:
                table.add_column(self.headers[pos], no_wrap=True, min_width=self.widths[pos])
            for row, label in enumerate(self.result.labels):
                table.add_row(label, *(self.columns[pos][row] for pos in span))
            tables.append(table)
        return tables

    def __rich_console__(self, console, options):
        from rich.text import Text

        yield Text(self.title)
        yield from self.pages(options.max_width)

    def __str__(self) -> str:
        """Plain text at the terminal's width, for `print(result.table())`."""
        import io
        import shutil

        from rich.console import Console

        out = io.StringIO()
        Console(file=out, width=shutil.get_terminal_size().columns, color_system=None).print(self)
        return out.getvalue().rstrip("\n")

    def __repr__(self) -> str:
        return f"<LensTable: {self.result.lens}, top-{self.k}; print() it>"


def lens_table(result: LensResult, k: int = 1) -> LensTable:
    return LensTable(result, k)


# ---- HTML --------------------------------------------------------------------------
def _blue(v: float) -> tuple[str, str]:
    """Background and text colour for v in [0, 1], white to dark blue."""
    if not math.isfinite(v):
        return "#eeeeee", "#888888"
    v = min(max(v, 0.0), 1.0)
    low, high = (255, 255, 255), (8, 48, 107)
    rgb = [round(a + (b - a) * v) for a, b in zip(low, high, strict=True)]
    return "#{:02x}{:02x}{:02x}".format(*rgb), ("#ffffff" if v > 0.55 else "#111111")


class HTMLPage(str):
    """A self-contained HTML page that is still a `str` (write it, search it, compare
    it), but does not flood a REPL: its repr is one line, a notebook shows the page
    itself (in an iframe, so its styles stay inside), and `save(path)` writes it."""

    def __new__(cls, html: str, summary: str = "HTML page", height: int = 400) -> HTMLPage:
        page = super().__new__(cls, html)
        page.summary, page.height = summary, height
        return page

    @property
    def html(self) -> str:
        return str.__str__(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.html, encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        return (
            f"<iframe srcdoc='{html.escape(self.html, quote=True)}' "
            f"style='width:100%;height:{self.height}px;border:0'></iframe>"
        )

    def __repr__(self) -> str:
        return f"<{self.summary}, {len(self):,} characters: .save(path), or show it in a notebook>"


def lens_html(result: LensResult, color_by: str = "prob") -> str:
    values, top = _scale(result, color_by)
    esc = html.escape
    head = "".join(
        f"<th title='position {i}'>{esc(show_token(s))}</th>" for i, s in enumerate(result.strings)
    )
    body = []
    for row, label in enumerate(result.labels):
        cells = []
        for pos in range(len(result.strings)):
            v = float(values[row, pos])
            bg, fg = _blue(v / top)
            tip = [
                f"{j + 1}. {show_token(result.top_strings[row][pos][j], 40)} "
                f"{float(result.top_probs[row, pos, j]):.4f}"
                for j in range(result.k)
            ]
            if int(result.target_ids[pos]) >= 0:
                tip.append(
                    f"target {show_token(result.target_strings[pos], 40)}: "
                    f"p={float(result.target_probs[row, pos]):.4f}, "
                    f"rank {int(result.target_ranks[row, pos])}"
                )
            tip.append(
                f"entropy {float(result.entropy[row, pos]):.3f}, KL {float(result.kl[row, pos]):.3f}"
            )
            token = esc(show_token(result.top_strings[row][pos][0]))
            p = float(result.top_probs[row, pos, 0])
            cells.append(
                f"<td style='background:{bg};color:{fg}' title='{esc(chr(10).join(tip), quote=True)}'>"
                f"{token}<small>{p:.2f}</small></td>"
            )
        body.append(f"<tr><th>{esc(label)}</th>{''.join(cells)}</tr>")
    targets = "".join(f"<td>{esc(show_token(s)) if s else ''}</td>" for s in result.target_strings)
    body.append(f"<tr class='target'><th>target</th>{targets}</tr>")
    title = f"{result.lens}: {CAPTIONS[color_by]}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; white-space: pre; }}
td small {{ display: block; opacity: .75; font-size: 10px; }}
th {{ background: #fafafa; font-weight: 600; }}
tr.target td {{ color: #555; font-style: italic; }}
</style></head>
<body>
<h3>{esc(title)}</h3>
<p>Rows: the residual stream after each block (embeddings first, the model's output last).
Cells: the top-1 token and its probability; colour: {esc(CAPTIONS[color_by])}, from 0 (white)
to {top:.3g} (dark). Hover a cell for the top-{result.k} tokens, the target, entropy and KL.</p>
<table>
<tr><th>layer</th>{head}</tr>
{chr(10).join(body)}
</table>
</body></html>
"""


# ---- PNG ---------------------------------------------------------------------------
def lens_png(result: LensResult, path: Path, color_by: str = "prob") -> Path:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise GPT2LabError(
            "writing a PNG needs matplotlib: pip install 'gpt2lab[plot]' (or write .html instead)"
        ) from None
    values, top = _scale(result, color_by)
    data = values.float().numpy()
    rows, cols = data.shape
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * cols), max(2.5, 0.8 + 0.45 * rows)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(data, cmap="Blues", vmin=0.0, vmax=top, aspect="auto")
    for r in range(rows):
        for c in range(cols):
            v = data[r, c]
            dark = math.isfinite(v) and v / top > 0.55
            ax.text(
                c, r, show_token(result.top_strings[r][c][0], 10), ha="center", va="center",
                fontsize=7, color="white" if dark else "black",
            )  # fmt: skip
    ax.set_xticks(range(cols), [show_token(s, 10) for s in result.strings], rotation=45, ha="right")
    ax.set_yticks(range(rows), result.labels)
    ax.set_title(f"{result.lens}: top-1 token; colour = {CAPTIONS[color_by]}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, format="png")
    return path
