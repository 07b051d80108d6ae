"""Generation against transformers' generate: greedy, seeded sampling with warpers,
penalties, stop strings, streaming, and bad options."""

from __future__ import annotations

import importlib

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
    ],
)
def test_bad_options_are_clear_errors(ours, options, message):
    with pytest.raises(GPT2LabError, match=message):
        ours.generate("Hello", **options)


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
