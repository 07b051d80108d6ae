"""Vocabulary-space reads (gpt2lab.interp.vocab_space) against numpy / scipy brute force.

- neuron_vocab_stats: the full cosine matrix W_out_n . W_U_v / norms in float64 numpy,
  its moments from scipy.stats (plain kurtosis, biased moments, the Universal Neurons
  convention), on a random model (several blocks forced) and on the bundled model's
  real, tied unembedding (a slice of neurons); a hand-built prediction / suppression
  neuron (W_out row = +- one token's unembedding) is classified as such.
- key/value read-outs: numpy's sort of W_E @ w_in and w_out @ W_U.
- OV / QK top pairs: the dense circuit of a vocabulary slice in numpy, sorted.
- OV singular directions: numpy.linalg.svd of the dense W_V @ W_O (up to sign).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

import gpt2lab as gl
from gpt2lab import GPT2, GPT2Config, GPT2LabError
from gpt2lab.interp import vocab_space as vs


@pytest.fixture(scope="module")
def bundled():
    return gl.load("bundled")


@pytest.fixture(scope="module")
def small():
    cfg = GPT2Config(n_layers=2, d_model=64, n_heads=4, n_ctx=32, d_vocab=1000, d_mlp=256)
    return GPT2(cfg).init_weights(seed=0)


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def reference_stats(model, layer: int, neurons: slice = slice(None)) -> dict[str, np.ndarray]:
    W_out = np_(model.W_out[layer])[neurons]  # [n, d_model]
    W_in = np_(model.W_in[layer])[:, neurons]  # [d_model, n]
    W_U = np_(model.W_U)  # [d_model, d_vocab]
    cos = (W_out @ W_U) / np.linalg.norm(W_out, axis=1)[:, None] / np.linalg.norm(W_U, axis=0)
    return {
        "mean": cos.mean(1),
        "var": cos.var(1),
        "skew": scipy.stats.skew(cos, axis=1, bias=True),
        "kurtosis": scipy.stats.kurtosis(cos, axis=1, fisher=False, bias=True),
        "w_in_norm": np.linalg.norm(W_in, axis=0),
        "w_out_norm": np.linalg.norm(W_out, axis=1),
        "cos_in_out": (W_in.T * W_out).sum(1)
        / np.linalg.norm(W_in, axis=0)
        / np.linalg.norm(W_out, axis=1),
    }


def check_stats(stats, row: int, ref: dict[str, np.ndarray], neurons: slice = slice(None)):
    for name, want in ref.items():
        got = getattr(stats, name)[row, neurons].numpy()
        assert got.dtype == np.float64
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * scale, err_msg=name)


# ---- neuron vocabulary statistics --------------------------------------------------------
def test_stats_equal_scipy_on_a_random_model(small, monkeypatch):
    monkeypatch.setattr(vs, "STATS_BLOCK_BYTES", 4 * 1000 * 7)  # 7 neurons per block: 37 blocks
    stats = vs.neuron_vocab_stats(small)
    assert stats.layers == [0, 1] and stats.kurtosis.shape == (2, 256)
    for layer in (0, 1):
        check_stats(stats, layer, reference_stats(small, layer))
    one = vs.neuron_vocab_stats(small, layers=[1])  # a subset of layers
    assert one.layers == [1]
    torch.testing.assert_close(one.kurtosis[0], stats.kurtosis[1])
    some = vs.neuron_vocab_stats(small, layers=[1, 0], neurons=[200, 3, 17])  # a subset
    assert some.layers == [1, 0] and some.neuron_ids == [200, 3, 17]
    for name in ("mean", "skew", "kurtosis", "w_in_norm", "cos_in_out"):
        want = getattr(stats, name)[[1, 0]][:, [200, 3, 17]]
        torch.testing.assert_close(getattr(some, name), want, rtol=1e-5, atol=1e-7)


def test_stats_equal_scipy_on_the_bundled_model(bundled):
    """The real model, GPT-2's 50257 tokens, the tied unembedding (W_U = W_E^T)."""
    stats = vs.neuron_vocab_stats(bundled, layers=3)
    assert stats.layers == [3] and stats.mean.shape == (1, bundled.cfg.d_mlp)
    check_stats(stats, 0, reference_stats(bundled, 3, slice(0, 48)), slice(0, 48))


def test_stats_after_processing_read_the_processed_unembedding(small):
    processed = GPT2(small.cfg).init_weights(seed=0)
    with torch.no_grad():  # a non-trivial final LayerNorm, so folding changes W_U
        processed.ln_final.weight.uniform_(0.5, 2.0)
    processed.process_weights()
    stats = vs.neuron_vocab_stats(processed, layers=[0])
    check_stats(stats, 0, reference_stats(processed, 0))


