"""Weight processing: rewrite GPT-2's weights into an equivalent, easier-to-read form.

The same four steps as TransformerLens' `load_and_process_state_dict`, applied to our
fused `nn.Linear` layout in place:

- fold_ln: each LayerNorm's weight and bias move into the layers that read its output
  (ln1 -> q/k/v, ln2 -> the MLP's input, ln_final -> the unembedding); the LayerNorms
  are left with weight 1 and bias 0, so they only centre and divide by their scale,
  and what a component writes to the residual stream can be read off directly.
- center_writing_weights: every weight that writes to the residual stream (W_E, W_pos,
  W_O, b_O, W_out, b_out) gets zero mean along d_model. A LayerNorm subtracts the mean
  anyway, so nothing downstream changes, but a component's output no longer carries a
  meaningless constant direction.
- center_unembed: W_U and b_U get zero mean over the vocabulary. Softmax ignores a
  constant added to every logit, so log-probs are unchanged; the logits themselves
  shift by a constant per position.
- fold_value_biases: attention patterns sum to 1, so each head's value bias adds the
  constant b_V @ W_O to the layer's output whatever the head attends to; it moves into
  b_O, and a head's result then depends only on what it reads.

Processing unties the unembedding from the token embedding (it sets
`model.unembed.weight` and `.bias`), which GPT-2 checkpoints cannot store, so a
processed model cannot be saved: save the original and load it with `process=True`.
Processing is exact in float arithmetic; it runs in float32 (upcasting half-precision
weights, as TransformerLens does) and writes back in the model's dtype.

An LN-free model (cfg.ln_free: LayerNorms with a fixed scale) still centres and applies
an affine map, so every step applies to it unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import GPT2LabError

if TYPE_CHECKING:
    from ..model import GPT2

OPTIONS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


def processing_of(model: nn.Module) -> dict[str, bool] | None:
    """The options a model was processed with, or None for an unprocessed model."""
    return getattr(model, "processing", None)


def ln_final_is_folded(model: GPT2) -> bool:
    """Whether the final LayerNorm has no affine map left (weight 1, bias 0), so the
    unembedding alone turns the normalised stream into logits."""
    ln = model.ln_final
    return bool((ln.weight == 1).all() and (ln.bias == 0).all())


def process_weights(
    model: GPT2,
    *,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
) -> GPT2:
    """Process `model`'s weights in place (see the module docstring); returns the model.

    Log-probabilities are preserved exactly (up to float rounding); logits shift by a
    constant per position when `center_unembed` is on. The options used are recorded
    as `model.processing`.
    """
    from ..quantize import is_quantized

    options = dict(
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
    )
    for name, value in options.items():
        if not isinstance(value, bool):
            raise GPT2LabError(f"process_weights: {name} must be True or False, got {value!r}")
    if processing_of(model) is not None:
        raise GPT2LabError(
            "the model's weights are already processed; load it again to process it differently"
        )
    if is_quantized(model):
        raise GPT2LabError(
            "cannot process a quantized model; process first: gpt2lab.load(..., process=True)"
        )
    if not model.dtype.is_floating_point or model.device.type == "meta":
        raise GPT2LabError(f"cannot process weights of dtype {model.dtype} on {model.device}")

    with torch.no_grad():
        w = _Float32Weights(model)
        if fold_ln:
            _fold_layer_norms(model, w)
        if center_writing_weights:
            _center_writing_weights(model, w)
        if center_unembed:
            w.unembed_w -= w.unembed_w.mean(0, keepdim=True)  # [vocab, d_model]: over vocab
            w.unembed_b -= w.unembed_b.mean()
        if fold_value_biases:
            _fold_value_biases(model, w, recenter=center_writing_weights)
        w.write_back()
    model.processing = options
    return model


class _Float32Weights:
    """The weights in float32, written back at the end: float32 parameters are edited in
    place (no second copy of a large model), half-precision ones through float32 copies.

    The unembedding starts as a copy of the tied token embedding (plus a zero bias),
    so the two can change separately from here on.
    """

    def __init__(self, model: GPT2):
        self.model = model
        self.dtype = model.dtype
        self.copies: dict[str, torch.Tensor] = {
            name: p.detach().float() for name, p in model.named_parameters()
        }
        tied = model.unembed.weight if model.unembed.weight is not None else model.wte.weight
        self.unembed_w = tied.detach().float().clone()  # [d_vocab, d_model], nn.Linear layout
        bias = model.unembed.bias
        self.unembed_b = (
            bias.detach().float().clone()
            if bias is not None
            else torch.zeros(model.cfg.d_vocab, device=model.device)
        )

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.copies[name]

    def write_back(self) -> None:
        params = dict(self.model.named_parameters())
        for name, value in self.copies.items():
            if not name.startswith("unembed.") and value.data_ptr() != params[name].data_ptr():
                params[name].copy_(value.to(params[name].dtype))
        self.model.unembed.weight = nn.Parameter(self.unembed_w.to(self.dtype))
        self.model.unembed.bias = nn.Parameter(self.unembed_b.to(self.dtype))


def _fold_into(ln_w: torch.Tensor, ln_b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Fold a LayerNorm's affine map into the nn.Linear (`weight` [out, in], `bias` [out])
    that reads it, and centre the result along the input (d_model) axis; in place."""
    bias += weight @ ln_b
    weight *= ln_w
    weight -= weight.mean(1, keepdim=True)


def _reset(w: _Float32Weights, prefix: str) -> None:
    """A folded LayerNorm keeps only its centring and scaling."""
    w[f"{prefix}.weight"].fill_(1.0)
    w[f"{prefix}.bias"].zero_()


def _fold_layer_norms(model: GPT2, w: _Float32Weights) -> None:
    for i in range(model.cfg.n_layers):
        p = f"blocks.{i}"
        _fold_into(w[f"{p}.ln1.weight"], w[f"{p}.ln1.bias"],
                   w[f"{p}.attn.c_attn.weight"], w[f"{p}.attn.c_attn.bias"])  # fmt: skip
        _reset(w, f"{p}.ln1")
        _fold_into(w[f"{p}.ln2.weight"], w[f"{p}.ln2.bias"],
                   w[f"{p}.mlp.c_fc.weight"], w[f"{p}.mlp.c_fc.bias"])  # fmt: skip
        _reset(w, f"{p}.ln2")
    _fold_into(w["ln_final.weight"], w["ln_final.bias"], w.unembed_w, w.unembed_b)
    _reset(w, "ln_final")


def _center_writing_weights(model: GPT2, w: _Float32Weights) -> None:
    for name in ("wte.weight", "wpe.weight"):  # [rows, d_model]
        table = w[name]
        table -= table.mean(1, keepdim=True)
    for i in range(model.cfg.n_layers):
        for proj in (f"blocks.{i}.attn.c_proj", f"blocks.{i}.mlp.c_proj"):
            weight, bias = w[f"{proj}.weight"], w[f"{proj}.bias"]  # [d_model, in], [d_model]
            weight -= weight.mean(0, keepdim=True)
            bias -= bias.mean()


def _fold_value_biases(model: GPT2, w: _Float32Weights, recenter: bool) -> None:
    D = model.cfg.d_model
    for i in range(model.cfg.n_layers):
        b_V = w[f"blocks.{i}.attn.c_attn.bias"][2 * D :]  # [n_heads * d_head], a view
        b_O = w[f"blocks.{i}.attn.c_proj.bias"]
        b_O += w[f"blocks.{i}.attn.c_proj.weight"] @ b_V  # sum over heads of b_V[h] @ W_O[h]
        b_V.zero_()
        if recenter:
            b_O -= b_O.mean()
