"""Logits processors against transformers' own, penalties against numpy, sampling by chi-square."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gpt2lab.errors import GPT2LabError
from gpt2lab.generation import processors as P

lp = pytest.importorskip("transformers.generation.logits_process")

BATCH, VOCAB, SEQ, EOS = 3, 50, 12, 7


def make_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (input_ids, scores). Seeds differ in how peaked the logits are and how small
    the alphabet of the ids is (small alphabets make n-grams and banned sequences recur)."""
    scale, alphabet = [(2.0, VOCAB), (0.5, 6), (5.0, 3)][seed]
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(BATCH, VOCAB, generator=g) * scale
    input_ids = torch.randint(0, alphabet, (BATCH, SEQ), generator=g)
    return input_ids, scores


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs)), "filtered sets differ"
    assert not torch.isneginf(ours).all(dim=-1).any(), "a row lost every token"
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, theirs)  # the logits themselves (inf positions exact)


def case(ours, theirs, id):
    return pytest.param(ours, theirs, id=id)


BANNED = [[1, 2], [0, 1], [2, 2, 1], [EOS], [5], [1, 0, 2, 1], [3] * 14, [2, 49]]

CASES = [
    *[
        case(
            lambda t=t: P.TemperatureWarper(t),
            lambda t=t: lp.TemperatureLogitsWarper(t),
            f"temp{t}",
        )
        for t in (0.3, 0.7, 1.5, 3.0)
    ],
    *[
        case(
            lambda k=k, m=m: P.TopKWarper(k, min_tokens_to_keep=m),
            lambda k=k, m=m: lp.TopKLogitsWarper(k, min_tokens_to_keep=m),
            f"topk{k}-keep{m}",
        )
        for k, m in [(1, 1), (5, 1), (20, 1), (3, 6), (60, 1)]
    ],
    *[
        case(
            lambda p=p, m=m: P.TopPWarper(p, min_tokens_to_keep=m),
            lambda p=p, m=m: lp.TopPLogitsWarper(p, min_tokens_to_keep=m),
            f"topp{p}-keep{m}",
        )
        for p, m in [(0.05, 1), (0.5, 1), (0.9, 1), (0.95, 3), (0.3, 8), (1.0, 1)]
    ],
    *[
        case(
            lambda p=p, m=m: P.MinPWarper(p, min_tokens_to_keep=m),
            lambda p=p, m=m: lp.MinPLogitsWarper(p, min_tokens_to_keep=m),
            f"minp{p}-keep{m}",
        )
        for p, m in [(0.02, 1), (0.1, 1), (0.3, 1), (0.5, 5), (1.0, 1)]
    ],
    *[
        case(
            lambda p=p, m=m: P.TypicalWarper(p, min_tokens_to_keep=m),
            lambda p=p, m=m: lp.TypicalLogitsWarper(p, min_tokens_to_keep=m),
            f"typical{p}-keep{m}",
        )
        for p, m in [(0.2, 1), (0.5, 1), (0.9, 1), (0.99, 1), (0.4, 6)]
    ],
    *[
        case(
            lambda e=e, m=m: P.EpsilonWarper(e, min_tokens_to_keep=m),
            lambda e=e, m=m: lp.EpsilonLogitsWarper(e, min_tokens_to_keep=m),
            f"epsilon{e}-keep{m}",
        )
        for e, m in [(1e-3, 1), (0.01, 1), (0.03, 1), (0.1, 4), (0.5, 1)]
    ],
    *[
        case(
            lambda e=e, m=m: P.EtaWarper(e, min_tokens_to_keep=m),
            lambda e=e, m=m: lp.EtaLogitsWarper(e, min_tokens_to_keep=m),
            f"eta{e}-keep{m}",
        )
        for e, m in [(1e-3, 1), (0.01, 1), (0.05, 1), (0.3, 4), (0.9, 1)]
    ],
    *[
        case(
            lambda r=r: P.RepetitionPenalty(r),
            lambda r=r: lp.RepetitionPenaltyLogitsProcessor(r),
            f"repetition{r}",
        )
        for r in (0.7, 1.2, 2.0)
    ],
    case(
        lambda: P.RepetitionPenalty(1.5, ignore_prefix=4),
        lambda: lp.RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=4),
        "repetition-ignore4",
    ),
    case(
        lambda: P.RepetitionPenalty(1.5, ignore_prefix=torch.tensor([0, 3, 9])),
        lambda: lp.RepetitionPenaltyLogitsProcessor(
            1.5, prompt_ignore_length=torch.tensor([0, 3, 9])
        ),
        "repetition-ignore-rows",
    ),
    *[
        case(
            lambda n=n: P.NoRepeatNGram(n),
            lambda n=n: lp.NoRepeatNGramLogitsProcessor(n),
            f"ngram{n}",
        )
        for n in (1, 2, 3, 4, SEQ + 1)
    ],
    case(
        lambda: P.BannedSequences(BANNED, EOS),
        lambda: lp.NoBadWordsLogitsProcessor(BANNED, EOS),
        "banned",
    ),
    case(
        lambda: P.BannedSequences([[9], [40]]),
        lambda: lp.NoBadWordsLogitsProcessor([[9], [40]]),
        "banned-single",
    ),
    *[
        case(
            lambda a=a: P.MinNewTokens(a[1], a[0], a[2]),
            lambda a=a: lp.MinNewTokensLengthLogitsProcessor(*a),
            f"min-new{a[1]}-prompt{a[0]}-eos{len(a[2])}",
        )
        for a in [(5, 10, [EOS]), (5, 7, [EOS]), (0, 3, [EOS, 9]), (10, 3, [EOS, 9])]
    ],
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ours, theirs", CASES)
def test_matches_transformers(ours, theirs, seed):
    input_ids, scores = make_inputs(seed)
    ids_before, scores_before = input_ids.clone(), scores.clone()
    got = ours()(input_ids, scores)
    assert torch.equal(input_ids, ids_before) and torch.equal(scores, scores_before)
    assert_same(got, theirs()(input_ids.clone(), scores.clone()))


