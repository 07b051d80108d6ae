"""Scoring against transformers' GPT2LMHeadModel on the same random weights (n_ctx 64).

Every reference below is computed with transformers (or closed-form math), written out
here independently of gpt2lab.scoring.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import hf_model

import gpt2lab as gl
from gpt2lab.scoring import token_logprobs

N_CTX = 64
EOT = 50256
TEXT = "The unbelievably quixotic cat sat.\n\nIt purred!"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = hf_model(seed=11, n_positions=N_CTX)
    path = tmp_path_factory.mktemp("scoring_ckpt")
    hf.save_pretrained(path)
    return gl.load(path), hf


def random_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, from one transformers forward pass."""
    logits = hf(torch.tensor([ids[:-1]])).logits[0].float()  # the last token is only a target
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@torch.no_grad()
def hf_sliding_window_ppl(hf, ids: list[int], max_length: int, stride: int):
    """The loop of HF's "Perplexity of fixed-length models", token-weighted exactly."""
    input_all = torch.tensor([ids])
    seq_len = input_all.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = input_all[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        loss = hf(input_ids, labels=target_ids).loss
        n_valid = int((target_ids[:, 1:] != -100).sum())  # the loss shifts labels by one
        if n_valid:
            nll_sum += loss.item() * n_valid
            n_tokens += n_valid
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), nll_sum, n_tokens


# ---- perplexity ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stride, n_windows",
    [(64, 4), (32, 7), (24, 8)],  # like 1024/1024, 1024/512, and a stride that does not divide
)
def test_perplexity_equals_hf_sliding_window(pair, stride, n_windows):
    ours, hf = pair
    ids = random_ids(230, seed=stride)
    # bos=False: the tokens as given, HF's guide exactly
    ppl, nll_sum, n_tokens = ours.perplexity(ids, stride=stride, bos=False, return_details=True)
    ref_ppl, ref_nll, ref_n = hf_sliding_window_ppl(hf, ids, N_CTX, stride)
    print(f"stride {stride}: ppl {ppl:.6g} vs transformers {ref_ppl:.6g}, {n_tokens} tokens")
    assert n_tokens == ref_n
    # disjoint windows never predict each window's first token; overlapping ones only the text's
    assert n_tokens == (230 - n_windows if stride == N_CTX else 229)
    assert math.isclose(ppl, ref_ppl, rel_tol=1e-4)
    assert math.isclose(nll_sum, ref_nll, rel_tol=1e-5)
    assert isinstance(ours.perplexity(ids, stride=stride, bos=False), float)
    # the default (bos=True): HF's loop over [EOT] + ids, so the first token counts too
    ppl_bos, nll_bos, n_bos = ours.perplexity(ids, stride=stride, return_details=True)
    ref_bos, ref_nll_bos, ref_n_bos = hf_sliding_window_ppl(hf, [EOT, *ids], N_CTX, stride)
    assert n_bos == ref_n_bos
    assert math.isclose(ppl_bos, ref_bos, rel_tol=1e-4)
    assert math.isclose(nll_bos, ref_nll_bos, rel_tol=1e-5)


def test_perplexity_of_text_with_bos_and_max_length(pair):
    ours, hf = pair
    text = " ".join(["the quixotic cat sat on a mat and purred, then slept."] * 12)
    ids = ours.tokenizer.encode(text)
    assert len(ids) > 2 * N_CTX
    ppl, _, n = gl.scoring.perplexity(
        ours, text, stride=16, max_length=40, bos=False, return_details=True
    )
    ref_ppl, _, ref_n = hf_sliding_window_ppl(hf, ids, 40, 16)
    assert n == ref_n == len(ids) - 1
    assert math.isclose(ppl, ref_ppl, rel_tol=1e-4)
    # bos=True (the default): the same loop over [EOT] + ids, the first token predicted too
    ppl_bos, _, n_bos = ours.perplexity(text, stride=16, max_length=40, return_details=True)
    ref_bos, _, ref_n_bos = hf_sliding_window_ppl(hf, [EOT, *ids], 40, 16)
    assert n_bos == ref_n_bos == len(ids)
    assert math.isclose(ppl_bos, ref_bos, rel_tol=1e-4)


