"""GenerationConfig: one validated object behind every way into generation.

What it builds must decode exactly as model.generate with the same keyword options;
sampling seeds are per row (a row's draws never depend on its batch-mates); OpenAI's
logit_bias matches transformers' sequence_bias; bad options are refused in one line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import gpt2lab
from gpt2lab.errors import GPT2LabError
from gpt2lab.generation import GenerationConfig, generate_tokens

PROMPTS = ["The quick brown fox", "Hello", "In a hole in the ground there lived"]
EOT = 50256


@pytest.fixture(scope="module")
def ours(small_ckpt):
    return gpt2lab.load(small_ckpt)


def _batch(model, prompts):
    tokens, mask = model.to_tokens(prompts, padding_side="left", return_mask=True)
    return tokens, (None if mask is None or bool(mask.all()) else mask)


@pytest.mark.parametrize(
    "options",
    [
        dict(max_new_tokens=12),
        dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3),
        dict(max_new_tokens=12, top_k=5, repetition_penalty=1.3, seed=1),
        dict(max_new_tokens=12, num_beams=3, num_return_sequences=2),
        dict(max_new_tokens=8, penalty_alpha=0.6, top_k=4),
        dict(max_new_tokens=12, stop=[" the"], frequency_penalty=0.5, seed=2, do_sample=True),
        dict(max_new_tokens=12, logit_bias={"262": 5.0, 13: -100}),
    ],
    ids=["greedy", "sample", "penalty", "beam", "contrastive", "stop", "bias"],
)
def test_config_decodes_as_generate(ours, options):
    config = GenerationConfig.from_options(**options)
    tokens, mask = _batch(ours, PROMPTS)
    got = generate_tokens(ours, tokens, mask, config)
    want = ours.generate(PROMPTS, return_result=True, **options)
    assert got.tokens == want.tokens
    assert got.texts == want.texts
    assert got.finish_reasons == want.finish_reasons
    # JSON round trip keeps the meaning
    again = GenerationConfig.from_json(json.dumps(config.to_dict()))
    assert again == config
    assert again.mode == config.mode


def test_modes():
    assert GenerationConfig.from_options().mode == "greedy"
    assert GenerationConfig.from_options(temperature=0.5).mode == "sample"
    assert GenerationConfig.from_options(temperature=0, top_k=3).mode == "greedy"
    assert GenerationConfig.from_options(num_beams=2).mode == "beam"
    assert GenerationConfig.from_options(penalty_alpha=0.5, top_k=3).mode == "contrastive"
    assert GenerationConfig.from_options(do_sample=False, top_p=0.5).mode == "greedy"
    c = GenerationConfig.from_options(temperature=0.5, seed=1)
    assert c.replace(seed=2).seed == 2 and c.replace(seed=2).temperature == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seed = 3


@pytest.mark.parametrize("seed", [0, 11, 2**64 - 2])
def test_sampling_seeds_are_per_row(ours, seed):
    """Row b of a batch samples with seed + b: its tokens equal that prompt alone with
    that seed, whatever else is in the batch."""
    options = dict(max_new_tokens=16, temperature=1.0, top_k=40)
    batch = ours.generate(PROMPTS, seed=seed, return_result=True, **options).tokens
    for b, prompt in enumerate(PROMPTS):
        alone = ours.generate([prompt], seed=(seed + b) % 2**64, return_result=True, **options)
        assert batch[b] == alone.tokens[0]
    # the same prompt twice in one batch gets two different samples
    twice = ours.generate([PROMPTS[0]] * 2, seed=seed, return_result=True, **options).tokens
    assert twice[0] == batch[0] and twice[0] != twice[1]


def test_logit_bias_matches_transformers_sequence_bias(ours, hf_small):
    """OpenAI's logit_bias adds to single tokens' logits: transformers' sequence_bias with
    one-token sequences is the same processor."""
    bias = {262: 4.0, 11: -3.5, 13: 2.0, 290: -100.0}
    tok = gpt2lab.Tokenizer()
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            hf = hf_small.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                pad_token_id=EOT, eos_token_id=EOT,
                sequence_bias={(t,): b for t, b in bias.items()},
            )[0, ids.shape[1] :].tolist()  # fmt: skip
        hf = hf[: hf.index(EOT)] if EOT in hf else hf
        assert ours.generate(ids[0].tolist(), max_new_tokens=16, logit_bias=bias) == hf


def test_logit_bias_forces_and_bans(ours):
    forced = ours.generate("Hello", max_new_tokens=5, logit_bias={"995": 100})
    assert forced == ours.tokenizer.decode([995] * 5)
    plain = ours.generate("Hello", max_new_tokens=1, return_result=True).tokens[0][0]
    banned = ours.generate("Hello", max_new_tokens=1, logit_bias={plain: -100}, return_result=True)
    assert banned.tokens[0][0] != plain


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(colour="red"), "unknown generation option 'colour'"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=2.0), "top_p"),
        (dict(seed=-1), "seed"),
        (dict(stop=[""]), "stop"),
        (dict(logit_bias={"x": 1}), "logit_bias"),
        (dict(logit_bias={5: 101}), "logit_bias"),
        (dict(logit_bias=[1, 2]), "logit_bias"),
        (dict(logit_bias={5: float("nan")}), "logit_bias"),
        (dict(num_beams=2, temperature=0.5), "beam search does not sample"),
        (dict(penalty_alpha=0.5, top_k=1), "top_k"),
        (dict(penalty_alpha=0.5, top_k=3, temperature=0.3), "does not sample"),
        (dict(use_cache=False), "use_cache"),
        (dict(bad_words=[""]), "bad_words"),
    ],
)
def test_bad_options_are_refused_without_a_model(options, message):
    with pytest.raises(GPT2LabError, match=None) as e:
        GenerationConfig.from_options(**options)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["{", "[1, 2]", '"x"', '{"max_new_tokens": "ten"}'])
def test_bad_json(text):
    with pytest.raises(GPT2LabError):
        GenerationConfig.from_json(text)


def test_model_dependent_checks(ours):
    tokens, mask = _batch(ours, ["Hello"])
    for options, message in [
        (dict(logit_bias={ours.cfg.d_vocab: 1}), "logit_bias"),
        (dict(stop_token_ids=[ours.cfg.d_vocab]), "stop_token_ids"),
        (dict(max_new_tokens=ours.cfg.n_ctx), "context"),
        (dict(penalty_alpha=0.5, top_k=ours.cfg.d_vocab + 1), "top_k"),
    ]:
        with pytest.raises(GPT2LabError, match=message):
            generate_tokens(ours, tokens, mask, GenerationConfig.from_options(**options))
    with pytest.raises(GPT2LabError, match="GenerationConfig"):
        generate_tokens(ours, tokens, mask, {"max_new_tokens": 3})


def test_generate_and_stream_take_a_config(ours):
    config = GenerationConfig.from_options(max_new_tokens=10, temperature=0.7, seed=5)
    want = ours.generate("Hello", max_new_tokens=10, temperature=0.7, seed=5)
    assert ours.generate("Hello", config=config) == want
    assert "".join(ours.stream("Hello", config=config)) == want
    # keyword options go on top of the config
    assert ours.generate("Hello", config=config, seed=6) == ours.generate(
        "Hello", max_new_tokens=10, temperature=0.7, seed=6
    )
    with pytest.raises(GPT2LabError, match="GenerationConfig"):
        ours.generate("Hello", config={"max_new_tokens": 3})
    with pytest.raises(GPT2LabError, match="beam"):
        ours.stream("Hello", config=GenerationConfig.from_options(num_beams=2))