def _hf_pipeline(input_ids, attention_mask, prompt_len, **options):
    """The processor list transformers' generate() itself builds for these options."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=1, n_positions=32, vocab_size=VOCAB,
        bos_token_id=EOS, eos_token_id=EOS,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg)
    config = transformers.GenerationConfig(
        do_sample=True, eos_token_id=EOS, pad_token_id=EOS, **options
    )
    try:
        model._prepare_special_tokens(config, True, device="cpu")
        return model._get_logits_processor(
            config, input_ids_seq_length=prompt_len, device="cpu",
            model_kwargs={"attention_mask": attention_mask},
        )  # fmt: skip
    except (AttributeError, TypeError) as e:  # private API: skip if it moved
        pytest.skip(f"transformers' _get_logits_processor changed: {e}")


PIPELINE_OPTIONS = dict(
    repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[1, 2], [4]], min_new_tokens=3,
    temperature=0.8, top_k=20, top_p=0.9, min_p=0.02, typical_p=0.95, epsilon_cutoff=1e-3,
    eta_cutoff=1e-3,
)  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pipeline_order_and_output_match_generate(seed):
    input_ids, scores = make_inputs(seed)
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0  # row 1 is left-padded: the repetition penalty must skip the padding
    pad_lengths = (mask != 0).int().argmax(dim=1)
    hf = _hf_pipeline(input_ids, mask, prompt_len=10, **PIPELINE_OPTIONS)
    ours = P.build_pipeline(
        **PIPELINE_OPTIONS, prompt_len=10, eos_token_id=EOS, pad_lengths=pad_lengths
    )
    names = [type(p).__name__ for p in ours]
    assert names == [
        "RepetitionPenalty", "NoRepeatNGram", "BannedSequences", "MinNewTokens",
        "TemperatureWarper", "TopKWarper", "TopPWarper", "MinPWarper", "TypicalWarper",
        "EpsilonWarper", "EtaWarper",
    ]  # fmt: skip
    assert len(hf) == len(ours)
    assert_same(ours(input_ids, scores), hf(input_ids, scores.clone()))


def test_pipeline_places_openai_penalties_with_the_penalties():
    pipeline = P.build_pipeline(
        repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5, top_k=5, prompt_len=3
    )
    assert [type(p).__name__ for p in pipeline] == [
        "RepetitionPenalty", "FrequencyPenalty", "PresencePenalty", "TopKWarper",
    ]  # fmt: skip


def test_no_op_values_build_an_empty_pipeline():
    pipeline = P.build_pipeline(
        temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0,
        eta_cutoff=0.0, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
        no_repeat_ngram_size=0, bad_words_ids=[], min_new_tokens=0,
    )  # fmt: skip
    assert len(pipeline) == 0 and len(P.build_pipeline()) == 0
    input_ids, scores = make_inputs(0)
    assert pipeline(input_ids, scores) is scores


def test_lone_eos_is_never_banned():
    # transformers drops [[eos]] from bad_words_ids (ending must stay possible); alone it
    # leaves nothing, which transformers rejects and we treat as a no-op.
    input_ids, scores = make_inputs(0)
    assert torch.equal(P.BannedSequences([[EOS]], EOS)(input_ids, scores), scores)
    assert torch.isneginf(P.BannedSequences([[EOS]])(input_ids, scores)[:, EOS]).all()


def test_token_id_arguments_take_any_iterable():
    """Sequences and EOS ids as tuples, sets, ranges, arrays or tensors act as lists (the
    checks are validate.token_ids', shared with generate())."""
    for seed in range(3):
        input_ids, scores = make_inputs(seed)
        banned = P.BannedSequences(BANNED, EOS)(input_ids, scores)
        for seqs, eos in (
            (tuple(tuple(b) for b in BANNED), {EOS}),
            ([np.array(b) for b in BANNED], np.array([EOS])),
            ({tuple(b) for b in BANNED}, (EOS,)),
            ([torch.tensor(b) for b in BANNED], torch.tensor([EOS])),
        ):
            assert torch.equal(P.BannedSequences(seqs, eos)(input_ids, scores), banned)
        short = make_inputs(seed)[0][:, :2]
        expect = P.MinNewTokens(4, 0, [EOS, 3])(short, scores)
        for eos in ({3, EOS}, (EOS, 3), np.array([EOS, 3]), range(3, EOS + 1, EOS - 3)):
            assert torch.equal(P.MinNewTokens(4, 0, eos)(short, scores), expect)


@pytest.mark.parametrize("prompt_len", [0, 4, SEQ])
@pytest.mark.parametrize("frequency, presence", [(0.5, 0.0), (0.0, 1.5), (-1.0, 0.3), (0.7, -0.4)])
def test_frequency_presence_match_numpy(frequency, presence, prompt_len):
    input_ids, scores = make_inputs(1)
    ids, s = input_ids.numpy(), scores.double().numpy()
    counts = np.stack([np.bincount(row[prompt_len:], minlength=VOCAB) for row in ids])
    want = s - counts * frequency - (counts > 0) * presence
    f = P.FrequencyPenalty(frequency, prompt_len)
    p = P.PresencePenalty(presence, prompt_len)
    got = p(input_ids, f(input_ids, scores))
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=1e-5)
    pipeline = P.build_pipeline(
        frequency_penalty=frequency, presence_penalty=presence, prompt_len=prompt_len
    )
    np.testing.assert_allclose(pipeline(input_ids, scores).double().numpy(), want, atol=1e-5)


