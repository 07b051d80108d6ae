"""Value-vector edits and the per-layer MLP answer measurement of "Anchored Answers".

Li & Gao (2024), "Anchored Answers: Unravelling Positional Bias in GPT-2's Multiple-Choice
Questions", find that a few MLP neurons push GPT-2 towards the first option (" A")
whatever the question, measure it with the logit lens on each layer's MLP output at the
last position, and fix it by editing those neurons' value vectors (rows of W_out) towards
the other options' unembeddings. Both halves are here:

- `edit_value_vector(model, layer, neuron, {" B": 2.0, " A": -2.0})` adds
  sum_t a_t W_U[:, t] to W_out[layer][neuron] in place, in the weights the forward pass
  uses (`blocks[layer].mlp.c_proj.weight[:, neuron]`; `model.W_out` is a copy, so editing
  that would change nothing). The edit keeps the original row and `undo()` writes it
  back, so undoing is bit-identical, not a subtraction that rounds. It is a context
  manager. Edits of different neurons are independent and undo in any order; edits of one
  neuron stack and must be undone last-first (anything else is refused, as is undoing an
  edit whose row something else has since overwritten). `model.save(dir)` writes the
  edited weights (HF's `transformer.h[l].mlp.c_proj.weight[neuron]`). W_U is read as the
  forward pass uses it: GPT-2 ties it to W_E, and the edit writes only W_out, never the
  embedding; after `process_weights` it is the processed (folded, centred) W_U.
- `mlp_answer_contributions(model, prompt, (" A", " B"))`: each layer's MLP output at the
  last position read as a logit of each answer, through ln_final with its scale frozen
  at the real run's value (centre, divide by the scale, apply ln_final's weight, dot with
  W_U[:, a]: the direct logit attribution of gpt2lab.interp.attribution), and the top
  neurons ranked by |activation| x ||W_out[n]||, with each one's contribution
  activation x (W_out[n] . direction) to each answer's logit. A layer's neurons add up
  to its MLP contribution minus the output bias's term, b_out . direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import GPT2LabError
from ..inputs import single_token_id, to_batch
from ..validate import as_list, integer, number, show
from .vocab_space import _check_unquantized, _layer, _token

if TYPE_CHECKING:
    from ..model import GPT2


# ---- value-vector edits ------------------------------------------------------------------
class ValueEdit:
    """One applied edit W_out[layer][neuron] += delta (made by `edit_value_vector`)."""

    def __init__(self, model: GPT2, layer: int, neuron: int, coefficients: dict[int, float]):
        self.model, self.layer, self.neuron = model, layer, neuron
        self.coefficients = coefficients  # token id -> coefficient
        weight = self._weight()
        W_U = model.unembed.W_U.detach()  # [d_model, d_vocab]
        ids = torch.tensor(list(coefficients), device=W_U.device)
        a = torch.tensor(list(coefficients.values()), dtype=torch.float64, device=W_U.device)
        self.delta = W_U[:, ids].double() @ a  # [d_model], exact sum in float64
        with torch.no_grad():
            self._original = weight[:, neuron].clone()
            weight[:, neuron] = (self._original.double() + self.delta).to(weight.dtype)
            self._edited = weight[:, neuron].clone()
        self.active = True
        _registry(model).append(self)

    def _weight(self) -> torch.Tensor:
        return self.model.blocks[self.layer].mlp.c_proj.weight  # [d_model, d_mlp]

    def undo(self) -> None:
        """Write the original row back (bit-identical), or refuse: undone already, a later
        edit of the same neuron still applied, or the row changed by something else."""
        if not self.active:
            raise GPT2LabError(f"this edit of {self.name} was already undone")
        edits = _registry(self.model)
        later = [e for e in edits[edits.index(self) + 1 :] if e.key == self.key]
        if later:
            raise GPT2LabError(
                f"{len(later)} later edit(s) of {self.name} are still applied; edits of one "
                "neuron undo last-first: undo those first"
            )
        weight = self._weight()
        if not torch.equal(weight[:, self.neuron], self._edited):
            raise GPT2LabError(
                f"the weights of {self.name} changed after this edit (by something other than "
                "an edit), so undoing it cannot restore them exactly; reload the model"
            )
        with torch.no_grad():
            weight[:, self.neuron] = self._original
        edits.remove(self)
        self.active = False

    @property
    def key(self) -> tuple[int, int]:
        return self.layer, self.neuron

    @property
    def name(self) -> str:
        return f"L{self.layer}N{self.neuron}"

    def __enter__(self) -> ValueEdit:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            self.undo()

    def __repr__(self) -> str:
        terms = ", ".join(f"{_token(self.model, t)!r}: {a:g}" for t, a in self.coefficients.items())
        state = "applied" if self.active else "undone"
        return f"ValueEdit({self.name} += {{{terms}}} . W_U, {state})"


def edit_value_vector(model: GPT2, layer: int, neuron: int, tokens: Any) -> ValueEdit:
    """Add sum_t a_t W_U[:, t] to W_out[layer][neuron] in place; returns the reversible
    edit. `tokens`: {token: coefficient}, each token a one-token string (" B") or an id."""
    _check_unquantized(model)
    layer = _layer(model, layer)
    neuron = integer("neuron", neuron, 0, model.cfg.d_mlp - 1)
    if not isinstance(tokens, dict) or not tokens:
        raise GPT2LabError(
            f"tokens must be a non-empty dict {{token: coefficient}}, got {show(tokens)}"
        )
    coefficients: dict[int, float] = {}
    for token, a in tokens.items():
        token_id = single_token_id(model.tokenizer, token, model.cfg.d_vocab, what="token")
        if token_id in coefficients:
            raise GPT2LabError(f"token {token!r} (id {token_id}) is given twice")
        coefficients[token_id] = number(f"the coefficient of {token!r}", a)
    return ValueEdit(model, layer, neuron, coefficients)


def _registry(model: GPT2) -> list[ValueEdit]:
    """The model's applied edits, oldest first."""
    return model.__dict__.setdefault("_value_edits", [])


