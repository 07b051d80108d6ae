"""Weights read in vocabulary space: neuron vocabulary statistics and embedding-space views.

Two families of read-outs that need no data, only the weights:

- `neuron_vocab_stats`: for each MLP neuron, the distribution over the vocabulary of
  cos(W_out[l][n], W_U[:, v]) summarised by its moments, and the prediction / suppression
  classification of "Universal Neurons in GPT2 Language Models" (Gurnee et al. 2024):
  a neuron whose output direction is very close to a few tokens' unembeddings and
  orthogonal to the rest has a heavy-tailed cosine distribution (high kurtosis); the
  sign of the skew says whether it promotes (prediction) or suppresses those tokens.
- Embedding-space views (Geva et al. 2022; Dar et al. 2023, "Analyzing Transformers in
  Embedding Space"): an MLP key (a W_in column) read through the embedding E = W_E, an
  MLP value (a W_out row) read through the unembedding W_U, the top token pairs of a
  head's OV circuit E W_V W_O U and QK circuit E W_Q W_K^T E^T, and the top singular
  directions of a head's OV read as tokens.

Which matrices. Everything reads the model's weights as they stand: W_E is `wte.weight`
and W_U is the unembedding the forward pass uses (GPT-2 ties it to W_E, so W_U = W_E^T
until `process_weights` unties it). LayerNorms and biases are left out, as in Dar et al.
On an unprocessed model that ignores ln_final's scale, which differs per dimension, so a
neuron's cosines are with the raw unembedding; after `process_weights` (fold_ln,
center_unembed) W_U is ln_final.weight * W_U, centred over the vocabulary, which is what
the Universal Neurons code reads (TransformerLens processes by default), so its
statistics are the comparable ones; likewise fold_ln moves ln2's scale into W_in and
ln1's into W_Q/W_K/W_V, so keys and circuits then include them.

Memory. The cosine and pair-score matrices are never built whole: neurons go through in
blocks of at most STATS_BLOCK_BYTES of cosines, source tokens in blocks of at most
BLOCK_BYTES of pair scores with a running top-k, so gpt2-medium's 24 x 4096 neurons x
50257 tokens, or a 50257 x 50257 circuit, need at most a few hundred megabytes beyond
the weights (a block and its temporaries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import GPT2LabError
from ..kernels.linear import linear
from ..validate import as_list, integer, number, show, token_ids

if TYPE_CHECKING:
    from ..model import GPT2

BLOCK_BYTES = 16 << 20  # the most bytes of pair scores one block of rows may hold
STATS_BLOCK_BYTES = 64 << 20  # the same for the cosines of a block of neurons


# ---- neuron vocabulary statistics ------------------------------------------------------
@dataclass
class NeuronVocabStats:
    """Per-neuron statistics, each a float64 tensor [len(layers), d_mlp].

    mean, var, skew, kurtosis: the moments of cos(W_out[l][n], W_U[:, v]) over every
    token v, with population (biased) moments, as the Universal Neurons code computes
    them: skew = m3 / m2^1.5 and kurtosis = m4 / m2^2, the *plain* (Pearson) kurtosis,
    3 for a Gaussian (scipy.stats.kurtosis(x, fisher=False, bias=True); scipy's default
    is the excess kurtosis, 3 less). The paper's threshold of 10 is on this plain
    kurtosis. w_in_norm = ||W_in[l][:, n]||, w_out_norm = ||W_out[l][n]||, cos_in_out =
    cos(W_in[l][:, n], W_out[l][n]). With `neuron_ids` (a subset asked for), column j
    is neuron neuron_ids[j]; otherwise column n is neuron n.
    """

    layers: list[int]
    mean: torch.Tensor
    var: torch.Tensor
    skew: torch.Tensor
    kurtosis: torch.Tensor
    w_in_norm: torch.Tensor
    w_out_norm: torch.Tensor
    cos_in_out: torch.Tensor
    neuron_ids: list[int] | None = None

    def kind(self, kurtosis_threshold: float = 10.0) -> torch.Tensor:
        """An int8 tensor [len(layers), d_mlp]: 1 for a prediction neuron (kurtosis above
        the threshold, positive skew), -1 for a suppression neuron (negative skew), 0
        otherwise."""
        threshold = number("kurtosis_threshold", kurtosis_threshold)
        heavy = self.kurtosis > threshold
        out = torch.zeros(self.kurtosis.shape, dtype=torch.int8)
        out[heavy & (self.skew > 0)] = 1
        out[heavy & (self.skew < 0)] = -1
        return out

    def neurons(self, kind: str = "prediction", kurtosis_threshold: float = 10.0):
        """The (layer, neuron) pairs of one kind, "prediction" or "suppression", in order."""
        signs = {"prediction": 1, "suppression": -1}
        if kind not in signs:
            raise GPT2LabError(f"kind must be 'prediction' or 'suppression', got {show(kind)}")
        rows, cols = (self.kind(kurtosis_threshold) == signs[kind]).nonzero(as_tuple=True)
        ids = self.neuron_ids
        return [
            (self.layers[r], c if ids is None else ids[c])
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
        ]


def neuron_vocab_stats(model: GPT2, layers: Any = None, neurons: Any = None) -> NeuronVocabStats:
    """The vocabulary statistics of every MLP neuron of `layers` (default: all layers), or
    of the neurons `neurons` (a list of indices, the same in each layer) only.

    The cosines are computed in float32 (the model's device), a block of neurons at a time,
    and their moments are taken about the block's exact mean (two passes over the block,
    not raw power sums, which would cancel badly for cosines of mean ~0); the results are
    stored in float64. See NeuronVocabStats for the conventions.

    W_U is the model's unembedding as it stands (module docstring): on an unprocessed
    GPT-2 the tied W_E^T, without ln_final's per-dimension scale; after `process_weights`
    the scale is folded in and W_U is centred over the vocabulary, so the cosines, and
    which neurons pass the kurtosis threshold, change. The paper's numbers are for
    processed weights (TransformerLens' default)."""
    selected = _layers(model, layers)
    ids = None if neurons is None else _neuron_list(model, neurons)
    U = _unembedding(model).T  # [d_vocab, d_model]: wte.weight itself while tied
    inv_norm_U = 1.0 / U.norm(dim=1).clamp_min(1e-30)  # per token
    rows = max(1, STATS_BLOCK_BYTES // (4 * U.shape[0]))
    stats: dict[str, list[torch.Tensor]] = {k: [] for k in _STATS}
    with torch.no_grad():
        for layer in selected:
            mlp = model.blocks[layer].mlp
            W_in, W_out = mlp.W_in.float(), mlp.W_out.float()  # [d_model, d_mlp], [d_mlp, d_model]
            if ids is not None:
                W_in, W_out = W_in[:, ids], W_out[ids]
            in_norm, out_norm = W_in.norm(dim=0), W_out.norm(dim=1)
            moments = [
                _cosine_moments(W_out[s : s + rows] / out_norm[s : s + rows, None], U, inv_norm_U)
                for s in range(0, W_out.shape[0], rows)
            ]
            for i, name in enumerate(("mean", "var", "skew", "kurtosis")):
                stats[name].append(torch.cat([m[i] for m in moments]))
            stats["w_in_norm"].append(in_norm)
            stats["w_out_norm"].append(out_norm)
            cos = (W_in.T * W_out).sum(-1) / (in_norm * out_norm).clamp_min(1e-30)
            stats["cos_in_out"].append(cos)
    return NeuronVocabStats(
        layers=selected,
        **{k: torch.stack(v).double().cpu() for k, v in stats.items()},
        neuron_ids=ids,
    )


_STATS = ("mean", "var", "skew", "kurtosis", "w_in_norm", "w_out_norm", "cos_in_out")


def _cosine_moments(unit_rows: torch.Tensor, U: torch.Tensor, inv_norm_U: torch.Tensor):
    """(mean, var, skew, kurtosis) of each row's cosines with every row of U [d_vocab,
    d_model] (gpt2lab's `linear`: oneDNN on the CPU, 1.3-1.7x MKL's matmul here)."""
    d = linear(unit_rows, U)  # [rows, d_vocab]
    d.mul_(inv_norm_U)  # cosines
    mean = d.mean(-1)
    d.sub_(mean[:, None])
    sq = d * d
    var = sq.mean(-1)
    skew = (sq * d).mean(-1) / var.pow(1.5)
    kurtosis = sq.square_().mean(-1) / var.square()
    return mean, var, skew, kurtosis


# ---- token read-outs ---------------------------------------------------------------------
@dataclass(frozen=True)
class TokenScore:
    id: int
    token: str
    score: float


@dataclass
class TokenView:
    """A direction read as tokens: the k highest- and k lowest-scoring tokens."""

    what: str  # e.g. "value L2N17 . W_U"
    top: list[TokenScore]
    bottom: list[TokenScore]


@dataclass(frozen=True)
class TokenPair:
    """One entry of a vocabulary x vocabulary circuit: rows are `source`, columns `target`."""

    source: int
    target: int
    source_token: str
    target_token: str
    score: float


@dataclass
class SingularDirection:
    """One singular triple of a head's OV (d_model x d_model, rank <= d_head): `input`
    is the left singular vector (what the head reads) through W_E, `output` the right
    one (what it writes) through W_U. The pair's sign is fixed so that the output
    vector's largest-magnitude entry is positive."""

    index: int
    value: float
    input: TokenView
    output: TokenView


def key_tokens(model: GPT2, layer: int, neuron: int, k: int = 10, vocab: Any = None) -> TokenView:
    """The tokens whose embedding most (and least) excites neuron `neuron` of `layer`:
    W_E @ W_in[layer][:, neuron]. Dar et al. read keys with the embedding, since a key is
    matched against the residual stream that the embeddings start."""
    _layer(model, layer)
    neuron = integer("neuron", neuron, 0, model.cfg.d_mlp - 1)
    with torch.no_grad():
        key = model.blocks[layer].mlp.W_in[:, neuron].float()
        ids, E = _rows(model, _embedding(model), vocab)
        return _view(model, f"key L{layer}N{neuron} . W_E", E @ key, ids, k)


def value_tokens(model: GPT2, layer: int, neuron: int, k: int = 10, vocab: Any = None) -> TokenView:
    """The tokens neuron `neuron` of `layer` promotes (top) and suppresses (bottom) when it
    fires positively: W_out[layer][neuron] @ W_U (a negative activation swaps them)."""
    _layer(model, layer)
    neuron = integer("neuron", neuron, 0, model.cfg.d_mlp - 1)
    with torch.no_grad():
        value = model.blocks[layer].mlp.W_out[neuron].float()
        ids, U = _rows(model, _unembedding(model).T, vocab)
        return _view(model, f"value L{layer}N{neuron} . W_U", U @ value, ids, k)


def ov_top_pairs(
    model: GPT2,
    layer: int,
    head: int,
    k: int = 10,
    *,
    vocab: Any = None,
    largest: bool = True,
) -> list[TokenPair]:
    """The k largest (or, with largest=False, smallest) entries of head `head`'s OV circuit
    in token space, W_E @ W_V[l, h] @ W_O[l, h] @ W_U: source = the token attended to,
    target = the output token whose logit the head moves. `vocab`: restrict both sides to
    these token ids. Ties are ordered by (source, target)."""
    W_Q, W_K, W_V, W_O = head_weights(model, layer, head)
    with torch.no_grad():
        ids, E = _rows(model, _embedding(model), vocab)
        _, U = _rows(model, _unembedding(model).T, vocab)  # [n, d_model]
        return _top_pairs(model, E @ W_V, (U @ W_O.T).T, ids, k, largest)


def qk_top_pairs(
    model: GPT2,
    layer: int,
    head: int,
    k: int = 10,
    *,
    vocab: Any = None,
    largest: bool = True,
) -> list[TokenPair]:
    """The k largest (or smallest) entries of head `head`'s QK circuit in token space,
    W_E @ W_Q[l, h] @ W_K[l, h]^T @ W_E^T: source = the query (attending) token, target =
    the key token it attends to (scores before the 1/sqrt(d_head) scale)."""
    W_Q, W_K, W_V, W_O = head_weights(model, layer, head)
    with torch.no_grad():
        ids, E = _rows(model, _embedding(model), vocab)
        return _top_pairs(model, E @ W_Q, (E @ W_K).T, ids, k, largest)


def ov_singular_tokens(
    model: GPT2, layer: int, head: int, n: int = 3, k: int = 10, vocab: Any = None
) -> list[SingularDirection]:
    """The `n` top singular directions of head `head`'s OV = W_V @ W_O (d_model x d_model),
    each read as tokens: the input side through W_E, the output side through W_U.

    The SVD is of the d_head-rank factored form (QR of each factor, then the SVD of a
    d_head x d_head core; gpt2lab.interp.FactoredMatrix), never the dense d_model^2."""
    from .factored_matrix import FactoredMatrix

    W_Q, W_K, W_V, W_O = head_weights(model, layer, head)
    n = integer("n", n, 1)
    with torch.no_grad():
        U_in, S, V_out = FactoredMatrix(W_V, W_O).svd()  # [d_model, r], [r], [d_model, r]
        ids_e, E = _rows(model, _embedding(model), vocab)
        ids_u, Wu = _rows(model, _unembedding(model).T, vocab)
        out = []
        for i in range(min(n, S.shape[0])):
            u, v = U_in[:, i], V_out[:, i]
            sign = 1.0 if v[v.abs().argmax()] >= 0 else -1.0
            u, v = u * sign, v * sign
            name = f"L{layer}H{head} OV singular {i}"
            out.append(
                SingularDirection(
                    index=i,
                    value=float(S[i]),
                    input=_view(model, f"{name} input . W_E", E @ u, ids_e, k),
                    output=_view(model, f"{name} output . W_U", Wu @ v, ids_u, k),
                )
            )
        return out


def head_weights(model: GPT2, layer: int, head: int):
    """(W_Q, W_K, W_V, W_O) of one head in TransformerLens' shapes ([d_model, d_head] x 3,
    [d_head, d_model]) as float32, sliced from the fused weights without stacking the
    other layers' (model.W_V and friends copy every layer)."""
    _layer(model, layer)
    _check_unquantized(model)
    head = integer("head", head, 0, model.cfg.n_heads - 1)
    D, dh = model.cfg.d_model, model.cfg.d_head
    attn = model.blocks[layer].attn
    with torch.no_grad():
        qkv = attn.c_attn.weight.float()  # [3 * d_model, d_model]: q, k, v output rows
        rows = slice(head * dh, (head + 1) * dh)
        W_Q, W_K, W_V = (qkv[i * D : (i + 1) * D][rows].T for i in range(3))
        W_O = attn.c_proj.weight.float()[:, rows].T  # c_proj: [d_model, heads * d_head]
    return W_Q, W_K, W_V, W_O


# ---- helpers -----------------------------------------------------------------------------
def _top_pairs(
    model: GPT2,
    left: torch.Tensor,
    right: torch.Tensor,
    ids: torch.Tensor,
    k: int,
    largest: bool,
) -> list[TokenPair]:
    """The k best entries of left @ right ([n, r] @ [r, n]) by a running top-k over row
    blocks, so at most BLOCK_BYTES of scores exist at a time."""
    k = integer("k", k, 1)
    if not isinstance(largest, bool):
        raise GPT2LabError(f"largest must be True or False, got {show(largest)}")
    n_rows, n_cols = left.shape[0], right.shape[1]
    rows = max(1, BLOCK_BYTES // (4 * n_cols))
    best = torch.empty(0, device=left.device)
    where = torch.empty(0, dtype=torch.long, device=left.device)
    for start in range(0, n_rows, rows):
        scores = (left[start : start + rows] @ right).flatten()
        if not largest:
            scores.neg_()
        if best.numel() == k:  # only entries above the k-th best so far can enter
            index = (scores > best[-1]).nonzero()[:, 0]
            value = scores[index]
        else:
            value, index = scores.topk(min(k, scores.numel()))
        if value.numel() > k:
            value, keep = value.topk(k)
            index = index[keep]
        best, where = torch.cat([best, value]), torch.cat([where, index + start * n_cols])
        best, keep = best.sort(descending=True, stable=True)
        best, where = best[:k], where[keep[:k]]
    # deterministic order: score descending, then (source, target)
    where, order = where.sort()
    best = best[order]
    best, order = best.sort(descending=True, stable=True)
    where = where[order]
    if not largest:
        best = -best
    pairs = []
    ids = ids.tolist()
    for score, flat in zip(best.tolist(), where.tolist(), strict=True):
        src, dst = ids[flat // n_cols], ids[flat % n_cols]
        pairs.append(TokenPair(src, dst, _token(model, src), _token(model, dst), score))
    return pairs


def _view(model: GPT2, what: str, scores: torch.Tensor, ids: torch.Tensor, k: Any) -> TokenView:
    """The k highest and k lowest scores (top-k, not a sort of the whole vocabulary)."""
    k = min(integer("k", k, 1), scores.numel())

    def pick(largest: bool) -> list[TokenScore]:
        values, positions = scores.topk(k, largest=largest, sorted=True)
        chosen = ids[positions].tolist()
        return [
            TokenScore(t, _token(model, t), v) for t, v in zip(chosen, values.tolist(), strict=True)
        ]

    return TokenView(what=what, top=pick(True), bottom=pick(False))


def _rows(model: GPT2, matrix: torch.Tensor, vocab: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, their rows of `matrix` [d_vocab, d_model] as float32)."""
    if vocab is None:
        ids = torch.arange(matrix.shape[0], device=matrix.device)
        return ids, matrix.float()
    ids = torch.tensor(token_ids("vocab", vocab, model.cfg.d_vocab), device=matrix.device)
    return ids, matrix[ids].float()


def _token(model: GPT2, token_id: int) -> str:
    tokenizer = model.tokenizer
    if token_id < tokenizer.vocab_size:
        return tokenizer.decode([token_id])
    return f"<{token_id}>"


def _embedding(model: GPT2) -> torch.Tensor:
    _check_unquantized(model)
    return model.wte.weight.detach()  # [d_vocab, d_model]


def _unembedding(model: GPT2) -> torch.Tensor:
    """The W_U the forward pass uses, [d_model, d_vocab], float32 (a view when it is)."""
    _check_unquantized(model)
    return model.unembed.W_U.detach().float()


def _check_unquantized(model: GPT2) -> None:
    from ..quantize import is_quantized

    if is_quantized(model):
        raise GPT2LabError(
            "vocabulary-space reads and edits need an unquantized model; load it without "
            "quantize='int8'"
        )


def _layer(model: GPT2, layer: Any) -> int:
    return integer("layer", layer, 0, model.cfg.n_layers - 1)


def _neuron_list(model: GPT2, neurons: Any) -> list[int]:
    items = as_list(neurons)
    if not items:
        raise GPT2LabError(f"neurons must be None or a non-empty list, got {show(neurons)}")
    return [integer("neuron", n, 0, model.cfg.d_mlp - 1) for n in items]


def _layers(model: GPT2, layers: Any) -> list[int]:
    if layers is None:
        return list(range(model.cfg.n_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        return [_layer(model, layers)]
    if not isinstance(layers, (list, tuple, range)) or len(layers) == 0:
        raise GPT2LabError(f"layers must be None, a layer or a non-empty list, got {show(layers)}")
    return [_layer(model, layer) for layer in layers]


__all__ = [
    "NeuronVocabStats",
    "SingularDirection",
    "TokenPair",
    "TokenScore",
    "TokenView",
    "head_weights",
    "key_tokens",
    "neuron_vocab_stats",
    "ov_singular_tokens",
    "ov_top_pairs",
    "qk_top_pairs",
    "value_tokens",
]
