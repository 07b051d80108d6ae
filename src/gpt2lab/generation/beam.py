"""Beam search and diverse (group) beam search, step for step as transformers does them.

Beam search keeps `num_beams` running hypotheses per prompt. At every step each beam's
next-token log-probabilities (log_softmax of the logits, then the logits processors)
are added to the beam's running sum; the best `2 * num_beams` (beam, token) pairs over
all beams are the candidates. A candidate that ends (EOS, or max_new_tokens reached)
and ranks among the first `num_beams` becomes a finished hypothesis scored
`sum_logprobs / new_tokens ** length_penalty` (new_tokens counts the generated tokens,
EOS included, not the prompt); the best `num_beams` candidates that did not end run
on. A prompt is done when `early_stopping=True` and it has `num_beams` finished
hypotheses, or (False / "never") when no running beam can still beat the worst
finished one; done prompts are carried along unchanged until all are done. The result
per prompt is its best finished hypotheses, best first.

The KV cache holds batch * num_beams rows: the prompt is prefilled once per prompt,
copied to its beams, and each step the rows are reordered to follow the surviving
beams. `num_beam_groups > 1` runs diverse beam search (Vijayakumar et al., 2016): the
beams form groups that choose in turn within a step, a group's scores lowered by
`diversity_penalty` for each time an earlier group chose the same token this step.

Plain beam search follows transformers 5's `GenerationMixin._beam_search`; group beam
search follows transformers 4's `_group_beam_search` + `BeamSearchScorer` (transformers
5 moved it to the Hub, transformers-community/group-beam-search, with the same code).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import GPT2LabError
from ..validate import integer, number, show
from .generate import check_decoding_memory, check_finite, end_ids

if TYPE_CHECKING:
    from ..model import GPT2

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Hypotheses = list[list[tuple[list[int], float]]]

NEG = -1.0e9  # transformers' stand-in for "impossible": keeps arithmetic finite


@torch.inference_mode()
def beam_search(
    model: GPT2,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_token_id: int | Iterable[int] | None = 50256,
    pad_token_id: int | None = None,
    num_beam_groups: int = 1,
    diversity_penalty: float = 0.0,
    logits_processor: LogitsProcessor | None = None,
) -> Hypotheses:
    """Beam search from left-padded prompts `tokens` [batch, pos] (mask: 1 = token).

    Returns, per prompt, `num_return_sequences` pairs (new token ids, score), best
    first. The ids are the generated tokens only, ending with the EOS token when the
    hypothesis finished on one. `logits_processor(input_ids, scores)` is applied to the
    log-probabilities (as transformers does in beam search); `input_ids` are the prompt
    (padding included) plus the tokens so far, one row per beam. `pad_token_id` (default:
    the first EOS id) is the token a finished group "chooses" in group beam search.
    """
    plan = plan_beam_search(
        model, tokens, num_beams=num_beams, max_new_tokens=max_new_tokens,
        length_penalty=length_penalty, early_stopping=early_stopping,
        num_return_sequences=num_return_sequences, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, num_beam_groups=num_beam_groups,
        diversity_penalty=diversity_penalty,
    )  # fmt: skip
    return run_beam_search(model, plan, attention_mask, logits_processor)


@dataclass(frozen=True)
class BeamPlan:
    """beam_search's arguments, checked (see plan_beam_search)."""

    tokens: torch.Tensor
    num_beams: int
    max_new_tokens: int
    length_penalty: float
    early_stopping: bool | str
    num_return_sequences: int
    eos: list[int]
    pad: int
    num_beam_groups: int
    diversity_penalty: float