def value_edits(model: GPT2) -> list[ValueEdit]:
    """The edits applied to `model` and not undone, oldest first."""
    return list(_registry(model))


# ---- the measurement ---------------------------------------------------------------------
@dataclass(frozen=True)
class NeuronContribution:
    layer: int
    neuron: int
    activation: float
    w_out_norm: float
    score: float  # |activation| x ||W_out[neuron]||
    contributions: tuple[float, ...]  # to each answer's logit, in the order of `answers`


@dataclass
class AnswerContributions:
    """What each layer's MLP writes to each answer's logit at the last position.

    `mlp` [n_layers, n_answers]; `logits` [n_answers], the model's own logits there;
    `neurons`: the top neurons by |activation| x ||W_out[n]||, best first."""

    answers: list[str]
    answer_ids: list[int]
    mlp: torch.Tensor
    logits: torch.Tensor
    neurons: list[NeuronContribution]

    @property
    def diff(self) -> torch.Tensor:
        """[n_layers]: each layer's MLP contribution to logit(answers[0]) - logit(answers[1])."""
        if self.mlp.shape[1] < 2:
            raise GPT2LabError("diff needs two answers")
        return self.mlp[:, 0] - self.mlp[:, 1]


def mlp_answer_contributions(
    model: GPT2,
    prompt: Any,
    answers: Any = (" A", " B"),
    *,
    layer: int | None = None,
    k: int = 10,
) -> AnswerContributions:
    """Per-layer MLP logit-lens contributions to each answer at the prompt's last token,
    and the top `k` neurons of `layer` (None: of all layers, ranked together).

    `prompt`: one text or a list / 1-D tensor of token ids (BOS as the model's default).
    `answers`: one-token strings or ids, at least one."""
    _check_unquantized(model)
    items = as_list(answers)
    if not items:
        raise GPT2LabError(f"answers must be a non-empty list of tokens, got {show(answers)}")
    ids = [single_token_id(model.tokenizer, a, model.cfg.d_vocab, what="answer") for a in items]
    layers = range(model.cfg.n_layers) if layer is None else [_layer(model, layer)]
    k = integer("k", k, 1)
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str):
        raise GPT2LabError("give one prompt (a text or token ids), not a list of texts")
    batch = to_batch(model.tokenizer, prompt, prepend_bos=model.default_prepend_bos)
    if batch.tokens.shape[0] != 1:
        raise GPT2LabError(f"give one prompt, got a batch of {batch.tokens.shape[0]}")
    tokens = batch.tokens.to(model.device)
    last = tokens.shape[1] - 1

    names = ["ln_final.hook_scale"] + [
        f"blocks.{i}.hook_mlp_out" for i in range(model.cfg.n_layers)
    ]
    names += [f"blocks.{i}.mlp.hook_post" for i in layers]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=names, pos_slice=[last])
        act = {name: x[0, 0].float() for name, x in cache.items()}  # batch 1, one position
        W_U = model.unembed.W_U.detach().float()  # [d_model, d_vocab]
        u = W_U[:, ids].T  # [n_answers, d_model]
        direction = u * model.ln_final.weight.detach().float()
        direction = direction - direction.mean(-1, keepdim=True)  # centre(x).d == x.centre(d)
        direction = direction / act["ln_final.hook_scale"]  # the frozen scale, [1]
        mlp = torch.stack(
            [direction @ act[f"blocks.{i}.hook_mlp_out"] for i in range(model.cfg.n_layers)]
        )
        rows = []
        for i in layers:
            post = act[f"blocks.{i}.mlp.hook_post"]  # [d_mlp]
            W_out = model.blocks[i].mlp.W_out.detach().float()  # [d_mlp, d_model], a view
            norm = W_out.norm(dim=-1)
            contrib = post[:, None] * (W_out @ direction.T)  # [d_mlp, n_answers]
            rows.append((i, post, norm, contrib))
        score = torch.cat([(post.abs() * norm) for _, post, norm, _ in rows])
        top = score.argsort(descending=True, stable=True)[:k].tolist()
        d_mlp = model.cfg.d_mlp
        neurons = []
        for flat in top:
            i, post, norm, contrib = rows[flat // d_mlp]
            n = flat % d_mlp
            neurons.append(
                NeuronContribution(
                    layer=i,
                    neuron=n,
                    activation=float(post[n]),
                    w_out_norm=float(norm[n]),
                    score=float(score[flat]),
                    contributions=tuple(contrib[n].tolist()),
                )
            )
    return AnswerContributions(
        answers=[_token(model, t) for t in ids],
        answer_ids=ids,
        mlp=mlp.cpu(),
        logits=logits[0, last, ids].float().cpu(),
        neurons=neurons,
    )


__all__ = [
    "AnswerContributions",
    "NeuronContribution",
    "ValueEdit",
    "edit_value_vector",
    "mlp_answer_contributions",
    "value_edits",
]