def test_prediction_and_suppression_neurons_are_classified(small):
    # d_model 256: random cosines have sd 1/16, so one cosine of 1 in 1000 is a heavy tail
    cfg = GPT2Config(n_layers=2, d_model=256, n_heads=4, n_ctx=32, d_vocab=1000, d_mlp=64)
    model = GPT2(cfg).init_weights(seed=1)
    W_U = model.W_U  # [d_model, d_vocab], a copy
    with torch.no_grad():  # neuron 3 writes token 17's unembedding, neuron 5 minus token 40's
        model.blocks[1].mlp.c_proj.weight[:, 3] = W_U[:, 17]
        model.blocks[1].mlp.c_proj.weight[:, 5] = -W_U[:, 40]
    stats = vs.neuron_vocab_stats(model)
    ref = reference_stats(model, 1)
    kind = stats.kind(10.0)
    want = np.where(ref["kurtosis"] > 10, np.sign(ref["skew"]), 0)
    np.testing.assert_array_equal(kind[1].numpy(), want)
    assert kind[1, 3] == 1 and kind[1, 5] == -1
    assert (1, 3) in stats.neurons("prediction") and (1, 5) in stats.neurons("suppression")
    some = vs.neuron_vocab_stats(model, layers=[1], neurons=[5, 3])
    assert some.neurons("prediction") == [(1, 3)] and some.neurons("suppression") == [(1, 5)]
    assert stats.kurtosis[1, 3] > 20 and stats.skew[1, 3] > 1  # one cosine of 1, the rest ~0
    # a higher threshold admits fewer
    assert (stats.kind(1e9) == 0).all()


# ---- key / value read-outs ---------------------------------------------------------------
def expected_view(scores: np.ndarray, ids: np.ndarray, k: int):
    order = np.argsort(-scores, kind="stable")
    return ids[order[:k]].tolist(), ids[order[::-1][:k]].tolist(), scores[order[:k]]


@pytest.mark.parametrize("vocab", [None, list(range(500, 900))])
def test_key_and_value_tokens_equal_numpy(bundled, vocab):
    ids = np.arange(bundled.cfg.d_vocab) if vocab is None else np.array(vocab)
    W_E, W_U = np_(bundled.W_E)[ids], np_(bundled.W_U)[:, ids]
    key = vs.key_tokens(bundled, 2, 100, k=7, vocab=vocab)
    top, bottom, scores = expected_view(W_E @ np_(bundled.W_in[2][:, 100]), ids, 7)
    assert [t.id for t in key.top] == top and [t.id for t in key.bottom] == bottom
    np.testing.assert_allclose([t.score for t in key.top], scores, rtol=1e-4)
    assert key.top[0].token == bundled.tokenizer.decode([top[0]])
    value = vs.value_tokens(bundled, 1, 9, k=5, vocab=vocab)
    top, bottom, scores = expected_view(np_(bundled.W_out[1][9]) @ W_U, ids, 5)
    assert [t.id for t in value.top] == top and [t.id for t in value.bottom] == bottom
    np.testing.assert_allclose([t.score for t in value.top], scores, rtol=1e-4)


