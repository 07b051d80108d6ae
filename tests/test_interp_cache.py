"""ActivationCache analyses (accumulated_resid, decompose_resid, stack_head_results,
stack_neuron_results, apply_ln_to_stack, logit_attrs) against transformer-lens 3.x's
ActivationCache, on caches of the same weights, unprocessed and processed."""

from __future__ import annotations

import warnings

import pytest
import torch
from tl_reference import hooked_transformer

import gpt2lab as gl
from gpt2lab.errors import GPT2LabError


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=[False, True], ids=["unprocessed", "processed"])
def caches(request, small_ckpt):
    """(our cache, TransformerLens' cache) of one batch; TL caches hook_result, ours does not,
    so our head analyses compute it from hook_z."""
    original = gl.load(small_ckpt)
    ours = gl.load(small_ckpt, process=True) if request.param else original
    ref = hooked_transformer(original, processed=request.param, use_attn_result=True)
    x = random_tokens(3, 9)
    with torch.no_grad():
        _, cache = ours.run_with_cache(x)
        _, ref_cache = ref.run_with_cache(x)
    assert "blocks.0.attn.hook_result" not in cache
    return cache, ref_cache


def same(ours, ref, tol: float = 1e-4) -> None:
    if isinstance(ref, tuple):
        assert ours[1] == ref[1]  # labels
        ours, ref = ours[0], ref[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < tol


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(layer=1, incl_mid=True, return_labels=True),
        dict(apply_ln=True, return_labels=True),
        dict(layer=1, mlp_input=True, apply_ln=True, return_labels=True),
        dict(layer=-1, incl_mid=True, apply_ln=True, pos_slice=-1),
        dict(pos_slice=(2, 5), apply_ln=True, layer=2),
        dict(layer=0, pos_slice=[0, 4], apply_ln=True, return_labels=True),
    ],
)
def test_accumulated_resid(caches, kwargs):
    cache, ref = caches
    same(cache.accumulated_resid(**kwargs), ref.accumulated_resid(**kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(layer=1, mlp_input=True, return_labels=True),
        dict(mode="attn", apply_ln=True, return_labels=True),
        dict(mode="mlp", incl_embeds=False, apply_ln=True, pos_slice=-1, return_labels=True),
        dict(layer=1, mlp_input=True, apply_ln=True, pos_slice=(1, 8, 3)),
        dict(layer=0, return_labels=True),
    ],
)
def test_decompose_resid(caches, kwargs):
    cache, ref = caches
    same(cache.decompose_resid(**kwargs), ref.decompose_resid(**kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(layer=1, return_labels=True, incl_remainder=True),
        dict(apply_ln=True, pos_slice=-1, return_labels=True, incl_remainder=True),
        dict(layer=2, apply_ln=True, pos_slice=[2, 3]),
    ],
)
def test_stack_head_results_from_hook_z(caches, kwargs):
    cache, ref = caches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TL logs that its results were cached already
        same(cache.stack_head_results(**kwargs), ref.stack_head_results(**kwargs))


def test_compute_head_results_matches_hooked_result(caches):
    cache, ref = caches
    cache.compute_head_results()
    for layer in range(2):
        same(cache["result", layer], ref["result", layer])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(layer=2),
        dict(layer=1, return_labels=True, incl_remainder=True),
        dict(
            layer=-1,
            apply_ln=True,
            pos_slice=-1,
            neuron_slice=[3, 7, 9],
            return_labels=True,
            incl_remainder=True,
        ),  # fmt: skip
        dict(layer=2, neuron_slice=(10, 20), pos_slice=(1, 4), apply_ln=True, return_labels=True),
    ],
)
def test_stack_neuron_results(caches, kwargs):
    cache, ref = caches
    same(cache.stack_neuron_results(**kwargs), ref.stack_neuron_results(**kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(layer=1),
        dict(layer=1, mlp_input=True),
        dict(layer=None, batch_slice=(1, 3)),
        dict(layer=2, recompute_ln=True),
    ],
)
def test_apply_ln_to_stack(caches, kwargs):
    cache, ref = caches
    stack, ref_stack = cache.decompose_resid(), ref.decompose_resid()
    same(cache.apply_ln_to_stack(stack, **kwargs), ref.apply_ln_to_stack(ref_stack, **kwargs))


def test_apply_ln_to_stack_without_batch_dim(small_ckpt):
    model = gl.load(small_ckpt)
    ref_model = hooked_transformer(model)
    x = random_tokens(1, 6, seed=5)
    with torch.no_grad():
        cache = model.run_with_cache(x)[1].remove_batch_dim()
        ref = ref_model.run_with_cache(x)[1].remove_batch_dim()
    kwargs = dict(layer=1, apply_ln=True, pos_slice=(0, 4), return_labels=True)
    same(cache.decompose_resid(**kwargs), ref.decompose_resid(**kwargs))
    same(cache.accumulated_resid(apply_ln=True), ref.accumulated_resid(apply_ln=True))


def test_logit_attrs(caches):
    cache, ref = caches
    processed = getattr(cache.model, "processing", None) is not None
    correct, wrong = torch.tensor([5, 17, 300]), torch.tensor([9, 4, 1000])
    stack, ref_stack = cache.decompose_resid(pos_slice=-1), ref.decompose_resid(pos_slice=-1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = cache.logit_attrs(stack, correct, wrong, pos_slice=-1)
    # an unprocessed model's ln_final weight and bias are left out, and the user is told
    assert any("ln_final" in str(w.message) for w in caught) != processed
    same(ours, ref.logit_attrs(ref_stack, correct, wrong, pos_slice=-1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        the = 262  # GPT-2's id for " the" (the reference model has no tokenizer)
        ours = cache.logit_attrs(stack, " the", pos_slice=-1)
        same(ours, ref.logit_attrs(ref_stack, the, pos_slice=-1))
        full, ref_full = cache.decompose_resid(), ref.decompose_resid()
        x = random_tokens(3, 9)  # a token per batch row and position
        same(cache.logit_attrs(full[:, 1:], x[1:], batch_slice=(1, None)),
             ref.logit_attrs(ref_full[:, 1:], x[1:], batch_slice=(1, None)))  # fmt: skip


def test_bad_analysis_arguments_are_clear_errors(caches, small_ckpt):
    cache, _ = caches
    stack = cache.decompose_resid(pos_slice=-1)
    with pytest.raises(GPT2LabError, match="mode"):
        cache.decompose_resid(mode="heads")
    with pytest.raises(GPT2LabError, match="layer must be"):
        cache.accumulated_resid(layer=3)
    with pytest.raises(GPT2LabError, match="mlp_input"):
        cache.decompose_resid(layer=None, mlp_input=True)
    with pytest.raises(GPT2LabError, match="d_model"):
        cache.apply_ln_to_stack(stack[..., :10])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(GPT2LabError, match="2 tokens"):
            cache.logit_attrs(stack, " hello world", pos_slice=-1)
        with pytest.raises(GPT2LabError, match="vocabulary|in \\[0"):
            cache.logit_attrs(stack, 50257, pos_slice=-1)
        with pytest.raises(GPT2LabError, match="same shape"):
            cache.logit_attrs(stack, torch.tensor([1, 2, 3]), 4, pos_slice=-1)
    _, partial = gl.load(small_ckpt).run_with_cache(random_tokens(1, 4), names_filter="hook_embed")
    with pytest.raises(GPT2LabError, match="not cached"):
        partial.decompose_resid()