def test_short_text_perplexity_is_exp_mean_nll(pair):
    ours, hf = pair
    ids = random_ids(20, seed=3)
    expected = math.exp(-hf_logprobs(hf, [EOT, *ids]).double().mean().item())
    assert math.isclose(ours.perplexity(torch.tensor(ids)), expected, rel_tol=1e-5)
    expected = math.exp(-hf_logprobs(hf, ids).double().mean().item())
    assert math.isclose(ours.perplexity(torch.tensor(ids), bos=False), expected, rel_tol=1e-5)


# ---- score / surprisal --------------------------------------------------------------------
def test_score_logprobs_and_surprisal_match_transformers(pair):
    ours, hf = pair
    s = ours.score(TEXT)
    ids = ours.tokenizer.encode(TEXT)
    ref = hf_logprobs(hf, [EOT, *ids])  # bos=True: every real token is predicted
    assert s.tokens == ids
    assert s.strings[:4] == ["The", " unbelievably", " qu", "ix"]
    assert (torch.tensor(s.logprobs) - ref).abs().max().item() < 1e-5
    assert s.surprisal == pytest.approx((-ref / math.log(2)).tolist(), abs=1e-5)
    assert s.total_logprob == pytest.approx(ref.sum().item(), abs=1e-4)

    plain = ours.score(TEXT, bos=False)  # the first token is context only
    assert math.isnan(plain.logprobs[0])
    ref_plain = hf_logprobs(hf, ids)
    assert (torch.tensor(plain.logprobs[1:]) - ref_plain).abs().max().item() < 1e-5
    assert plain.total_logprob == pytest.approx(ref_plain.sum().item(), abs=1e-4)


def test_word_surprisal_sums_its_tokens(pair):
    ours, _ = pair
    s = ours.score(TEXT)
    # tokens: The| unbelievably| qu|ix|otic| cat| sat|.|\n|\n|It| pur|red|!
    bits = s.surprisal
    expected = [
        ("The", [0]),
        (" unbelievably", [1]),
        (" quixotic", [2, 3, 4]),
        (" cat", [5]),
        (" sat.", [6, 7]),
        ("\n\nIt", [8, 9, 10]),
        (" purred!", [11, 12, 13]),
    ]
    words = s.words()
    assert [w.text for w in words] == [text for text, _ in expected]
    for word, (_, index) in zip(words, expected, strict=True):
        assert (word.start, word.end) == (index[0], index[-1] + 1)
        assert word.surprisal == pytest.approx(sum(bits[i] for i in index), abs=1e-4)
        assert word.logprob == pytest.approx(sum(s.logprobs[i] for i in index), abs=1e-4)
    split = [w.text for w in s.words(split_punctuation=True)]
    assert split == [
        "The",
        " unbelievably",
        " quixotic",
        " cat",
        " sat",
        ".",
        "\n\nIt",
        " purred",
        "!",
    ]


def test_score_beyond_context_uses_the_most_context_each_token_can_have(pair):
    ours, hf = pair
    ids = random_ids(150, seed=7)
    stride = 16
    s = ours.score(ids, stride=stride)  # bos=True: sequence [EOT] + ids, 151 tokens
    seq = [EOT, *ids]
    assert len(s.logprobs) == 150 and not any(math.isnan(x) for x in s.logprobs)
    # Independent rule: token t is predicted from seq[b:t], b the smallest multiple of
    # the stride with t < b + N_CTX (so at least N_CTX - stride tokens of context).
    ref = []
    for t in range(1, len(seq)):
        b = max(0, math.ceil((t - N_CTX + 1) / stride) * stride)
        assert t - b >= N_CTX - stride or b == 0
        ref.append(hf_logprobs(hf, seq[b : t + 1])[-1].item())
    assert (torch.tensor(s.logprobs) - torch.tensor(ref)).abs().max().item() < 1e-5


