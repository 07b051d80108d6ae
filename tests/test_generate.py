"""Generation against transformers' generate: greedy, seeded sampling with warpers,
penalties, stop strings, streaming, and bad options."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

import gpt2lab
from gpt2lab.errors import GPT2LabError

PROMPTS = ["The quick brown fox", "Hello", "In a hole in the ground there lived"]
EOT = 50256
gen_mod = importlib.import_module("gpt2lab.generation.generate")


@pytest.fixture(scope="module")
def ours(small_ckpt):
    return gpt2lab.load(small_ckpt)


def hf_new_tokens(hf, prompts, n, **kwargs) -> list[list[int]]:
    """transformers' continuation of each prompt (left-padded batch), cut at end-of-text."""
    tok = gpt2lab.Tokenizer()
    ids = [tok.encode(p) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[EOT] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    with torch.no_grad():
        out = hf.generate(
            input_ids, attention_mask=mask, max_new_tokens=n, pad_token_id=EOT,
            eos_token_id=EOT, **kwargs,
        )[:, width:].tolist()  # fmt: skip
    return [row[: row.index(EOT)] if EOT in row else row for row in out]


def test_greedy_batch_matches_transformers(ours, hf_small):
    result = ours.generate(PROMPTS, max_new_tokens=64, return_result=True)
    assert result.tokens == hf_new_tokens(hf_small, PROMPTS, 64, do_sample=False)
    assert all(len(t) == 64 for t in result.tokens)
    assert result.finish_reasons == ["length"] * 3


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=0.7),
        dict(temperature=1.3, top_k=20),
        dict(top_p=0.8),
        dict(temperature=0.9, top_k=50, top_p=0.95),
        dict(min_p=0.05),
        dict(typical_p=0.7),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_seeded_sampling_draws_what_transformers_draws(ours, hf_small, options):
    # Same seed, same filtered distribution, same torch.multinomial -> the same tokens.
    got = ours.generate(
        PROMPTS[:1], max_new_tokens=24, seed=7, return_result=True, **options
    ).tokens
    hf_opts = {"top_k": 0, **options}  # transformers' generation config defaults top_k to 50
    torch.manual_seed(7)
    assert got == hf_new_tokens(hf_small, PROMPTS[:1], 24, do_sample=True, **hf_opts)
    again = ours.generate(
        PROMPTS[:1], max_new_tokens=24, seed=7, return_result=True, **options
    ).tokens
    assert again == got


@pytest.mark.parametrize(
    "options",
    [dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2), dict(min_new_tokens=10)],
    ids=lambda o: next(iter(o)),
)
def test_greedy_with_processors_matches_transformers(ours, hf_small, options):
    got = ours.generate(PROMPTS, max_new_tokens=32, return_result=True, **options).tokens
    assert got == hf_new_tokens(hf_small, PROMPTS, 32, do_sample=False, **options)


