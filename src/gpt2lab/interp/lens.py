"""The logit lens: read the residual stream after every block as if it were the last.

GPT-2 only ever decodes its final residual stream (final LayerNorm, then the
unembedding). The logit lens (nostalgebraist, 2020) applies that same decoder to the
residual stream before every block, to see what the model "would say" if it stopped
there. The LayerNorm uses the live scale of the residual being decoded, not the final
layer's cached scale: each layer is read as its own final layer.

Row i of every result is the residual stream after i blocks: row 0 is the embeddings
(`blocks.0.hook_resid_pre`), row n_layers the final `hook_resid_post`, whose lens *is*
the model's output. The tuned lens (tuned_lens.py) reuses all of this with a learned
affine map applied to the residual first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import GPT2LabError
from ..inputs import prompt_kind, single_token_id, to_batch
from ..kernels.linear import linear
from ..validate import is_int

if TYPE_CHECKING:
    from ..model import GPT2
    from .lens_plots import HTMLPage, LensTable

# translate(resid [..., d_model], row) -> resid: what a lens does before decoding
Translate = Callable[[torch.Tensor, int], torch.Tensor]
COLOR_BY = ("prob", "target", "entropy", "kl")


def residual_names(model: GPT2) -> list[str]:
    """Hook names of the n_layers + 1 residual streams a lens reads, shallowest first."""
    L = model.cfg.n_layers
    return [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]


def layer_labels(model: GPT2) -> list[str]:
    """Row labels: "embed", then the block whose output each row reads."""
    return ["embed"] + [f"block {i}" for i in range(model.cfg.n_layers)]


def residual_stack(model: GPT2, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: (residual streams [n_layers + 1, batch, pos, d_model], logits)."""
    names = residual_names(model)
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    return torch.stack([cache[n] for n in names]), logits


def final_norm(model: GPT2, resid: torch.Tensor) -> torch.Tensor:
    """The final LayerNorm applied with `resid`'s own scale (not the output's)."""
    ln = model.ln_final
    if ln.fixed_scale is None:
        return F.layer_norm(resid, resid.shape[-1:], ln.weight, ln.bias, ln.eps)
    # a LayerNorm-free model: centre, divide by the constant, affine
    return (resid - resid.mean(-1, keepdim=True)) / ln.fixed_scale * ln.weight + ln.bias