# ---- multiple choice ----------------------------------------------------------------------
@torch.no_grad()
def hf_option(hf, tok, context: str, option: str, bos: bool = True):
    """One option alone, unbatched: lm-eval's split, then a plain transformers forward."""
    n = len(context) - len(context.rstrip())
    if n:
        context, option = context[:-n], context[-n:] + option
    ctx = tok.encode(context)
    cont = tok.encode(context + option)[len(ctx) :]
    ids = ([EOT] if bos or not ctx else []) + ctx + cont
    logits = hf(torch.tensor([ids])).logits[0, -len(cont) - 1 : -1].float()
    lp = logits.log_softmax(-1).gather(-1, torch.tensor(cont)[:, None])[:, 0]
    return lp.sum().item(), bool((logits.argmax(-1) == torch.tensor(cont)).all())


@pytest.mark.parametrize("bos", [True, False])
def test_choose_matches_per_option_transformers(pair, bos):
    ours, hf = pair
    context = "The capital of France is"
    # make one option the model's own greedy continuation, so is_greedy is True once
    with torch.no_grad():
        ctx = ([EOT] if bos else []) + ours.tokenizer.encode(context)
        first = int(hf(torch.tensor([ctx])).logits[0, -1].argmax())
    greedy = ours.tokenizer.decode([first])
    options = [" Paris", " a city in Europe, of course", " London", greedy]
    result = ours.choose(context, options, bos=bos)
    for i, option in enumerate(options):
        ll, is_greedy = hf_option(hf, ours.tokenizer, context, option, bos)
        assert math.isclose(result.loglikelihoods[i], ll, rel_tol=1e-4, abs_tol=1e-4)
        assert result.is_greedy[i] == is_greedy
    if ours.tokenizer.encode(context + greedy)[-1:] == [first]:
        assert result.is_greedy[-1]
    lls = result.loglikelihoods
    assert result.best == max(range(4), key=lambda i: lls[i])
    assert result.best_norm == max(range(4), key=lambda i: lls[i] / len(options[i]))
    # lm-eval moves the context's trailing space onto the option: same tokens, same scores
    moved = ours.choose(context + " ", [o.removeprefix(" ") for o in options[:3]], bos=bos)
    assert moved.loglikelihoods == pytest.approx(lls[:3], abs=1e-4)


def test_choose_best_and_best_norm_on_a_uniform_model(pair):
    """Zero weights give uniform next-token probabilities: every token costs ln(50257)."""
    ours, _ = pair
    uniform = gl.GPT2(ours.cfg)
    with torch.no_grad():
        for p in uniform.parameters():
            p.zero_()
    options = [" cat", " catastrophically", " the the the"]  # 1, 3 and 3 tokens
    result = uniform.choose("Pick one:", options)
    log_v = math.log(50257)
    assert result.n_tokens == [1, 3, 3]
    assert result.loglikelihoods == pytest.approx([-log_v, -3 * log_v, -3 * log_v], rel=1e-6)
    assert result.best == 0  # fewest tokens
    assert result.best_norm == 1  # -3 ln V / 17 characters beats -ln V / 4 and -3 ln V / 12
    assert uniform.choose("Pick one:", ["!", " cat"]).is_greedy == [True, False]  # ties: id 0


def test_choose_left_truncates_a_context_longer_than_the_model(pair):
    ours, hf = pair
    context = " ".join(["word"] * 100)
    result = ours.choose(context, [" end", " of the line"])
    for i, option in enumerate([" end", " of the line"]):
        ids = [EOT, *ours.tokenizer.encode(context + option)]
        cont = ours.tokenizer.encode(option)
        ids = ids[-(N_CTX + 1) :]  # lm-eval keeps the last n_ctx + 1 tokens
        ref = hf_logprobs(hf, ids)[-len(cont) :].sum().item()
        assert math.isclose(result.loglikelihoods[i], ref, rel_tol=1e-4)