def plan_beam_search(
    model: GPT2,
    tokens: torch.Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_token_id: int | Iterable[int] | None = 50256,
    pad_token_id: int | None = None,
    num_beam_groups: int = 1,
    diversity_penalty: float = 0.0,
) -> BeamPlan:
    """Check beam_search's arguments, and that the search fits in memory, before anything
    is allocated. Split from the search so that generate() can check a request first,
    then build its per-beam logits processors (whose size grows with num_beams), then
    run the search without checking again."""
    tokens = model._check_tokens(tokens)
    B, T = tokens.shape
    integer("num_beams", num_beams, 1)
    integer("max_new_tokens", max_new_tokens, 1)
    integer("num_beam_groups", num_beam_groups, 1)
    integer("num_return_sequences", num_return_sequences, 1)
    if num_return_sequences > num_beams:
        raise GPT2LabError(
            f"num_return_sequences ({num_return_sequences}) cannot exceed num_beams "
            f"({num_beams}): beam search only keeps num_beams hypotheses"
        )
    if not (isinstance(early_stopping, bool) or _is_never(early_stopping)):
        raise GPT2LabError(
            f"early_stopping must be True, False or 'never', got {show(early_stopping)}"
        )
    length_penalty = number("length_penalty", length_penalty)
    diversity_penalty = number("diversity_penalty", diversity_penalty)
    if num_beams % num_beam_groups:
        raise GPT2LabError(
            f"num_beams ({num_beams}) must be divisible by num_beam_groups ({num_beam_groups})"
        )
    if num_beam_groups > 1 and not diversity_penalty > 0:
        raise GPT2LabError(
            "num_beam_groups > 1 needs diversity_penalty > 0, otherwise all groups are identical"
        )
    if T + max_new_tokens > model.cfg.n_ctx:
        raise GPT2LabError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
            f"{model.cfg.n_ctx}"
        )
    eos = end_ids(model, "eos_token_id", eos_token_id)
    if pad_token_id is not None:
        integer("pad_token_id", pad_token_id, 0, model.cfg.d_vocab - 1)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    check_decoding_memory(
        model, f"beam search with {num_beams} beams x {B} prompts x {T + max_new_tokens} "
        "positions", B * num_beams, T + max_new_tokens, copies=2,
    )  # fmt: skip
    return BeamPlan(
        tokens, int(num_beams), int(max_new_tokens), float(length_penalty), early_stopping,
        int(num_return_sequences), eos, int(pad), int(num_beam_groups), float(diversity_penalty),
    )  # fmt: skip


@torch.inference_mode()
def run_beam_search(
    model: GPT2,
    plan: BeamPlan,
    attention_mask: torch.Tensor | None = None,
    logits_processor: LogitsProcessor | None = None,
) -> Hypotheses:
    """The search itself, for arguments checked by plan_beam_search."""
    tokens, num_beams, max_new_tokens = plan.tokens, plan.num_beams, plan.max_new_tokens
    B, T = tokens.shape
    options = dict(
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        length_penalty=plan.length_penalty,
        early_stopping=plan.early_stopping,
        eos=plan.eos,
        pad=plan.pad,
        processor=logits_processor,
    )
    if plan.num_beam_groups == 1:
        search: _BeamSearch | _GroupBeamSearch = _BeamSearch(tokens, **options)
    else:
        search = _GroupBeamSearch(
            tokens, groups=plan.num_beam_groups, diversity_penalty=plan.diversity_penalty,
            **options,
        )  # fmt: skip

    # Prefill each prompt once, then give every beam a copy of its prompt's cache rows.
    cache = model.new_cache(B, T + max_new_tokens)
    logits = model(tokens, attention_mask=attention_mask, cache=cache, logits_to_keep=1)[:, -1]
    check_finite(logits)
    to_beams = torch.arange(B, device=tokens.device).repeat_interleave(num_beams)
    cache.reorder(to_beams)
    logits = logits[to_beams]
    for _ in range(max_new_tokens):
        source_rows, next_tokens = search.step(torch.log_softmax(logits.float(), dim=-1))
        if search.finished:
            break
        cache.reorder(source_rows)  # each cache row now follows the beam it continues
        logits = model(next_tokens[:, None], cache=cache)[:, -1]
    return search.results(plan.num_return_sequences)


