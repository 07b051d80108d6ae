"""Direct logit attribution: the parts add up to the model's logit (difference), and equal
transformer-lens 3.x's logit_attrs on its processed model of the same weights."""

from __future__ import annotations

import tempfile

import pytest
import torch
from tl_reference import hooked_transformer

import gpt2lab as gl
from gpt2lab.errors import GPT2LabError
from gpt2lab.interp import Attribution, direct_logit_attribution

BY = ["component", "layer", "head", "neuron"]
CORRECT, WRONG = torch.tensor([5, 17, 300]), torch.tensor([9, 4, 1000])


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models(small_ckpt):
    """{False: unprocessed, True: processed} models, and TransformerLens' processed model."""
    original = gl.load(small_ckpt)
    ref = hooked_transformer(original, processed=True, use_attn_result=True)
    return {False: original, True: gl.load(small_ckpt, process=True)}, ref


@pytest.fixture(scope="module")
def reference(models):
    """TransformerLens' logits and cache (of its processed model) for the test batch."""
    _, ref = models
    with torch.no_grad():
        return ref.run_with_cache(random_tokens(3, 8))


def heads_with_value_biases(model):
    """TransformerLens' logits and cache with every processing step but fold_value_biases."""
    import transformers
    from tl_reference import tl_config
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    cfg = tl_config(model.cfg)
    cfg.normalization_type = "LNPre"  # LayerNorms folded, as from_pretrained does
    with tempfile.TemporaryDirectory() as d:
        model.save(d)
        hf = transformers.GPT2LMHeadModel.from_pretrained(d, attn_implementation="eager")
    ref = HookedTransformer(cfg)
    ref.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_value_biases=False)
    with torch.no_grad():
        return ref.run_with_cache(random_tokens(3, 8))


@pytest.mark.parametrize("by", BY)
@pytest.mark.parametrize("processed", [False, True], ids=["unprocessed", "processed"])
@pytest.mark.parametrize("difference", [False, True], ids=["logit", "logit_diff"])
def test_parts_sum_to_the_logit(models, reference, hf_small, by, processed, difference):
    x = random_tokens(3, 8)
    wrong = WRONG if difference else None
    result = direct_logit_attribution(models[0][processed], x, CORRECT, wrong, by=by)
    # the logit being split: transformers' for the original weights, TransformerLens' for
    # processed ones (centring the unembedding shifts logits, not their differences)
    with torch.no_grad():
        logits = reference[0][:, -1] if processed else hf_small(x).logits[:, -1]
    expected = logits.gather(1, CORRECT[:, None])[:, 0]
    if difference:
        expected = expected - logits.gather(1, WRONG[:, None])[:, 0]
    assert (result.total - expected).abs().max() < 1e-4
    assert result.values.shape == (len(result.labels), 3)
    assert (result.values.sum(0) - result.total).abs().max() < 1e-4
    assert result.labels[:2] == ["embed", "pos_embed"] and result.labels[-1] == "bias"
    assert result.processed == processed


@pytest.mark.parametrize("by", ["component", "head", "neuron"])
@pytest.mark.parametrize("processed", [False, True], ids=["unprocessed", "processed"])
def test_matches_transformer_lens_logit_attrs(models, reference, by, processed):
    _, cache = reference
    if by == "component":
        stack, labels = cache.decompose_resid(pos_slice=-1, return_labels=True)
    elif by == "head":
        stack, labels = cache.stack_head_results(pos_slice=-1, return_labels=True)
    else:
        stack, labels = cache.stack_neuron_results(None, pos_slice=-1, return_labels=True)
    expected = cache.logit_attrs(stack, CORRECT, WRONG, pos_slice=-1)
    x = random_tokens(3, 8)
    result = direct_logit_attribution(models[0][processed], x, CORRECT, WRONG, by=by)
    ours = result.values[[result.labels.index(label) for label in labels]]
    if by == "head" and not processed:
        # unprocessed heads keep their value biases (processing moves them into b_O): the
        # reference is TransformerLens' model processed without fold_value_biases
        moved = expected
        _, cache = heads_with_value_biases(models[0][False])
        heads = cache.stack_head_results(pos_slice=-1)
        expected = cache.logit_attrs(heads, CORRECT, WRONG, pos_slice=-1)
        assert (moved - expected).abs().max() > 1e-2  # value biases do move attribution
    assert (ours - expected).abs().max() < 1e-4
    if by == "component":  # the same through decompose_resid(apply_ln=True), projected
        applied = cache.decompose_resid(pos_slice=-1, apply_ln=True)
        direction = models[1].W_U[:, CORRECT] - models[1].W_U[:, WRONG]  # [d_model, batch]
        assert (ours - (applied * direction.T).sum(-1)).abs().max() < 1e-4


def test_text_prompts_left_padding_and_top(models):
    model = models[0][False]
    prompts = ["The cat sat on the", "Hi"]
    result = direct_logit_attribution(model, prompts, [" mat", " there"], " dog", by="head")
    tokens, mask = model.to_tokens(prompts, return_mask=True)
    logits = model(tokens, attention_mask=mask)[:, -1].detach()
    mat, there, dog = (model.tokenizer.encode(t)[0] for t in (" mat", " there", " dog"))
    expected = logits[[0, 1], [mat, there]] - logits[:, dog]
    assert (result.total - expected).abs().max() < 1e-4
    assert (result.values.sum(0) - result.total).abs().max() < 1e-4

    single = direct_logit_attribution(model, "The cat sat on the", " mat", pos=-2)
    assert single.values.dim() == 1 and single.total.dim() == 0
    assert single.target == "logit(' mat')"
    top = single.top(3)
    pairs = zip(single.labels, single.values.tolist(), strict=True)
    ranked = sorted(pairs, key=lambda p: -abs(p[1]))[:3]
    assert [label for label, _ in top] == [label for label, _ in ranked]
    assert torch.equal(single["bias"], single.values[-1])
    assert isinstance(single, Attribution) and len(single) == len(single.labels)


def test_bad_input_is_a_clear_error(models):
    model = models[0][False]
    x = random_tokens(2, 5)
    with pytest.raises(GPT2LabError, match="by must be one of"):
        direct_logit_attribution(model, x, 5, by="block")
    with pytest.raises(GPT2LabError, match="outside the vocabulary"):
        direct_logit_attribution(model, x, 50257)
    with pytest.raises(GPT2LabError, match="2 tokens"):
        direct_logit_attribution(model, x, " hello world")
    with pytest.raises(GPT2LabError, match="pos must be"):
        direct_logit_attribution(model, x, 5, pos=5)
    with pytest.raises(GPT2LabError, match="3 tokens for a batch of 2"):
        direct_logit_attribution(model, x, [1, 2, 3])
    with pytest.raises(GPT2LabError, match="prompt"):
        direct_logit_attribution(model, 42, 5)
    with pytest.raises(GPT2LabError, match="positive integer"):
        direct_logit_attribution(model, x[0], 5).top(0)
    with pytest.raises(GPT2LabError, match="no component"):
        direct_logit_attribution(model, x[0], 5)["L9H9"]
