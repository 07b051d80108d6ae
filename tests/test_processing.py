"""Weight processing (fold LayerNorms, centre writing weights and the unembedding, fold
value biases) against transformer-lens 3.x's own processing of the same weights."""

from __future__ import annotations

import copy
import tempfile
import warnings

import pytest
import torch
from tl_reference import hooked_transformer, tl_config

import gpt2lab as gl
from gpt2lab.errors import GPT2LabError
from gpt2lab.quantize import quantize

ALL = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))


def tl_processed(model, **flags):
    """A HookedTransformer processed by TransformerLens with exactly `flags`."""
    import transformers
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    cfg = tl_config(model.cfg)
    with tempfile.TemporaryDirectory() as d:
        model.save(d)
        hf = transformers.GPT2LMHeadModel.from_pretrained(d, attn_implementation="eager")
    state = convert_gpt2_weights(hf, cfg)
    if flags["fold_ln"]:
        cfg.normalization_type = "LNPre"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = HookedTransformer(cfg)
        ref.load_and_process_state_dict(state, **flags)
    return ref.eval()


@pytest.fixture(scope="module")
def original(small_ckpt):
    return gl.load(small_ckpt)


@pytest.fixture(scope="module")
def processed(small_ckpt):
    return gl.load(small_ckpt, process=True)


@pytest.fixture(scope="module")
def references(original):
    """TransformerLens models on the same weights: {False: unprocessed, True: processed}."""
    return {
        p: hooked_transformer(original, processed=p, use_attn_result=True) for p in (False, True)
    }


def assert_close(ours: torch.Tensor, ref: torch.Tensor, name: str, tol: float = 1e-4) -> None:
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(ours), finite), name  # masked scores: -inf on both sides
    diff = (ours[finite] - ref[finite]).abs().max().item()
    assert diff < tol, f"{name}: max |diff| {diff:.2e}"


@torch.no_grad()
@pytest.mark.parametrize("is_processed", [False, True], ids=["unprocessed", "processed"])
def test_every_hook_matches_transformer_lens(original, processed, references, is_processed):
    ours, ref = (processed if is_processed else original), references[is_processed]
    x = random_tokens(3, 12)
    names = ours.hook_names()
    logits, cache = ours.run_with_cache(x, names_filter=names)
    ref_logits, ref_cache = ref.run_with_cache(x)
    assert set(names) <= set(ref_cache)
    for name in names:
        assert_close(cache[name], ref_cache[name], name)
    assert_close(logits.log_softmax(-1), ref_logits.log_softmax(-1), "log_softmax")
    assert_close(logits, ref_logits, "logits")


def test_processed_weights_match_transformer_lens(processed, references):
    ref = references[True]
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "b_in",
                 "W_out", "b_out", "W_E", "W_pos", "W_U", "b_U"):  # fmt: skip
        assert_close(getattr(processed, name), getattr(ref, name).detach(), name, tol=1e-5)
    for ln in [processed.ln_final, *(b.ln1 for b in processed.blocks)]:
        assert torch.equal(ln.weight, torch.ones_like(ln.weight))
        assert torch.equal(ln.bias, torch.zeros_like(ln.bias))
    assert processed.processing == ALL


@torch.no_grad()
@pytest.mark.parametrize("option", list(ALL))
def test_each_option_alone_matches_transformer_lens(original, option):
    flags = {name: name == option for name in ALL}
    ours = copy.deepcopy(original).process_weights(**flags)
    ref = tl_processed(original, **flags)
    x = random_tokens(2, 9, seed=3)
    assert_close(ours(x), ref(x), f"logits with {option} only")
    assert_close(ours(x).log_softmax(-1), original(x).log_softmax(-1), "log-probs preserved")


@torch.no_grad()
def test_log_probs_preserved_left_padded_and_with_kv_cache(original, processed):
    prompts = ["Once upon a time there was a", "Hi"]
    tokens, mask = original.to_tokens(prompts, return_mask=True)
    before = original(tokens, attention_mask=mask)
    after = processed(tokens, attention_mask=mask)
    assert_close(after.log_softmax(-1), before.log_softmax(-1), "left-padded log-probs")
    # centring the unembedding moves every logit of a position by the same amount
    shift = after - before
    assert_close(shift, shift.mean(-1, keepdim=True).expand_as(shift), "constant shift")

    greedy = dict(max_new_tokens=5, return_result=True)
    ref, ours = original.generate(prompts, **greedy), processed.generate(prompts, **greedy)
    assert ours.tokens == ref.tokens
    for a, b in zip(ours.logprobs, ref.logprobs, strict=True):
        assert_close(torch.tensor(a), torch.tensor(b), "generation log-probs")


@torch.no_grad()
def test_ln_free_model_processing_preserves_log_probs(original):
    ln_free = gl.GPT2(original.cfg.with_(ln_free=True))  # LayerNorms with a fixed scale of 1
    ln_free.load_state_dict(original.state_dict())
    x = random_tokens(2, 10, seed=4)
    before = ln_free(x).log_softmax(-1)
    ln_free.process_weights()
    assert_close(ln_free(x).log_softmax(-1), before, "ln-free log-probs")


def test_load_process_equals_process_weights(small_ckpt, original, processed):
    by_hand = copy.deepcopy(original).process_weights()
    assert by_hand.state_dict().keys() == processed.state_dict().keys()
    for name, value in by_hand.state_dict().items():
        assert torch.equal(value, processed.state_dict()[name]), name
    assert getattr(original, "processing", None) is None
    both = gl.load(small_ckpt, process=True, quantize="int8")
    assert both.processing == ALL and "Int8Linear" in repr(both)


def test_bad_processing_requests_are_clear_errors(small_ckpt, original, processed, tmp_path):
    with pytest.raises(GPT2LabError, match="already processed"):
        copy.deepcopy(processed).process_weights()
    with pytest.raises(GPT2LabError, match="quantized"):
        quantize(copy.deepcopy(original), "int8").process_weights()
    with pytest.raises(GPT2LabError, match="fold_ln must be True or False"):
        copy.deepcopy(original).process_weights(fold_ln="yes")
    with pytest.raises(GPT2LabError, match="cannot save a processed model"):
        processed.save(tmp_path / "out")
    with pytest.raises(GPT2LabError, match="process must be True or False"):
        gl.load(small_ckpt, process=1)


@pytest.mark.slow
@torch.no_grad()
def test_gpt2_medium_size_processing_matches_transformer_lens(tmp_path):
    from conftest import hf_model

    from gpt2lab.interp import direct_logit_attribution

    hf_model(seed=3, n_layer=24, n_embd=1024, n_head=16, n_positions=1024,
             initializer_range=0.02).save_pretrained(tmp_path)  # fmt: skip
    original = gl.load(tmp_path)
    ref = hooked_transformer(original, processed=True)
    processed = gl.load(tmp_path, process=True)
    x = random_tokens(1, 64, seed=7)
    logits, ref_logits = processed(x), ref(x)
    assert_close(logits, ref_logits, "gpt2-medium-size processed logits")
    assert_close(logits.log_softmax(-1), original(x).log_softmax(-1), "log-probs preserved")
    result = direct_logit_attribution(processed, x, 5, 9, by="neuron")
    expected = ref_logits[0, -1, 5] - ref_logits[0, -1, 9]
    assert len(result) == 2 + 24 * (1 + 4096) + 1
    assert abs(result.values.sum().item() - expected.item()) < 1e-3