def _is_never(early_stopping) -> bool:
    return isinstance(early_stopping, str) and early_stopping == "never"


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, k], ...] for x [batch, n, ...] and index [batch, k]."""
    while index.dim() < x.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(x, index, dim=1)


class _BeamSearch:
    """Plain beam search on [batch, beam] tensors (transformers 5's `_beam_search`)."""

    def __init__(
        self, tokens, *, num_beams, max_new_tokens, length_penalty, early_stopping, eos, pad,
        processor,
    ):  # fmt: skip
        B, T = tokens.shape
        dev = tokens.device
        self.B, self.T, self.n = B, T, num_beams
        self.cur_len, self.max_len = T, T + max_new_tokens
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        self.processor = processor
        self.eos = torch.tensor(eos, dtype=torch.long, device=dev)
        # Candidates per step: enough that num_beams survive even if the rest end in EOS.
        self.k = max(2, 1 + len(eos)) * num_beams
        self.top_n = torch.arange(self.k, device=dev) < num_beams  # may become finished
        # running beams: tokens, summed log-probs (only beam 0 is live at the start)
        self.seq = torch.full((B, num_beams, self.max_len), pad, dtype=torch.long, device=dev)
        self.seq[:, :, :T] = tokens[:, None]
        self.scores = torch.zeros(B, num_beams, device=dev)
        self.scores[:, 1:] = NEG
        # finished hypotheses: tokens, length-penalised scores, new-token counts, filled
        self.best_seq = self.seq.clone()
        self.best_scores = torch.full((B, num_beams), NEG, device=dev)
        self.best_len = torch.zeros(B, num_beams, dtype=torch.long, device=dev)
        self.best_filled = torch.zeros(B, num_beams, dtype=torch.bool, device=dev)
        self.improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)  # row not done yet
        self.finished = False

    def step(self, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Extend the beams by one token; return (source row of each beam, its new token)."""
        B, n, T, cur = self.B, self.n, self.T, self.cur_len
        if self.processor is not None:
            logprobs = self.processor(self.seq.reshape(B * n, -1)[:, :cur], logprobs)
        V = logprobs.shape[-1]
        total = (logprobs.view(B, n, V) + self.scores[:, :, None]).view(B, n * V)
        cand_scores, cand = torch.topk(total, self.k)
        cand_beam, cand_token = cand // V, cand % V
        cand_seq = _gather(self.seq, cand_beam)
        cand_seq[:, :, cur] = cand_token
        ends = torch.isin(cand_token, self.eos) | (cur + 1 >= self.max_len)

        # The best num_beams candidates that did not end run on.
        live = cand_scores + ends.to(torch.float32) * NEG
        keep = torch.topk(live, n)[1]
        self.seq, self.scores = _gather(cand_seq, keep), _gather(live, keep)
        offset = torch.arange(B, device=cand.device)[:, None] * n
        source = (_gather(cand_beam, keep) + offset).view(-1)

        # Top-num_beams candidates that ended join the finished hypotheses, unless the row
        # is done; each row keeps its best num_beams, sorted.
        new = ends & self.top_n[None, :]
        scored = cand_scores / ((cur + 1 - T) ** self.length_penalty)
        full = torch.all(self.best_filled, dim=-1, keepdim=True) & (self.early_stopping is True)
        scored += full.to(torch.float32) * NEG
        scored += (~self.improvable).to(torch.float32) * NEG
        scored += (~new) * NEG
        merged_len = torch.full_like(cand, cur + 1 - T)
        best = torch.topk(torch.cat([self.best_scores, scored], dim=1), n)[1]
        self.best_seq = _gather(torch.cat([self.best_seq, cand_seq], dim=1), best)
        self.best_scores = _gather(torch.cat([self.best_scores, scored], dim=1), best)
        self.best_len = _gather(torch.cat([self.best_len, merged_len], dim=1), best)
        self.best_filled = _gather(torch.cat([self.best_filled, new], dim=1), best)

        self.cur_len = cur = cur + 1
        # Could the best running beam still beat the worst finished hypothesis? transformers'
        # heuristic: assume it ends now ("never" with length_penalty > 0: at max length).
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_len = self.max_len - T
        else:
            best_len = cur - T
        best_possible = self.scores[:, :1] / (best_len**self.length_penalty)
        worst = torch.where(
            self.best_filled, torch.min(self.best_scores, dim=1, keepdim=True)[0], NEG
        )
        self.improvable &= torch.any(best_possible > worst, dim=-1, keepdim=True)
        all_full = bool(torch.all(self.best_filled)) and self.early_stopping is True
        self.finished = not bool(self.improvable.any()) or all_full or bool(ends.all())
        return source, self.seq[:, :, cur - 1].reshape(-1)

    def results(self, count: int) -> Hypotheses:
        out = []
        for b in range(self.B):
            row = []
            for j in range(count):
                n_new = int(self.best_len[b, j])
                ids = self.best_seq[b, j, self.T : self.T + n_new].tolist()
                row.append((ids, float(self.best_scores[b, j])))
            out.append(row)
        return out


class _Finished:
    """The best finished hypotheses of one (prompt, group): transformers' BeamHypotheses."""

    def __init__(self, size: int, length_penalty: float, early_stopping, max_new_tokens: int):
        self.size, self.length_penalty = size, length_penalty
        self.early_stopping, self.max_new_tokens = early_stopping, max_new_tokens
        self.beams: list[tuple[float, list[int]]] = []
        self.worst = 1e9

    def add(self, ids: list[int], sum_logprobs: float, n_new: int) -> None:
        score = sum_logprobs / (n_new**self.length_penalty)
        if len(self.beams) < self.size or score > self.worst:
            self.beams.append((score, ids))
            if len(self.beams) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, n_new: int) -> bool:
        if len(self.beams) < self.size:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            n_new = self.max_new_tokens
        return self.worst >= best_sum_logprobs / n_new**self.length_penalty