# ---- circuits ----------------------------------------------------------------------------
def brute_pairs(M: np.ndarray, ids: np.ndarray, k: int, largest: bool):
    flat = M.flatten() if largest else -M.flatten()
    order = np.lexsort((np.arange(flat.size), -flat))[:k]  # score, then (source, target)
    n = M.shape[1]
    return [(int(ids[i // n]), int(ids[i % n]), float(M.flat[i])) for i in order]


@pytest.mark.parametrize("largest", [True, False])
def test_ov_and_qk_top_pairs_equal_brute_force(bundled, monkeypatch, largest):
    monkeypatch.setattr(vs, "BLOCK_BYTES", 4 * 300 * 11)  # 11 source rows per block
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(bundled.cfg.d_vocab, 300, replace=False))
    layer, head = 2, 3
    W_E, W_U = np_(bundled.W_E)[ids], np_(bundled.W_U)[:, ids]
    W_Q, W_K = np_(bundled.W_Q[layer, head]), np_(bundled.W_K[layer, head])
    W_V, W_O = np_(bundled.W_V[layer, head]), np_(bundled.W_O[layer, head])
    for fn, dense in (
        (vs.ov_top_pairs, W_E @ W_V @ W_O @ W_U),
        (vs.qk_top_pairs, W_E @ W_Q @ W_K.T @ W_E.T),
    ):
        got = fn(bundled, layer, head, k=25, vocab=ids.tolist(), largest=largest)
        want = brute_pairs(dense, ids, 25, largest)
        assert [(p.source, p.target) for p in got] == [w[:2] for w in want]
        np.testing.assert_allclose([p.score for p in got], [w[2] for w in want], rtol=1e-4)
        assert got[0].source_token == bundled.tokenizer.decode([got[0].source])


def test_top_pairs_full_vocabulary_on_a_small_model(small):
    """No slice: every token of a 1000-token vocabulary, against the whole dense matrix."""
    ids = np.arange(1000)
    W_E, W_U = np_(small.W_E), np_(small.W_U)
    dense = W_E @ np_(small.W_V[1, 2]) @ np_(small.W_O[1, 2]) @ W_U
    got = vs.ov_top_pairs(small, 1, 2, k=40)
    want = brute_pairs(dense, ids, 40, True)
    assert [(p.source, p.target) for p in got] == [w[:2] for w in want]


def test_head_weights_match_the_model_views(bundled):
    for got, want in zip(vs.head_weights(bundled, 1, 2), ("W_Q", "W_K", "W_V", "W_O"), strict=True):
        torch.testing.assert_close(got, getattr(bundled, want)[1, 2].float(), rtol=0, atol=0)


def test_ov_singular_directions_equal_numpy_svd(bundled):
    layer, head = 1, 0
    dense = np_(bundled.W_V[layer, head]) @ np_(bundled.W_O[layer, head])
    U, S, Vt = np.linalg.svd(dense)
    dirs = vs.ov_singular_tokens(bundled, layer, head, n=3, k=6)
    assert [d.index for d in dirs] == [0, 1, 2]
    np.testing.assert_allclose([d.value for d in dirs], S[:3], rtol=1e-4)
    W_E, W_U = np_(bundled.W_E), np_(bundled.W_U)
    for d in dirs:
        u, v = U[:, d.index], Vt[d.index]
        sign = np.sign(v[np.abs(v).argmax()])  # the documented sign convention
        for view, scores in ((d.input, W_E @ (u * sign)), (d.output, (v * sign) @ W_U)):
            top, bottom, best = expected_view(scores, np.arange(scores.size), 6)
            assert [t.id for t in view.top] == top and [t.id for t in view.bottom] == bottom
            np.testing.assert_allclose([t.score for t in view.top], best, rtol=1e-3)
    # more directions than the rank: the rank (d_head) many
    assert len(vs.ov_singular_tokens(bundled, 0, 0, n=1000, k=1)) == bundled.cfg.d_head


# ---- bad inputs --------------------------------------------------------------------------
BAD = [
    (lambda m: vs.neuron_vocab_stats(m, layers=4), "layer must be an integer in [0, 3]"),
    (lambda m: vs.neuron_vocab_stats(m, layers=[]), "layers must be None, a layer"),
    (lambda m: vs.neuron_vocab_stats(m, layers="0"), "layers must be None, a layer"),
    (lambda m: vs.neuron_vocab_stats(m, neurons=[]), "neurons must be None or a non-empty"),
    (lambda m: vs.neuron_vocab_stats(m, neurons=[1024]), "neuron must be an integer in [0, 1023]"),
    (lambda m: vs.key_tokens(m, -1, 0), "layer must be an integer in [0, 3]"),
    (lambda m: vs.key_tokens(m, 0, 1024), "neuron must be an integer in [0, 1023]"),
    (lambda m: vs.value_tokens(m, 0, True), "neuron must be an integer"),
    (lambda m: vs.value_tokens(m, 0, 0, k=0), "k must be an integer >= 1"),
    (lambda m: vs.value_tokens(m, 0, 0, vocab=[]), "vocab must be a non-empty list"),
    (lambda m: vs.value_tokens(m, 0, 0, vocab=[50257]), "vocab must be a non-empty list"),
    (lambda m: vs.ov_top_pairs(m, 0, 4), "head must be an integer in [0, 3]"),
    (lambda m: vs.qk_top_pairs(m, 0, 0, k=0, vocab=[1, 2]), "k must be an integer >= 1"),
    (lambda m: vs.qk_top_pairs(m, 0, 0, vocab=[1], largest=1), "largest must be True or False"),
    (lambda m: vs.ov_singular_tokens(m, 0, 0, n=0), "n must be an integer >= 1"),
    (lambda m: tiny_stats().kind("10"), "kurtosis_threshold must be"),
    (lambda m: tiny_stats().neurons("both"), "kind must be 'prediction' or 'suppression'"),
]


def tiny_stats() -> vs.NeuronVocabStats:
    one = torch.zeros(1, 2, dtype=torch.float64)
    return vs.NeuronVocabStats([0], *[one] * 7)


@pytest.mark.parametrize("call, message", BAD)
def test_bad_inputs_are_one_line_errors(bundled, call, message):
    with pytest.raises(GPT2LabError) as info:
        call(bundled)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_quantized_models_are_refused():
    model = gl.load("bundled", quantize="int8")
    for call in (
        lambda: vs.neuron_vocab_stats(model),
        lambda: vs.value_tokens(model, 0, 0),
        lambda: vs.ov_top_pairs(model, 0, 0, vocab=[1, 2]),
    ):
        with pytest.raises(GPT2LabError, match="unquantized model"):
            call()