def test_token_logprobs_are_float32_for_a_bf16_model(pair):
    ours, hf = pair
    low = gl.GPT2(ours.cfg)
    low.load_state_dict(ours.state_dict())
    low = low.to(torch.bfloat16)
    ids = ours.tokenizer.encode(TEXT)
    (lp,), _ = token_logprobs(low, [[EOT]], [ids])
    assert lp.dtype == torch.float32
    ref = hf_logprobs(hf, [EOT, *ids])
    assert (lp - ref).abs().max().item() < 0.5  # bf16 weights, but no bf16 softmax rounding


# ---- bad input ----------------------------------------------------------------------------
def test_one_token_has_a_perplexity_with_the_default_bos(pair):
    ours, hf = pair
    (token,) = ours.tokenizer.encode("Hi")
    expected = math.exp(-hf_logprobs(hf, [EOT, token]).item())
    assert math.isclose(ours.perplexity("Hi"), expected, rel_tol=1e-5)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda m: m.choose("context", []), "options"),
        (lambda m: m.choose("context", "abc"), "options"),
        (lambda m: m.choose("context", [" a", ""]), "empty"),
        (lambda m: m.perplexity("some text here", stride=0), "stride"),
        (lambda m: m.perplexity("some text here", stride=-4), "stride"),
        (lambda m: m.perplexity("some text here", stride=N_CTX + 1), "stride"),
        (lambda m: m.perplexity("some text here", max_length=20, stride=21), "stride"),
        (lambda m: m.perplexity("some text here", max_length=N_CTX + 1), "max_length"),
        (lambda m: m.perplexity(""), "empty"),
        (lambda m: m.perplexity([]), "empty"),
        (lambda m: m.perplexity("Hi", bos=False), "two tokens with bos=False"),
        (lambda m: m.perplexity([1, 2, 99999]), "token ids"),
        (lambda m: m.score("", bos=True), "empty"),
        (lambda m: m.score("x " * 100, stride=N_CTX), "stride"),
        (lambda m: m.perplexity(b"some bytes here"), "bytes"),
        (lambda m: m.score(bytearray(b"some bytes")), "bytes"),
        (lambda m: m.perplexity([1, 2.5, 3]), "integers"),
        (lambda m: m.perplexity([1, True, 3]), "integers"),
        (lambda m: m.perplexity(torch.tensor([1.0, 2.0, 3.0])), "integers"),
        (lambda m: m.perplexity({1: 2, 3: 4}), "dict"),
        (lambda m: m.perplexity("some text here", stride=True), "stride"),
        (lambda m: m.perplexity("some text here", bos="no"), "bos"),
        (lambda m: m.perplexity("some text here", return_details="yes"), "return_details"),
        (lambda m: m.choose("context", [" a"], bos=1), "bos"),
        (lambda m: m.perplexity("some text here", progress="no"), "progress must be True or False"),
        (lambda m: m.perplexity("some text here", progress=None), "progress must be True or False"),
        (lambda m: m.score("some text here", progress=1), "progress must be True or False"),
        (lambda m: m.score("some text here", progress="false"), "progress must be True or False"),
    ],
)
def test_bad_input_raises_one_clear_error(pair, call, words):
    ours, _ = pair
    with pytest.raises(gl.GPT2LabError, match=words) as err:
        call(ours)
    assert "\n" not in str(err.value)


def test_token_ids_in_every_accepted_form_score_the_same(pair):
    """str, list, tuple, range, a numpy array and 1-D / [1, pos] integer tensors."""
    import numpy as np

    ours, _ = pair
    ids = ours.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    expected = ours.perplexity(ids)
    assert ours.perplexity("The quick brown fox jumps over the lazy dog") == expected
    for form in (tuple(ids), np.array(ids), torch.tensor(ids), torch.tensor([ids]),
                 torch.tensor(ids, dtype=torch.int32)):  # fmt: skip
        assert ours.perplexity(form) == expected
    assert ours.perplexity(range(100, 110)) == ours.perplexity(list(range(100, 110)))