INVALID = [
    (lambda: P.TemperatureWarper(0), "temperature"),
    (lambda: P.TemperatureWarper(-0.5), "temperature"),
    (lambda: P.TemperatureWarper(float("nan")), "temperature"),
    (lambda: P.TemperatureWarper("1"), "temperature"),
    (lambda: P.TopKWarper(0), "top_k"),
    (lambda: P.TopKWarper(-3), "top_k"),
    (lambda: P.TopKWarper(2.5), "top_k"),
    (lambda: P.TopKWarper(True), "top_k"),
    (lambda: P.TopKWarper(5, min_tokens_to_keep=0), "min_tokens_to_keep"),
    (lambda: P.TopPWarper(0), "top_p"),
    (lambda: P.TopPWarper(1.5), "top_p"),
    (lambda: P.TopPWarper(-0.1), "top_p"),
    (lambda: P.TopPWarper(0.9, min_tokens_to_keep=0), "min_tokens_to_keep"),
    (lambda: P.MinPWarper(-0.1), "min_p"),
    (lambda: P.MinPWarper(1.1), "min_p"),
    (lambda: P.TypicalWarper(0), "typical_p"),
    (lambda: P.TypicalWarper(1.0), "typical_p"),
    (lambda: P.EpsilonWarper(0), "epsilon_cutoff"),
    (lambda: P.EpsilonWarper(1), "epsilon_cutoff"),
    (lambda: P.EtaWarper(-0.1), "eta_cutoff"),
    (lambda: P.RepetitionPenalty(0), "repetition_penalty"),
    (lambda: P.RepetitionPenalty(-1.2), "repetition_penalty"),
    (lambda: P.RepetitionPenalty(1.2, ignore_prefix=-1), "ignore_prefix"),
    (lambda: P.FrequencyPenalty(math.inf), "frequency_penalty"),
    (lambda: P.PresencePenalty("x"), "presence_penalty"),
    (lambda: P.FrequencyPenalty(0.5, prompt_len=-1), "prompt_len"),
    (lambda: P.NoRepeatNGram(0), "no_repeat_ngram_size"),
    (lambda: P.NoRepeatNGram(-2), "no_repeat_ngram_size"),
    (lambda: P.BannedSequences([]), "bad_words_ids"),
    (lambda: P.BannedSequences([[]]), "bad_words_ids"),
    (lambda: P.BannedSequences([[-1]]), "bad_words_ids"),
    (lambda: P.BannedSequences([1, 2]), "bad_words_ids"),
    (lambda: P.BannedSequences("abc"), "bad_words_ids"),
    (lambda: P.BannedSequences(b"abc"), "bad_words_ids"),
    (lambda: P.BannedSequences([[1.5]]), "bad_words_ids"),
    (lambda: P.BannedSequences([{1.5}]), "bad_words_ids"),
    (lambda: P.BannedSequences([[1]], eos_token_id={1.5}), "eos_token_id"),
    (lambda: P.MinNewTokens(3, 0, {1.5}), "eos_token_id"),
    (lambda: P.MinNewTokens(3, 0, "a"), "eos_token_id"),
    (lambda: P.MinNewTokens(3, 0, np.array([True])), "eos_token_id"),
    (lambda: P.MinNewTokens(-1, 0, EOS), "min_new_tokens"),
    (lambda: P.MinNewTokens(3, -1, EOS), "prompt_len"),
    (lambda: P.MinNewTokens(3, 0, []), "eos_token_id"),
    (lambda: P.build_pipeline(temperature=-0.5), "temperature"),
    (lambda: P.build_pipeline(top_k=-1), "top_k"),
    (lambda: P.build_pipeline(top_p=2.0), "top_p"),
    (lambda: P.build_pipeline(typical_p=0), "typical_p"),
    (lambda: P.build_pipeline(epsilon_cutoff=1.0), "epsilon_cutoff"),
    (lambda: P.build_pipeline(bad_words_ids=[["a"]]), "bad_words_ids"),
    (lambda: P.build_pipeline(prompt_len=-3), "prompt_len"),
    (lambda: P.BannedSequences([[VOCAB + 10]])(*make_inputs(0)), "bad_words_ids"),
]


