"""Activation patching: which activations carry the difference between two prompts?

Run a corrupted prompt, replace one activation with its value from a clean run, and
see how far the output moves back toward the clean answer. The sites and the axes of
the result follow TransformerLens' `patching` module, so results compare one to one.
The clean activations are cached once; each patch then costs one forward pass of the
corrupted prompt, and `batch` patches can share a forward by stacking copies of the
corrupted prompt along the batch axis, each copy with its own patch.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch

from ..errors import GPT2LabError
from ..inputs import prompt_kind, single_token_id, to_batch
from ..progress import progress_bar

if TYPE_CHECKING:
    from ..model import GPT2

Metric = Callable[[torch.Tensor], Any]  # logits [batch, pos, vocab] -> scalar
Prompts = Union[str, Sequence[str], torch.Tensor]

# name -> (hook inside a block, axis layout). Layouts: "pos" is [batch, pos, ...] (one
# patch per layer x position), "head" is [batch, pos, head, ...] (per layer x head, or
# layer x pos x head), "pattern" is [batch, head, dest, src] (per layer x head, or layer
# x head x destination position).
SITES: dict[str, tuple[str, str]] = {
    "resid_pre": ("hook_resid_pre", "pos"),
    "resid_mid": ("hook_resid_mid", "pos"),
    "resid_post": ("hook_resid_post", "pos"),
    "attn_out": ("hook_attn_out", "pos"),
    "mlp_out": ("hook_mlp_out", "pos"),
    "z": ("attn.hook_z", "head"),
    "result": ("attn.hook_result", "head"),
    "q": ("attn.hook_q", "head"),
    "k": ("attn.hook_k", "head"),
    "v": ("attn.hook_v", "head"),
    "pattern": ("attn.hook_pattern", "pattern"),
}
ALIASES = {"heads": "z", "head_out": "z", "attn": "pattern"}
FIGURE_SUFFIXES = (".png", ".html")
ALL = slice(None)


def resolve_site(what: str) -> str:
    """The canonical site name for `what`, or a one-line error listing the choices."""
    name = ALIASES.get(what, what)
    if name not in SITES:
        choices = ", ".join([*SITES, *ALIASES])
        raise GPT2LabError(f"unknown activation {what!r} to patch; choose one of: {choices}")
    return name


# ---- the patching engine -------------------------------------------------------------
@dataclass(frozen=True)
class Patch:
    """Copy `source[:, *index]` into the activation at hook `name` (index after batch)."""

    name: str
    index: tuple
    source: torch.Tensor


def run_patched(
    model: GPT2,
    tokens: torch.Tensor,
    variants: Sequence[Sequence[Patch]],
    *,
    attention_mask: torch.Tensor | None = None,
    record: Sequence[str] = (),
    stop_at_layer: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass of `tokens` stacked once per variant, each copy with its own patches.

    Returns the output ([variants x batch, ...]; logits, or the residual stream with
    `stop_at_layer`) and the activations at the hooks named in `record`, taken after
    the patches. Patches of one variant apply in order, so a later one can override
    part of an earlier one.
    """
    n = tokens.shape[0]
    by_name: dict[str, list[tuple[int, Patch]]] = {}
    for i, patches in enumerate(variants):
        for patch in patches:
            by_name.setdefault(patch.name, []).append((i, patch))

    def apply(x: torch.Tensor, hook) -> torch.Tensor:
        x = x.clone()
        for i, patch in by_name[hook.name]:
            index = (slice(None), *patch.index)
            x[i * n : (i + 1) * n][index] = patch.source[index]
        return x

    recorded: dict[str, torch.Tensor] = {}

    def keep(x: torch.Tensor, hook) -> None:
        recorded[hook.name] = x.detach()

    hooks = [(name, apply) for name in by_name] + [(name, keep) for name in record]
    k = len(variants)
    mask = None if attention_mask is None else attention_mask.repeat(k, 1)
    with torch.no_grad(), model.hooks(hooks):
        out = model(tokens.repeat(k, 1), attention_mask=mask, stop_at_layer=stop_at_layer)
    return out, recorded