def unembedding(model: GPT2) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unembedding weight [d_vocab, d_model] (tied to `wte` unless processing
    untied it) and its bias, if any."""
    weight = model.wte.weight if model.unembed.weight is None else model.unembed.weight
    return weight, model.unembed.bias


def unembed_residual(model: GPT2, resid: torch.Tensor) -> torch.Tensor:
    """Logits the model would output if `resid` were its final residual stream.

    This calls no hook points (a user's hook on `ln_final` or `unembed` must not fire
    for lens rows), so it repeats the two operations rather than calling the modules.
    """
    weight, bias = unembedding(model)
    return linear(final_norm(model, resid).to(weight.dtype), weight, bias)  # the model's kernel


def kl_to_final(final_logp: torch.Tensor, lens_logp: torch.Tensor) -> torch.Tensor:
    """KL(final || lens) in nats over the last axis, from log-probabilities."""
    return (final_logp.exp() * (final_logp - lens_logp)).sum(-1)


@dataclass
class LensResult:
    """What a lens reads at every (row, position) of one prompt.

    Rows are `labels` (n_layers + 1: the embeddings, then each block's output); the
    last row is the model's own prediction. Probabilities, entropy and KL are in
    float32 and nats. `target_*` refer to `target_ids` (the actual next token by
    default; -1 where there is none, with probability NaN and rank 0 there).
    """

    lens: str  # "logit lens" or "tuned lens"
    labels: list[str]  # [rows]
    tokens: torch.Tensor  # [pos] input ids
    strings: list[str]  # [pos] input tokens as text
    top_ids: torch.Tensor  # [rows, pos, k]
    top_probs: torch.Tensor  # [rows, pos, k]
    top_strings: list[list[list[str]]]  # [rows][pos][k]
    target: str | None  # the token asked for, or None for "the next token"
    target_ids: torch.Tensor  # [pos]
    target_strings: list[str]  # [pos], "" where there is no target
    target_probs: torch.Tensor  # [rows, pos]
    target_ranks: torch.Tensor  # [rows, pos], 1 = the most likely token
    entropy: torch.Tensor  # [rows, pos]
    kl: torch.Tensor  # [rows, pos], KL(model output || this row)
    logprobs: torch.Tensor | None = None  # [rows, pos, vocab] with keep_logprobs=True

    @property
    def k(self) -> int:
        return self.top_ids.shape[-1]

    def values(self, color_by: str = "prob") -> torch.Tensor:
        """The [rows, pos] statistic a heat map shows: top-1 probability, the target's
        probability, entropy or KL to the output."""
        if color_by == "prob":
            return self.top_probs[..., 0]
        if color_by == "target":
            return self.target_probs
        if color_by == "entropy":
            return self.entropy
        if color_by == "kl":
            return self.kl
        raise GPT2LabError(f"color_by must be one of {', '.join(COLOR_BY)}; got {color_by!r}")

    def table(self, k: int = 1) -> LensTable:
        """Layers (rows) x positions, each cell the top-k tokens and probabilities, as a
        rich renderable that pages over positions to fit the console it is printed on
        (`rich.print(result.table())`); `.pages(width)` gives the rich Tables."""
        from .lens_plots import lens_table

        return lens_table(self, k)

    def to_html(self, path: str | Path | None = None, color_by: str = "prob") -> HTMLPage | Path:
        """A self-contained HTML heat map (no scripts, no external files). Hovering a
        cell shows the top-k tokens and the target.

        With `path`, writes the page there and returns the path. Without, returns the
        page as an `HTMLPage`: a `str` whose repr is one line (not the whole page into a
        REPL), shown as the heat map in a notebook, with `.html` and `.save(path)`."""
        from .lens_plots import HTMLPage, lens_html

        rows, pos, _ = self.top_ids.shape
        page = HTMLPage(
            lens_html(self, color_by),
            summary=f"HTML heat map of the {self.lens} ({rows} rows x {pos} positions)",
            height=min(900, 160 + 40 * rows),
        )
        return page if path is None else page.save(path)

    def plot(self, path: str | Path, color_by: str = "prob") -> Path:
        """A PNG heat map (needs matplotlib: `pip install 'gpt2lab[plot]'`)."""
        from .lens_plots import lens_png

        return lens_png(self, Path(path), color_by)

    def __repr__(self) -> str:
        rows, pos, k = self.top_ids.shape
        return f"LensResult({self.lens}: {rows} rows x {pos} positions, top-{k})"


# ---- inputs ------------------------------------------------------------------------
def prompt_tokens(model: GPT2, prompt: Any, prepend_bos: bool = False) -> torch.Tensor:
    """A prompt (text, a list of ids, or a [pos] / [1, pos] tensor) as a [pos] tensor;
    `prepend_bos` puts `<|endoftext|>` before text and ids alike."""
    kind = prompt_kind(prompt)
    if isinstance(prompt, str):
        if not prompt:
            raise GPT2LabError("the prompt is empty: give some text to look at")
    elif isinstance(prompt, (list, tuple)):
        if kind != "ids" and prompt:
            raise GPT2LabError("a prompt given as a list must hold integer token ids")
    elif isinstance(prompt, torch.Tensor):
        rows = prompt.shape[0] if prompt.dim() == 2 else 1
        if prompt.dim() not in (1, 2) or rows != 1:
            raise GPT2LabError(
                f"a lens reads one prompt: give [pos] or [1, pos], got {tuple(prompt.shape)}"
            )
        prompt = prompt.long()
    else:
        raise GPT2LabError(f"the prompt must be text or token ids, got {type(prompt).__name__}")
    if kind is None:  # an empty list or tensor
        ids = torch.tensor([model.tokenizer.eot_token] if prepend_bos else [], dtype=torch.long)
    else:
        batch = to_batch(model.tokenizer, prompt, prepend_bos=prepend_bos, bos_on_ids=True)
        ids = batch.tokens[0].cpu()
    if ids.numel() == 0:
        raise GPT2LabError("the prompt is empty: give at least one token")
    if int(ids.min()) < 0 or int(ids.max()) >= model.cfg.d_vocab:
        raise GPT2LabError(f"token ids must be in [0, {model.cfg.d_vocab})")
    if ids.numel() > model.cfg.n_ctx:
        raise GPT2LabError(
            f"the prompt has {ids.numel()} tokens, more than the context ({model.cfg.n_ctx})"
        )
    return ids.to(model.device)


def target_ids(model: GPT2, tokens: torch.Tensor, target: Any) -> torch.Tensor:
    """[pos] ids of the token to follow at each position: the next input token by
    default (-1 at the last position), or one given token (text or id) everywhere."""
    if target is None:
        return torch.cat([tokens[1:], tokens.new_tensor([-1])])
    if not isinstance(target, str) and not is_int(target):
        raise GPT2LabError(f"target must be a token (text or id), got {type(target).__name__}")
    target = single_token_id(model.tokenizer, target, model.cfg.d_vocab, what="target")
    return torch.full_like(tokens, target)


# ---- the lens ----------------------------------------------------------------------
def run_lens(
    model: GPT2,
    prompt: Any,
    translate: Translate | None = None,
    *,
    target: Any = None,
    k: int = 5,
    prepend_bos: bool = False,
    keep_logprobs: bool = False,
    name: str = "logit lens",
) -> LensResult:
    """Decode every row of the residual stream of one prompt, after `translate` if given.

    Rows are decoded one at a time, so memory holds one [pos, vocab] block at once
    (plus all of them with `keep_logprobs`).
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= model.cfg.d_vocab:
        raise GPT2LabError(f"k must be an integer from 1 to {model.cfg.d_vocab}, got {k!r}")
    tokens = prompt_tokens(model, prompt, prepend_bos)
    targets = target_ids(model, tokens, target)
    has_target = targets >= 0
    rows = model.cfg.n_layers + 1
    tops, top_p, tgt_p, tgt_rank, ent, kls, kept = [], [], [], [], [], [], []
    with torch.no_grad():
        resid, logits = residual_stack(model, tokens[None])
        final = logits[0].float().log_softmax(-1)
        for row in range(rows):
            h = resid[row, 0] if translate is None else translate(resid[row, 0], row)
            logp = unembed_residual(model, h).float().log_softmax(-1)  # [pos, vocab]
            p, ids = logp.topk(k, dim=-1)
            tops.append(ids)
            top_p.append(p.exp())
            t = logp.gather(-1, targets.clamp(min=0)[:, None])  # [pos, 1]
            tgt_p.append(torch.where(has_target, t[:, 0].exp(), torch.nan))
            tgt_rank.append(torch.where(has_target, (logp > t).sum(-1) + 1, 0))
            ent.append(-(logp.exp() * logp).sum(-1))
            kls.append(kl_to_final(final, logp).clamp(min=0))
            if keep_logprobs:
                kept.append(logp)
    tok = model.tokenizer
    top_ids = torch.stack(tops).cpu()
    decoded = {i: tok.id_to_str(i) for i in top_ids.unique().tolist()}
    return LensResult(
        lens=name,
        labels=layer_labels(model),
        tokens=tokens.cpu(),
        strings=[tok.id_to_str(i) for i in tokens.tolist()],
        top_ids=top_ids,
        top_probs=torch.stack(top_p).cpu(),
        top_strings=[[[decoded[i] for i in cell] for cell in row] for row in top_ids.tolist()],
        target=None if target is None else tok.id_to_str(int(targets[0])),
        target_ids=targets.cpu(),
        target_strings=[tok.id_to_str(i) if i >= 0 else "" for i in targets.tolist()],
        target_probs=torch.stack(tgt_p).cpu(),
        target_ranks=torch.stack(tgt_rank).cpu(),
        entropy=torch.stack(ent).cpu(),
        kl=torch.stack(kls).cpu(),
        logprobs=torch.stack(kept).cpu() if keep_logprobs else None,
    )


def logit_lens(
    model: GPT2,
    prompt: Any,
    *,
    target: Any = None,
    k: int = 5,
    prepend_bos: bool = False,
    keep_logprobs: bool = False,
) -> LensResult:
    """The logit lens over one prompt (text or ids): for every row (embeddings, each
    block's output) and position, the top-k tokens, the target's probability and rank
    (the actual next token unless `target` names one), entropy and KL to the output.

    `keep_logprobs=True` also keeps the full log-probabilities [rows, pos, vocab].
    """
    return run_lens(
        model, prompt, None, target=target, k=k, prepend_bos=prepend_bos,
        keep_logprobs=keep_logprobs, name="logit lens",
    )  # fmt: skip


def lens_kl(
    model: GPT2,
    data: Any,
    translate: Translate | None = None,
    *,
    max_tokens: int = 16384,
    seq_len: int = 128,
    batch_size: int = 8,
    progress: bool | None = None,
    label: str | None = None,
) -> torch.Tensor:
    """Mean KL(model output || lens) per row [n_layers + 1], in nats, over a corpus.

    `data` is a token tensor ([n] or [batch, pos]), a text file, or a folder of token
    shards (its val split). The first `max_tokens` tokens are cut into consecutive
    windows of `seq_len`: the same tokens every call, so two lenses compare fairly.

    This runs the model over every window (minutes on a CPU for the defaults), so by
    default (`progress=None`) a progress bar shows when stderr is a terminal;
    `progress=True` also writes periodic lines when it is not (a log), False nothing.
    `label` names the job in that progress ("logit lens KL" / "lens KL" by default).
    """
    from ..progress import progress_bar
    from .lens_data import eval_windows

    windows = eval_windows(model, data, seq_len, max_tokens)
    total = torch.zeros(model.cfg.n_layers + 1, dtype=torch.float64)
    count = 0
    if label is None:
        label = "logit lens KL" if translate is None else "lens KL"
    bar = progress_bar(len(windows), label, progress, unit="windows")
    with bar as advance, torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size].to(model.device)
            resid, logits = residual_stack(model, batch)
            final = logits.float().log_softmax(-1)
            for row in range(total.shape[0]):
                h = resid[row] if translate is None else translate(resid[row], row)
                logp = unembed_residual(model, h).float().log_softmax(-1)
                total[row] += kl_to_final(final, logp).sum().double().cpu()
            count += batch.numel()
            advance(batch.shape[0])
    return (total / count).float()