@pytest.mark.parametrize(
    "make, name", INVALID, ids=[f"{n}-{i}" for i, (_, n) in enumerate(INVALID)]
)
def test_invalid_arguments_raise(make, name):
    with pytest.raises(GPT2LabError, match=name) as e:
        make()
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------- sampling

TINY_LOGITS = np.array([2.0, 1.6, 1.1, 0.7, 0.2, -0.4, -1.0, -2.0])
DRAWS = 20000
CHI2_CRITICAL_P001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def _kept_top_k(p: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-p)[:k]


def _kept_top_p(p: np.ndarray, top_p: float) -> np.ndarray:
    order = np.argsort(-p)
    mass_before = np.cumsum(p[order]) - p[order]
    return order[mass_before < top_p]  # the smallest head whose mass reaches top_p


def _kept_typical(p: np.ndarray, mass: float) -> np.ndarray:
    surprisal = -np.log(p)
    order = np.argsort(np.abs(surprisal - (p * surprisal).sum()))  # most typical first
    return order[: np.searchsorted(np.cumsum(p[order]), mass) + 1]


@pytest.mark.parametrize(
    "warper, kept",
    [
        (P.TopKWarper(4), lambda p: _kept_top_k(p, 4)),
        (P.TopPWarper(0.8), lambda p: _kept_top_p(p, 0.8)),
        (P.TypicalWarper(0.6), lambda p: _kept_typical(p, 0.6)),
    ],
    ids=["top_k", "top_p", "typical"],
)
def test_sampling_follows_the_renormalised_distribution(warper, kept):
    p = np.exp(TINY_LOGITS - TINY_LOGITS.max())
    p /= p.sum()
    keep = np.sort(kept(p))
    assert 3 <= len(keep) < len(p)  # a real cut, and enough tokens for the test to mean something
    want = np.zeros_like(p)
    want[keep] = p[keep] / p[keep].sum()

    scores = torch.tensor(TINY_LOGITS, dtype=torch.float32)[None]
    probs = warper(torch.zeros(1, 1, dtype=torch.long), scores).softmax(-1)
    np.testing.assert_array_equal(np.flatnonzero(probs[0].numpy() > 0), keep)
    draws = torch.multinomial(
        probs, DRAWS, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    counts = np.bincount(draws[0].numpy(), minlength=len(p))
    assert counts[want == 0].sum() == 0, "a filtered token was drawn"

    observed, expected = counts[keep], want[keep] * DRAWS
    try:
        from scipy.stats import chisquare
    except ImportError:
        statistic = ((observed - expected) ** 2 / expected).sum()
        assert statistic < CHI2_CRITICAL_P001[len(keep) - 1], (statistic, observed, expected)
    else:
        assert chisquare(observed, expected).pvalue > 1e-3, (observed, expected)