class _GroupBeamSearch:
    """Diverse beam search: transformers 4's `_group_beam_search` with `BeamSearchScorer`.

    Beams are flat rows [batch * num_beams]; prompt b's group g is rows
    b * num_beams + g * group_size + (0 .. group_size - 1).
    """

    def __init__(
        self, tokens, *, groups, diversity_penalty, num_beams, max_new_tokens, length_penalty,
        early_stopping, eos, pad, processor,
    ):  # fmt: skip
        B, T = tokens.shape
        dev = tokens.device
        self.B, self.T, self.n, self.groups = B, T, num_beams, groups
        self.size = num_beams // groups
        self.cur_len, self.max_len = T, T + max_new_tokens
        self.diversity_penalty, self.eos, self.pad = diversity_penalty, set(eos), pad
        self.processor = processor
        self.k = max(2, 1 + len(eos)) * self.size
        self.seq = torch.full((B * num_beams, self.max_len), pad, dtype=torch.long, device=dev)
        self.seq[:, :T] = tokens.repeat_interleave(num_beams, dim=0)
        scores = torch.full((B, num_beams), NEG, device=dev)
        scores[:, :: self.size] = 0  # only the first beam of each group is live at the start
        self.scores = scores.view(-1)
        self.hyps = [
            [_Finished(self.size, length_penalty, early_stopping, max_new_tokens) for _ in range(groups)]
            for _ in range(B)
        ]  # fmt: skip
        self.done = [[False] * groups for _ in range(B)]
        self.finished = False

    def step(self, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, n, T, cur, size = self.B, self.n, self.T, self.cur_len, self.size
        V = logprobs.shape[-1]
        dev = logprobs.device
        chosen = torch.zeros(B * n, dtype=torch.long, device=dev)  # this step's tokens
        source = torch.arange(B * n, device=dev)
        new_scores = self.scores.clone()
        for g in range(self.groups):
            rows = (
                torch.arange(B, device=dev)[:, None] * n + g * size + torch.arange(size, device=dev)
            ).view(-1)
            scores = logprobs[rows]
            if self.processor is not None:
                scores = self.processor(self.seq[rows, :cur], scores)
            if g > 0:  # Hamming diversity: penalise tokens earlier groups chose this step
                scores = scores.clone()
                for b in range(B):
                    freq = torch.bincount(chosen[b * n : b * n + g * size], minlength=V)
                    scores[b * size : (b + 1) * size] -= self.diversity_penalty * freq
            total = (scores + self.scores[rows][:, None]).view(B, size * V)
            top_scores, top = torch.topk(total, self.k, dim=1, largest=True, sorted=True)
            top_beam, top_token = top // V, top % V
            for b in range(B):
                first = b * n + g * size  # this group's first row
                if self.done[b][g]:  # finished groups mark time with the pad token
                    new_scores[first : first + size] = 0
                    chosen[first : first + size] = self.pad
                    continue
                hyps, kept = self.hyps[b][g], 0
                for rank, (s, beam, t) in enumerate(
                    zip(
                        top_scores[b].tolist(),
                        top_beam[b].tolist(),
                        top_token[b].tolist(),
                        strict=True,
                    )
                ):
                    if t in self.eos:
                        if rank < size:
                            ids = self.seq[first + beam, T:cur].tolist() + [t]
                            hyps.add(ids, s, cur + 1 - T)
                    else:
                        new_scores[first + kept] = s
                        chosen[first + kept] = t
                        source[first + kept] = first + beam
                        kept += 1
                    if kept == size:
                        break
                if kept < size:
                    raise GPT2LabError(
                        "beam search ran out of candidates: the logits processors left fewer "
                        "than num_beams allowed tokens that are not EOS"
                    )
                best = top_scores[b].max().item()
                self.done[b][g] = hyps.is_done(best, cur + 1 - T)
        self.seq = self.seq[source]
        self.seq[:, cur] = chosen
        self.scores = new_scores
        self.cur_len = cur + 1
        self.finished = all(all(row) for row in self.done) or self.cur_len >= self.max_len
        return source, chosen

    def results(self, count: int) -> Hypotheses:
        T, cur = self.T, self.cur_len
        for b in range(self.B):  # beams still running join their group's hypotheses
            for g in range(self.groups):
                if self.done[b][g]:
                    continue
                for i in range(self.size):
                    row = b * self.n + g * self.size + i
                    ids = self.seq[row, T:cur].tolist()
                    self.hyps[b][g].add(ids, self.scores[row].item(), cur - T)
        out = []
        for b in range(self.B):
            ranked = sorted((h for f in self.hyps[b] for h in f.beams), key=lambda h: h[0])
            out.append([(ids, score) for score, ids in reversed(ranked[-count:])])
        return out