def test_bf16_decoding_steps_match_the_full_forward(ours):
    # Decoding feeds one query at a time, and in bf16 its attention runs in float32 (for
    # speed); the logits must agree with the whole-sequence bf16 forward, and both with
    # float32 to bf16's precision.
    half = gpt2lab.GPT2(ours.cfg)
    half.load_state_dict(ours.state_dict())
    half.to(torch.bfloat16)
    x = torch.randint(0, EOT, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = ours(x)
        full = half(x).float()
        cache = half.new_cache(2, 24)
        steps = [half(x[:, :8], cache=cache)]
        steps += [half(x[:, t : t + 1], cache=cache) for t in range(8, 24)]
        stepped = torch.cat(steps, 1).float()
    scale, eps = ref.abs().mean().item(), 2**-8
    for got in (full, stepped):
        assert (got - ref).abs().mean().item() < 12 * eps * scale
        assert (got - ref).abs().max().item() < 100 * eps * scale
    assert (stepped - full).abs().mean().item() < 12 * eps * scale
    greedy = half.generate(PROMPTS, max_new_tokens=16, stop_at_eot=False, return_result=True)
    assert all(len(t) == 16 for t in greedy.tokens)


def test_temperature_zero_is_greedy_and_seeds_differ(ours):
    greedy = ours.generate(PROMPTS[0], max_new_tokens=16)
    assert ours.generate(PROMPTS[0], max_new_tokens=16, temperature=0, top_k=5, seed=1) == greedy
    a = ours.generate(PROMPTS[0], max_new_tokens=16, temperature=1.0, seed=1)
    b = ours.generate(PROMPTS[0], max_new_tokens=16, temperature=1.0, seed=2)
    assert a != b


def test_stop_string_cuts_the_text(ours):
    full = ours.generate(PROMPTS[0], max_new_tokens=40)
    stop = full[10:13]
    result = ours.generate(PROMPTS[0], max_new_tokens=40, stop=stop, return_result=True)
    assert result.texts[0] == full[: full.index(stop)]
    assert result.finish_reasons == ["stop"]
    assert "".join(ours.stream(PROMPTS[0], max_new_tokens=40, stop=stop)) == result.texts[0]


def test_stop_token_id(ours):
    full = ours.generate(PROMPTS[0], max_new_tokens=20, return_result=True).tokens[0]
    result = ours.generate(
        PROMPTS[0], max_new_tokens=20, stop_token_ids=[full[5]], return_result=True
    )
    assert result.tokens[0] == full[: full.index(full[5])]
    assert result.finish_reasons == ["stop"]


def test_stop_token_ids_take_any_iterable_of_ids(ours):
    """A set, tuple, range, numpy array or tensor of ids stops where the list does (sets
    are read in sorted order, so the result never depends on hash order)."""
    full = ours.generate(PROMPTS[0], max_new_tokens=20, return_result=True).tokens[0]
    a, b = full[5], full[9]

    def run(stop):
        return ours.generate(PROMPTS[0], max_new_tokens=20, stop_token_ids=stop, return_result=True)

    expect = run([a, b])
    assert expect.tokens[0] == full[: full.index(a)] and expect.finish_reasons == ["stop"]
    for stop in ({a, b}, frozenset([b, a]), (a, b), np.array([a, b]), np.array([b, a], np.int32),
                 torch.tensor([a, b]), iter([a, b])):  # fmt: skip
        got = run(stop)
        assert (got.tokens, got.finish_reasons) == (expect.tokens, expect.finish_reasons), stop
    only_a = run([a])
    for stop in (range(a, a + 1), np.int64(a), {a}, (a,)):
        assert run(stop).tokens == only_a.tokens
    for none in (set(), (), range(0), np.array([], dtype=np.int64)):
        assert (
            run(none).tokens
            == ours.generate(PROMPTS[0], max_new_tokens=20, return_result=True).tokens
        )


def test_bad_words_take_any_iterable_of_words(ours):
    """bad_words: any iterable of words, each a string or any iterable of token ids."""
    plain = ours.generate("Hello", max_new_tokens=12, return_result=True).tokens[0]
    word = ours.tokenizer.decode(plain[:2])

    def run(bad):
        return ours.generate("Hello", max_new_tokens=12, bad_words=bad, return_result=True).tokens

    expect = run([[plain[0]], [plain[2], plain[3]]])
    assert expect[0][:1] != plain[:1]
    for bad in (
        ([plain[0]], [plain[2], plain[3]]),
        {(plain[0],), (plain[2], plain[3])},
        [np.array([plain[0]]), np.array([plain[2], plain[3]])],
        [torch.tensor([plain[0]]), (plain[2], plain[3])],
        [range(plain[0], plain[0] + 1), [plain[2], plain[3]]],
        iter([[plain[0]], [plain[2], plain[3]]]),
    ):
        assert run(bad) == expect, bad
    pair = run([[plain[2], plain[3]]])
    assert run(np.array([[plain[2], plain[3]]])) == pair
    words = run([word, " the"])
    assert words[0][:2] != plain[:2]
    assert run({word, " the"}) == run(frozenset([" the", word])) == run((" the", word)) == words


def _memory_requests(monkeypatch) -> list[tuple[str, int]]:
    """Record what the decoding loops ask validate.check_memory for (every size checked)."""
    asked: list[tuple[str, int]] = []

    def record(what, nbytes, device=None, hint=""):
        asked.append((what, nbytes))

    monkeypatch.setattr(gen_mod, "check_memory", record)
    return asked


def _per_row(model, positions: int, copies: int, vocab_buffers: int = 6) -> int:
    cfg = model.cfg
    cache = 2 * cfg.n_layers * positions * cfg.d_model * model.dtype.itemsize
    return copies * cache + vocab_buffers * cfg.d_vocab * 4 + 6 * positions * 8


def test_decoding_memory_counts_the_cache_copies_each_search_makes(ours, monkeypatch):
    """Greedy search and sampling fill one KV cache in place (one copy); beam search's
    reorder and contrastive search's candidate rows hold two copies at a time."""
    asked = _memory_requests(monkeypatch)
    T = ours.to_tokens(PROMPTS, return_mask=True)[0].shape[1]
    ours.generate(PROMPTS, max_new_tokens=5)
    ours.generate(PROMPTS, max_new_tokens=5, do_sample=True, seed=0)
    assert (
        asked
        == [(f"generating for 3 prompts x {T + 5} positions", 3 * _per_row(ours, T + 5, 1))] * 2
    )
    asked.clear()
    ours.generate(PROMPTS, max_new_tokens=5, num_beams=4)
    assert [n for _, n in asked] == [12 * _per_row(ours, T + 5, 2)]  # checked once, not twice
    asked.clear()
    ours.generate(PROMPTS, max_new_tokens=5, penalty_alpha=0.6, top_k=4)
    assert [n for _, n in asked] == [12 * _per_row(ours, T + 5, 2, vocab_buffers=2)]


def test_greedy_runs_where_only_one_cache_copy_fits(ours, monkeypatch):
    """Free memory between one and two copies' worth: greedy search runs, beam search with
    as many rows is refused (the old estimate refused both)."""
    T = ours.to_tokens(PROMPTS, return_mask=True)[0].shape[1]
    rows, positions = 3, T + 5
    free = (rows * _per_row(ours, positions, 1) + rows * _per_row(ours, positions, 2)) // 2
    monkeypatch.setattr(gpt2lab.validate, "UNCHECKED_BYTES", 0)
    monkeypatch.setattr(gpt2lab.validate, "available_memory", lambda device=None: free)
    assert len(ours.generate(PROMPTS, max_new_tokens=5, return_result=True).tokens) == 3
    with pytest.raises(GPT2LabError, match="beam search with 3 beams x 1 prompts"):
        ours.generate(PROMPTS[0], max_new_tokens=5 + T - len(ours.to_tokens(PROMPTS[0])[0]),
                      num_beams=3)  # fmt: skip


def test_num_return_sequences_without_beams_says_what_to_do(ours):
    """transformers samples several sequences per prompt; gpt2lab says how to get them."""
    with pytest.raises(GPT2LabError) as err:
        ours.generate("Hello", do_sample=True, num_return_sequences=2, seed=0)
    message = str(err.value)
    assert "only with beam search" in message
    assert "list of prompts" in message and "seeds" in message
    assert "needs beam search" not in message


def test_stream_joined_equals_generate(ours):
    options = dict(max_new_tokens=48, temperature=1.0, seed=3)
    pieces = list(ours.stream(PROMPTS[2], **options))
    assert "".join(pieces) == ours.generate(PROMPTS[2], **options)
    assert len(pieces) > 1


def test_stream_never_splits_a_character(ours, monkeypatch):
    # Force the decoded tokens to be single bytes of multi-byte characters.
    tok = ours.tokenizer
    text = "héllo 世界 🎉 naïve"
    single = {tok.token_bytes(i): i for i in range(EOT) if len(tok.token_bytes(i)) == 1}
    byte_ids = [single[bytes([b])] for b in text.encode()]
    assert tok.decode(byte_ids) == text

    def forced(model, tokens, mask, s):
        for t in byte_ids:
            yield torch.tensor([t]), torch.zeros(1), torch.zeros(1, dtype=torch.bool)

    monkeypatch.setattr(gen_mod, "_steps", forced)
    pieces = list(ours.stream("x", max_new_tokens=len(byte_ids)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert ours.generate("x", max_new_tokens=len(byte_ids)) == text


def test_empty_prompt_starts_from_endoftext(ours):
    assert ours.generate("", max_new_tokens=8) == ours.tokenizer.decode(
        ours.generate([EOT], max_new_tokens=8)
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-3), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=500), "context"),
        (dict(stop=""), "stop"),
        (dict(nonsense=1), "nonsense"),
        (dict(seed="a"), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**64), "seed"),
        (dict(stop=5), "stop"),
        (dict(stop_token_ids=[[1]]), "stop_token_ids"),
        (dict(stop_token_ids=[50257]), "stop_token_ids"),
        (dict(bad_words=5), "bad_words"),
        (dict(bad_words=[-1]), "bad_words"),
        (dict(bad_words=[""]), "bad_words"),
        (dict(bad_words_ids=[[50257]]), "bad_words_ids"),
        (dict(do_sample="false"), "do_sample"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(max_time=math.nan), "max_time"),
        (dict(stop_at_eot="no"), "stop_at_eot"),
        (dict(return_result="yes"), "return_result"),
        (dict(length_penalty=0.6), "needs beam search"),
        (dict(num_return_sequences=2), "only with beam search"),
        (dict(num_return_sequences=2, do_sample=True), "only with beam search"),
        (dict(stop_token_ids={1.5}), "stop_token_ids"),
        (dict(stop_token_ids={"a"}), "stop_token_ids"),
        (dict(stop_token_ids=np.array([1.5])), "stop_token_ids"),
        (dict(stop_token_ids=np.array([True])), "stop_token_ids"),
        (dict(stop_token_ids=np.array([[1]])), "stop_token_ids"),
        (dict(stop_token_ids=b"ab"), "stop_token_ids"),
        (dict(stop_token_ids=(1, None)), "stop_token_ids"),
        (dict(stop_token_ids=range(EOT, EOT + 2)), "stop_token_ids"),
        (dict(stop_token_ids=range(10**12)), "stop_token_ids"),
        (dict(bad_words={1.5}), "bad_words"),
        (dict(bad_words=[{1.5}]), "bad_words"),
        (dict(bad_words=[b"x"]), "bad_words"),
        (dict(bad_words=b"abc"), "bad_words"),
        (dict(bad_words=np.array([1, 2])), "bad_words"),
        (dict(bad_words=set()), "bad_words"),
        (dict(bad_words=[np.array([0.5])]), "bad_words"),
        (dict(diversity_penalty=1.0), "needs beam search"),
        (dict(early_stopping=True), "needs beam search"),
        (dict(num_beams=1.0), "num_beams"),
        (dict(use_cache=False), "use_cache"),
        (dict(eos_token_id=5), "eos_token_id"),
        (dict(num_beams=2, temperature=0.7), "does not sample"),
        (dict(num_beams=2, length_penalty=math.nan), "length_penalty"),
    ],
)
def test_bad_options_are_clear_errors(ours, options, message):
    with pytest.raises(GPT2LabError, match=message) as err:
        ours.generate("Hello", **options)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([], "prompt"),
        ([1, True], "prompt"),
        ([2**70], "token ids"),
        ([-1], "token ids"),
        (torch.tensor([1.0, 2.0]), "integer tensor"),
        (torch.zeros(0, dtype=torch.long), "prompt"),
        (b"Hello", "prompt"),
    ],  # fmt: skip
)
def test_bad_prompts_are_clear_errors(ours, prompt, message):
    with pytest.raises(GPT2LabError, match=message):
        ours.generate(prompt, max_new_tokens=2)