def chunks(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Split a stacked [variants x batch, ...] tensor back into one tensor per variant."""
    return list(x.split(n))


def scalar(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise GPT2LabError(
                f"the metric must return a scalar, got a tensor of shape {tuple(value.shape)}"
            )
        return float(value.item())
    if isinstance(value, (int, float)):
        return float(value)
    raise GPT2LabError(f"the metric must return a number, got {type(value).__name__}")


# ---- inputs --------------------------------------------------------------------------
def prepare_pair(
    model: GPT2, clean: Prompts, corrupted: Prompts, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Token tensors of a clean/corrupted pair, checked to line up position by position.

    Text is tokenized without BOS (unless the model's `default_prepend_bos` says
    otherwise; lists left-padded); tensors are taken as they are, with `attention_mask`
    (if any) applying to both.
    """

    def tokens_of(x: Prompts) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(x, torch.Tensor):
            t = x.unsqueeze(0) if x.dim() == 1 else x
            return model._check_tokens(t), attention_mask
        if prompt_kind(x) not in ("text", "texts"):
            raise GPT2LabError("prompts must be text, a list of texts or a tensor of token ids")
        batch = to_batch(
            model.tokenizer,
            x,
            prepend_bos=model.default_prepend_bos,
            padding_side="left",
            device=model.device,
        )
        return batch.tokens, batch.mask

    clean_t, clean_mask = tokens_of(clean)
    corr_t, corr_mask = tokens_of(corrupted)
    if clean_t.shape != corr_t.shape:
        if clean_t.shape[0] != corr_t.shape[0]:
            raise GPT2LabError(
                f"clean and corrupted need the same number of prompts "
                f"(clean: {clean_t.shape[0]}, corrupted: {corr_t.shape[0]})"
            )
        raise GPT2LabError(
            f"clean and corrupted prompts must have the same number of tokens "
            f"(clean: {clean_t.shape[1]}, corrupted: {corr_t.shape[1]}), so that each "
            "position means the same place in both"
        )
    same_mask = (clean_mask is None and corr_mask is None) or (
        clean_mask is not None and corr_mask is not None and torch.equal(clean_mask, corr_mask)
    )
    if not same_mask:
        raise GPT2LabError(
            "clean and corrupted prompts must have the same number of tokens, prompt by prompt"
        )
    if clean_mask is not None and clean_mask.shape != clean_t.shape:
        raise GPT2LabError(
            f"attention_mask must be {tuple(clean_t.shape)}, got {tuple(clean_mask.shape)}"
        )
    return clean_t, corr_t, clean_mask


def token_id(model: GPT2, token: str | int) -> int:
    """The id of a text that must be exactly one token (`" Mary"`, with its leading space)."""
    return single_token_id(model.tokenizer, token, model.cfg.d_vocab)


def token_ids(model: GPT2, tokens: Any, batch: int) -> torch.Tensor:
    """One answer id per prompt, from a single token or one per prompt."""
    if isinstance(tokens, torch.Tensor):
        ids = tokens.long().reshape(-1)
    elif isinstance(tokens, (str, int)):
        ids = torch.tensor([token_id(model, tokens)])
    else:
        ids = torch.tensor([token_id(model, t) for t in tokens])
    if ids.numel() == 1:
        ids = ids.expand(batch)
    if ids.numel() != batch:
        raise GPT2LabError(f"give one answer token or one per prompt ({batch}), got {ids.numel()}")
    return ids.to(model.device)


# ---- the metric ----------------------------------------------------------------------
def logit_diff(
    logits: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor, pos: int = -1
) -> torch.Tensor:
    """logit(answer) - logit(wrong) at position `pos`, averaged over the batch."""
    last = logits[:, pos]
    rows = torch.arange(last.shape[0], device=last.device)
    answer, wrong = answer.to(last.device), wrong.to(last.device)
    return (last[rows, answer] - last[rows, wrong]).mean()


class NormalizedLogitDiff:
    """(ld - ld_corrupted) / (ld_clean - ld_corrupted): 0 = corrupted run, 1 = clean run.

    Normalising makes results comparable across prompts and models: a patch that scores
    0.8 restores 80% of the logit difference the corruption removed.
    """

    def __init__(
        self,
        answer: torch.Tensor,
        wrong: torch.Tensor,
        clean: float,
        corrupted: float,
        pos: int = -1,
    ):
        if clean == corrupted:
            raise GPT2LabError(
                f"clean and corrupted prompts give the same logit difference ({clean:.4f}); "
                "the normalised metric needs them to differ"
            )
        self.answer, self.wrong, self.pos = answer, wrong, pos
        self.clean, self.corrupted = clean, corrupted

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        ld = logit_diff(logits, self.answer, self.wrong, self.pos)
        return (ld - self.corrupted) / (self.clean - self.corrupted)


def normalized_logit_diff(
    model: GPT2,
    clean: Prompts,
    corrupted: Prompts,
    answer: Any,
    wrong: Any,
    *,
    attention_mask: torch.Tensor | None = None,
    pos: int = -1,
) -> NormalizedLogitDiff:
    """The normalised logit-difference metric for a clean/corrupted pair.

    `answer` and `wrong` are single-token texts (`" Mary"`), ids, or one per prompt;
    the difference is read at position `pos` (the last, where left-padded prompts end).
    """
    clean_t, corr_t, mask = prepare_pair(model, clean, corrupted, attention_mask)
    answer_ids = token_ids(model, answer, clean_t.shape[0])
    wrong_ids = token_ids(model, wrong, clean_t.shape[0])
    # Hooked, as the patched runs are (see `GPT2.forward`): a patch that restores the
    # clean run scores exactly 1, not 1 to rounding.
    with torch.no_grad(), model.hooks():
        ld_clean = logit_diff(model(clean_t, attention_mask=mask), answer_ids, wrong_ids, pos)
        ld_corr = logit_diff(model(corr_t, attention_mask=mask), answer_ids, wrong_ids, pos)
    return NormalizedLogitDiff(answer_ids, wrong_ids, float(ld_clean), float(ld_corr), pos)


# ---- results -------------------------------------------------------------------------
@dataclass
class PatchResult:
    """A metric value per patch, with the name and labels of each axis."""

    values: torch.Tensor
    dims: tuple[str, ...]
    labels: dict[str, list[str]]
    what: str
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def matrix(self) -> tuple[torch.Tensor, list[str], list[str]]:
        """The values as a 2-D table: columns along the position axis if there is one
        (else the last axis), one row per combination of the other axes."""
        col = next((i for i, d in enumerate(self.dims) if d in ("pos", "dest_pos")), None)
        if col is None:
            col = len(self.dims) - 1 if len(self.dims) > 1 else None
        if col is None:  # one axis (layer): one column
            rows = [f"{self.dims[0]} {label}" for label in self.labels[self.dims[0]]]
            return self.values.reshape(-1, 1), rows, ["all positions"]
        others = [i for i in range(len(self.dims)) if i != col]
        values = self.values.permute(*others, col).reshape(-1, self.values.shape[col])
        rows = [""]
        for i in others:
            short = {"layer": "L", "head": "H"}.get(self.dims[i], self.dims[i] + " ")
            rows = [
                f"{r}{'.' if r else ''}{short}{lab}"
                for r in rows
                for lab in self.labels[self.dims[i]]
            ]
        return values, rows, list(self.labels[self.dims[col]])

    def to_text(self, digits: int = 2) -> str:
        values, rows, cols = self.matrix()
        cols = [c if len(c) <= 14 else c[:13] + "~" for c in cols]
        widths = [max(digits + 4, len(c)) for c in cols]
        first = max(len(r) for r in rows)
        lines = self.note.splitlines()
        lines.append(
            " " * first + "".join(f"  {c:>{w}}" for c, w in zip(cols, widths, strict=True))
        )
        for label, row in zip(rows, values.tolist(), strict=True):
            # round first so that -0.0000001 prints as 0.00, not -0.00
            cells = (
                f"  {round(v, digits) + 0.0:>{w}.{digits}f}"
                for v, w in zip(row, widths, strict=True)
            )
            lines.append(f"{label:<{first}}{''.join(cells)}")
        return "\n".join(lines)

    def to_html(self) -> str:
        """A self-contained HTML table, each cell shaded by its value (blue +, red -)."""
        values, rows, cols = self.matrix()
        scale = max(float(values.abs().max()), 1e-12)
        cell = "padding:2px 6px;text-align:right;font:12px monospace"
        caption = "<br>".join(html.escape(line) for line in (self.note or self.what).splitlines())
        out = [f"<table style='border-collapse:collapse'><caption>{caption}</caption>"]
        out.append(
            "<tr><th></th>"
            + "".join(f"<th style='{cell}'>{html.escape(c)}</th>" for c in cols)
            + "</tr>"
        )
        for label, row in zip(rows, values.tolist(), strict=True):
            tds = []
            for v in row:
                alpha = min(abs(v) / scale, 1.0)
                rgb = "33,102,172" if v >= 0 else "178,24,43"
                tds.append(f"<td style='{cell};background:rgba({rgb},{alpha:.3f})'>{v:.3f}</td>")
            out.append(f"<tr><th style='{cell}'>{html.escape(label)}</th>{''.join(tds)}</tr>")
        out.append("</table>")
        return "\n".join(out)

    def save(self, path: str | Path) -> Path:
        """Write the figure: `.html` (always available) or `.png` (needs matplotlib)."""
        path = check_figure_path(path)
        if path.suffix.lower() == ".html":
            body = f"<!doctype html><meta charset='utf-8'><title>{html.escape(self.what)}</title>\n"
            path.write_text(body + self.to_html() + "\n", encoding="utf-8")
            return path
        from matplotlib.figure import Figure

        values, rows, cols = self.matrix()
        scale = max(float(values.abs().max()), 1e-12)
        fig = Figure(figsize=(1.5 + 0.5 * len(cols), 1.2 + 0.3 * len(rows)))
        ax = fig.subplots()
        image = ax.imshow(values.numpy(), cmap="RdBu", vmin=-scale, vmax=scale, aspect="auto")
        ax.set_xticks(range(len(cols)), labels=cols, rotation=90)
        ax.set_yticks(range(len(rows)), labels=rows)
        ax.set_title(self.note or self.what, fontsize=8)
        fig.colorbar(image, ax=ax)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        return path


def check_figure_path(path: str | Path) -> Path:
    """Fail early (before any model runs) on a figure file we cannot write."""
    path = Path(path)
    if path.suffix.lower() not in FIGURE_SUFFIXES:
        raise GPT2LabError(f"figure file must end in .png or .html, got {path.name!r}")
    if path.suffix.lower() == ".png":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise GPT2LabError(
                "writing a .png needs matplotlib: pip install 'gpt2lab[plot]' (or write .html)"
            ) from None
    if not path.parent.exists():
        raise GPT2LabError(f"folder {path.parent} does not exist")
    return path


def position_labels(model: GPT2, clean: torch.Tensor, corrupted: torch.Tensor) -> list[str]:
    """`pos 'token'` per column of the first clean prompt, starred where corrupted differs."""
    decode = model.tokenizer.decode
    pairs = zip(clean[0].tolist(), corrupted[0].tolist(), strict=True)
    return [f"{p} {decode([a])!r}{'' if a == b else '*'}" for p, (a, b) in enumerate(pairs)]


def differences(model: GPT2, clean: torch.Tensor, corrupted: torch.Tensor) -> str:
    """A line naming the positions where the first clean and corrupted prompts differ."""
    decode = model.tokenizer.decode
    pairs = enumerate(zip(clean[0].tolist(), corrupted[0].tolist(), strict=True))
    diffs = [f"{p} {decode([a])!r} -> {decode([b])!r}" for p, (a, b) in pairs if a != b]
    return "* corrupted differs at " + ", ".join(diffs) if diffs else "prompts are identical"


# ---- the sweep -----------------------------------------------------------------------
def patch_indices(
    layout: str, by_pos: bool, n_layers: int, n_pos: int, n_heads: int
) -> tuple[tuple[str, ...], list[tuple[tuple[int, ...], int, tuple]]]:
    """The result's axes and, per patch, (result index, layer, activation index)."""
    layers, positions, heads = range(n_layers), range(n_pos), range(n_heads)
    if layout == "pos":  # [batch, pos, d]
        if not by_pos:
            return ("layer",), [((layer,), layer, ()) for layer in layers]
        grid = product(layers, positions)
        return ("layer", "pos"), [((layer, p), layer, (p,)) for layer, p in grid]
    if layout == "head":  # [batch, pos, head, d]
        if not by_pos:
            grid = product(layers, heads)
            return ("layer", "head"), [((layer, h), layer, (ALL, h)) for layer, h in grid]
        grid = product(layers, positions, heads)
        return ("layer", "pos", "head"), [((layer, p, h), layer, (p, h)) for layer, p, h in grid]
    if not by_pos:  # pattern [batch, head, dest, src]
        grid = product(layers, heads)
        return ("layer", "head"), [((layer, h), layer, (h,)) for layer, h in grid]
    grid = product(layers, heads, positions)
    return ("layer", "head", "dest_pos"), [((layer, h, p), layer, (h, p)) for layer, h, p in grid]


def activation_patch(
    model: GPT2,
    clean: Prompts,
    corrupted: Prompts,
    metric: Metric,
    *,
    what: str = "resid_pre",
    by_pos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
    batch: int = 1,
    progress: bool | None = None,
) -> PatchResult:
    """Patch clean activations into the corrupted run, one site at a time; score each.

    `what` picks the activation (see SITES: resid_pre / resid_mid / resid_post /
    attn_out / mlp_out per layer x position; z (head output, alias "heads"), result,
    q, k, v per layer x head; pattern per layer x head). `by_pos` splits the patches by
    position too (default: True for the residual-stream sites, False for heads);
    `by_pos=False` on a residual site patches all positions of a layer at once. The
    result has TransformerLens' axes: [layer, pos], [layer], [layer, head], [layer,
    pos, head], and [layer, head, dest_pos] for patterns by position. `batch` patches
    share one forward pass.

    Progress: by default (`progress=None`) a bar when stderr is a terminal; True also
    writes periodic lines to a log (the CLI); False nothing.
    """
    site = resolve_site(what)
    hook, layout = SITES[site]
    if by_pos is None:
        by_pos = layout == "pos"
    if batch < 1:
        raise GPT2LabError(f"batch must be at least 1, got {batch}")
    clean_t, corr_t, mask = prepare_pair(model, clean, corrupted, attention_mask)
    cfg = model.cfg
    names = [f"blocks.{layer}.{hook}" for layer in range(cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(clean_t, attention_mask=mask, names_filter=names)

    dims, plan = patch_indices(layout, by_pos, cfg.n_layers, clean_t.shape[1], cfg.n_heads)
    sizes = {
        "layer": cfg.n_layers,
        "pos": clean_t.shape[1],
        "dest_pos": clean_t.shape[1],
        "head": cfg.n_heads,
    }
    values = torch.zeros([sizes[d] for d in dims])
    n = clean_t.shape[0]
    with progress_bar(len(plan), f"patching {site}", progress, unit="patches") as advance:
        for start in range(0, len(plan), batch):
            group = plan[start : start + batch]
            variants = [
                [Patch(names[layer], index, cache[names[layer]])] for _, layer, index in group
            ]
            logits, _ = run_patched(model, corr_t, variants, attention_mask=mask)
            for (out_index, _, _), chunk in zip(group, chunks(logits, n), strict=True):
                values[out_index] = scalar(metric(chunk))
            advance(len(group))

    pos_labels = position_labels(model, clean_t, corr_t)
    labels = {
        "layer": [str(i) for i in range(cfg.n_layers)],
        "pos": pos_labels,
        "dest_pos": pos_labels,
        "head": [str(i) for i in range(cfg.n_heads)],
    }
    note = f"{site} patching" + ("; " + differences(model, clean_t, corr_t) if by_pos else "")
    return PatchResult(values, dims, {d: labels[d] for d in dims}, site, note)


def patch_prompts(
    model: GPT2,
    clean: str,
    corrupted: str,
    answer: str | int,
    wrong: str | int,
    *,
    what: str = "resid_pre",
    batch: int = 1,
    progress: bool | None = None,
) -> PatchResult:
    """Activation patching of a text pair scored by the normalised logit difference
    answer - wrong at the last position (what `gpt2lab patch` prints)."""
    site = resolve_site(what)
    metric = normalized_logit_diff(model, clean, corrupted, answer, wrong)
    result = activation_patch(
        model, clean, corrupted, metric, what=site, batch=batch, progress=progress
    )
    result.note = (
        f"{site}: normalised logit difference {answer!r} - {wrong!r} "
        f"(0 = corrupted {metric.corrupted:.3f}, 1 = clean {metric.clean:.3f})\n"
        + result.note.partition("; ")[2]
    ).strip()
    result.extra.update(clean_logit_diff=metric.clean, corrupted_logit_diff=metric.corrupted)
    return result
