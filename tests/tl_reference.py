"""Build transformer-lens 3.x `HookedTransformer`s from the same weights as a gpt2lab model.

transformer-lens is the reference for every interpretability test: the weights go
through transformers' GPT2LMHeadModel (our save -> HF load) and TransformerLens' own
GPT-2 converter, so nothing of ours is in the reference's path.
"""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch

tl = pytest.importorskip("transformer_lens", reason="transformer-lens 3.x is the reference")


def tl_config(cfg, **extra):
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_head=cfg.d_head,
        d_mlp=cfg.d_mlp,
        d_vocab=cfg.d_vocab,
        n_ctx=cfg.n_ctx,
        act_fn="gelu_new",
        normalization_type="LN",
        eps=cfg.layer_norm_eps,
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False,
        device="cpu",
        dtype=torch.float32,
        **extra,
    )


def hooked_transformer(model, *, processed: bool = False, **cfg_extra):
    """A HookedTransformer with `model`'s weights; `processed` folds LayerNorm and centres
    the writing weights and the unembedding (TransformerLens' `from_pretrained` default)."""
    import transformers
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    cfg = tl_config(model.cfg, **cfg_extra)
    with tempfile.TemporaryDirectory() as d:
        model.save(d)
        hf = transformers.GPT2LMHeadModel.from_pretrained(d, attn_implementation="eager")
    state = convert_gpt2_weights(hf, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if processed:
            cfg.normalization_type = "LNPre"  # what from_pretrained does when folding LN
        ref = HookedTransformer(cfg)
        ref.load_and_process_state_dict(
            state,
            fold_ln=processed,
            center_writing_weights=processed,
            center_unembed=processed,
            fold_value_biases=processed,
        )
    return ref.eval()