def test_transformers_defaults_are_accepted_as_no_ops(ours):
    """What HF code passes to generate() as a matter of course changes nothing."""
    plain = ours.generate(PROMPTS, max_new_tokens=8, return_result=True).tokens
    defaults = dict(
        num_beams=1, num_beam_groups=1, num_return_sequences=1, length_penalty=1.0,
        diversity_penalty=0.0, early_stopping=False, do_sample=False, use_cache=True,
        output_scores=False, return_dict_in_generate=False, pad_token_id=EOT, eos_token_id=EOT,
        repetition_penalty=1.0, no_repeat_ngram_size=0,
    )  # fmt: skip
    assert ours.generate(PROMPTS, max_new_tokens=8, return_result=True, **defaults).tokens == plain
    streamed = ours.stream(PROMPTS[0], max_new_tokens=8, num_beams=1, length_penalty=1.0)
    assert "".join(streamed) == ours.generate(PROMPTS[0], max_new_tokens=8)
    # with beams, the sampling options at values that change nothing
    beams = ours.generate("Hello", max_new_tokens=6, num_beams=3, return_result=True).tokens
    assert beams == ours.generate(
        "Hello", max_new_tokens=6, num_beams=3, return_result=True, do_sample=False,
        temperature=1.0, top_p=1.0, top_k=0,
    ).tokens  # fmt: skip


def test_seeds_cover_the_whole_range(ours):
    for seed in (0, 2**63, 2**64 - 1):
        first = ours.generate("Hello", max_new_tokens=4, do_sample=True, seed=seed)
        assert first == ours.generate("Hello", max_new_tokens=4, do_sample=True, seed=seed)


def test_tiny_temperatures_sample_the_best_token(ours):
    """A denormal temperature (1e-45 overflows float32 logits to inf, and 5e-324 is 0 in
    float32) picks the top token, like greedy search, instead of failing in torch."""
    greedy = ours.generate(PROMPTS, max_new_tokens=8, return_result=True).tokens
    for temperature in (1e-45, 5e-324, 1e-30):
        got = ours.generate(
            PROMPTS, max_new_tokens=8, temperature=temperature, seed=0, return_result=True
        ).tokens
        assert got == greedy


def test_a_single_bad_word_string_is_one_word(ours):
    """bad_words="..." bans that word (not each of its characters)."""
    plain = ours.generate("Hello", max_new_tokens=12, return_result=True).tokens[0]
    word = ours.tokenizer.decode(plain[:2])
    banned = ours.generate("Hello", max_new_tokens=12, bad_words=word, return_result=True)
    assert (
        banned.tokens
        == ours.generate("Hello", max_new_tokens=12, bad_words=[word], return_result=True).tokens
    )
    assert banned.tokens[0][:2] != plain[:2]


@pytest.mark.parametrize("length_penalty", [1.0, 0.6])
def test_beam_search_through_generate_matches_transformers(ours, hf_small, length_penalty):
    result = ours.generate(
        PROMPTS, max_new_tokens=64, num_beams=4, length_penalty=length_penalty, return_result=True
    )
    expect = hf_new_tokens(
        hf_small, PROMPTS, 64, do_sample=False, num_beams=4, length_penalty=length_penalty
    )
    assert result.tokens == expect
    with pytest.raises(GPT2LabError, match="num_beams"):
        ours.generate("Hello", num_beams=0)


@pytest.mark.slow
def test_greedy_and_beam_at_gpt2_medium_size_match_transformers(tmp_path):
    from conftest import hf_model

    hf = hf_model(
        seed=4, n_layer=24, n_embd=1024, n_head=16, n_positions=1024, initializer_range=0.02
    )
    hf.save_pretrained(tmp_path)
    ours = gpt2lab.load(tmp_path)
    greedy = ours.generate(PROMPTS, max_new_tokens=64, return_result=True).tokens
    assert greedy == hf_new_tokens(hf, PROMPTS, 64, do_sample=False)
    for length_penalty in (1.0, 0.6):
        beams = ours.generate(
            PROMPTS, max_new_tokens=64, num_beams=4, length_penalty=length_penalty,
            return_result=True,
        ).tokens  # fmt: skip
        assert beams == hf_new_tokens(
            hf, PROMPTS, 64, do_sample=False, num_beams=4, length_penalty=length_penalty
        )
