"""Fuzzing the public Python API: "GPT2LabError, or a valid result", never anything else.

Hypothesis draws every argument of generate / stream (greedy, sampling, beam and
contrastive options), score / perplexity / choose, model(...) (tokens, attention_mask,
position_ids, logits_to_keep, stop_at_layer, cache), new_cache, to_tokens,
gpt2lab.load and GPT2Config.from_hf, from valid values and from a pool of hostile
ones: huge and negative ints, bools where numbers belong, NaN / inf / denormal floats,
strings, bytes, None, nested lists and tensors of every dtype and of empty or odd
shapes. Each call must either raise GPT2LabError with a one-line message or return a
result of the right kind (finite logits of the right shape, token ids inside the
vocabulary, ...). Any other exception type fails the test, and so would a hang (each
call runs under an alarm far beyond its normal milliseconds).

The model is a one-layer GPT-2 with the real vocabulary and a 64-token context, run
on one thread, so a valid call takes milliseconds; sizes in the strategies stay small
(max_new_tokens, beams and batches are drawn from small ranges or from values large
enough to be refused before any work). Runs are derandomized and use no example
database, so CI sees the same examples every time.

The last part checks the resource limits directly: with the free memory made small,
beams, batches, caches and contrastive candidates that would not fit are refused
before anything is allocated.
"""

from __future__ import annotations

import contextlib
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import gpt2lab
import gpt2lab.validate as validate
from gpt2lab import GPT2, GPT2Config, GPT2LabError
from gpt2lab.generation import GenerationResult

CFG = GPT2Config(n_layers=1, d_model=16, n_heads=2, n_ctx=64, d_vocab=50257)
VOCAB, N_CTX = CFG.d_vocab, CFG.n_ctx
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HANG_SECONDS = 60  # a call takes milliseconds; this only turns a hang into a failure


@pytest.fixture(scope="module")
def model(one_thread):
    return GPT2(CFG).init_weights(seed=0).eval()


@contextlib.contextmanager
def no_hang(seconds: int = HANG_SECONDS):
    """Fail (TimeoutError) instead of hanging, where the platform has SIGALRM."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def alarm(signum, frame):
        raise TimeoutError(f"the call did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(call):
    """Run `call`: (result, None), or (None, the GPT2LabError). Anything else propagates
    and fails the test."""
    with no_hang():
        try:
            result = call()
        except GPT2LabError as e:
            message = str(e)
            assert message and "\n" not in message, repr(message)
            event("GPT2LabError: " + " ".join(message.split()[:4]))  # --hypothesis-show-statistics
            return None, e
    event("valid result")
    return result, None


# ---- strategies -------------------------------------------------------------------------
DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
          torch.float32, torch.float16, torch.bfloat16, torch.float64]  # fmt: skip


TENSOR_FLOATS = st.sampled_from([0.0, 1.0, -1.5, 3.0, 1e4, 1e-45, math.nan, math.inf, -math.inf])


@st.composite
def tensors(draw, dtypes=DTYPES, max_dims: int = 3, max_side: int = 3, high: int = VOCAB + 2):
    """A small tensor of any dtype and shape (empty and 0-d included)."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(st.lists(st.integers(0, max_side), max_size=max_dims))
    n = math.prod(shape)
    if dtype == torch.bool:
        values = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    elif dtype.is_floating_point:
        values = draw(st.lists(TENSOR_FLOATS, min_size=n, max_size=n))
    else:
        info = torch.iinfo(dtype)
        lo, hi = max(info.min, -2), min(info.max, high)
        values = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    return torch.tensor(values, dtype=dtype).reshape(shape)


HUGE_INTS = st.sampled_from([64, 65, 1000, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63)])
WEIRD_FLOATS = st.sampled_from(
    [math.nan, math.inf, -math.inf, 1e-45, 5e-324, -0.0, 1e308, -1e-45, 0.1 + 0.2]
)
WEIRD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 8),
    HUGE_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    WEIRD_FLOATS,
    st.text(max_size=4),
    st.sampled_from(["false", "true", "1", "nan", "auto", "int8"]),
    st.binary(max_size=4),
    st.lists(st.integers(-2, 10), max_size=3),
    st.lists(st.lists(st.integers(-2, 10), max_size=2), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    tensors(),
)


@st.composite
def maybe(draw, valid: st.SearchStrategy, hostile: st.SearchStrategy = WEIRD):
    """Mostly (7 in 8) a valid value, sometimes a hostile one. (Not st.one_of, which
    flattens WEIRD's many branches into as many equal chances; and not 0 for hostile,
    which hypothesis draws more often than 1 in 8.)"""
    return draw(hostile) if draw(st.integers(0, 7)) == 3 else draw(valid)


TEXT = st.text(max_size=12)
TOKEN_LISTS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=3)
# token ids in the other containers callers hold them in (all accepted like lists)
TOKEN_IDS = st.one_of(
    TOKEN_LISTS,
    TOKEN_LISTS.map(tuple),
    TOKEN_LISTS.map(set),
    TOKEN_LISTS.map(frozenset),
    TOKEN_LISTS.map(np.array),
    TOKEN_LISTS.map(torch.tensor),
    st.integers(0, VOCAB - 2).map(lambda t: range(t, t + 2)),
)
PROMPTS = maybe(
    st.one_of(
        TEXT,
        st.lists(st.text(max_size=8), min_size=1, max_size=3),
        st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5),
        tensors(dtypes=[torch.int64, torch.int32], max_dims=2, max_side=4, high=VOCAB - 1),
    ),
    WEIRD | st.lists(st.integers(-2, VOCAB + 2), max_size=5),
)
PROBABILITY = st.floats(0, 1)
SOME_TEXT = st.text(min_size=1, max_size=3)

# Valid values of each option (some combinations are still invalid together, e.g.
# num_return_sequences > num_beams); `options` adds at most one hostile value.
COMMON_OPTIONS = {
    "max_new_tokens": st.integers(1, 4),
    "seed": st.integers(0, 2**64 - 1),
    "stop": st.one_of(SOME_TEXT, st.lists(SOME_TEXT, max_size=2)),
    "stop_token_ids": st.one_of(st.integers(0, VOCAB - 1), TOKEN_IDS),
    "stop_at_eot": st.booleans(),
    "bad_words": st.one_of(
        SOME_TEXT,
        st.lists(st.one_of(SOME_TEXT, TOKEN_IDS), min_size=1, max_size=2),
        st.sets(st.one_of(SOME_TEXT, TOKEN_LISTS.map(tuple)), min_size=1, max_size=2),
    ),
    "bad_words_ids": st.lists(TOKEN_LISTS, max_size=2),
    "repetition_penalty": st.floats(0.5, 2),
    "frequency_penalty": st.floats(-2, 2),
    "presence_penalty": st.floats(-2, 2),
    "no_repeat_ngram_size": st.integers(0, 3),
    "min_new_tokens": st.integers(0, 4),
    "max_time": st.floats(1, 100),
    "use_cache": st.just(True),
    "output_scores": st.just(False),
    "pad_token_id": st.integers(0, VOCAB - 1),
    "eos_token_id": st.just(50256),
}  # fmt: skip
BEAM_COMMON = {k: v for k, v in COMMON_OPTIONS.items() if k not in ("stop", "max_time")}
SAMPLING_OPTIONS = {
    "do_sample": st.booleans(),
    "temperature": st.one_of(st.floats(0, 3), st.sampled_from([1e-45, 5e-324, 1e-30])),
    "top_k": st.integers(0, 60),
    "top_p": st.floats(0, 1, exclude_min=True),
    "min_p": PROBABILITY,
    "typical_p": st.floats(0, 1, exclude_min=True),
    "epsilon_cutoff": st.floats(0, 0.5),
    "eta_cutoff": st.floats(0, 0.5),
    # transformers' beam options at their defaults: no-ops without beams
    "num_beams": st.just(1),
    "length_penalty": st.just(1.0),
    "num_return_sequences": st.just(1),
    "num_beam_groups": st.just(1),
    "diversity_penalty": st.just(0.0),
    "early_stopping": st.just(False),
}
BEAM_OPTIONS = {
    "num_beams": st.integers(2, 4),
    "num_beam_groups": st.integers(1, 2),
    "diversity_penalty": st.floats(0.1, 2),
    "length_penalty": st.floats(-2, 2),
    "early_stopping": st.sampled_from([True, False, "never"]),
    "num_return_sequences": st.integers(1, 2),
    "do_sample": st.just(False),
    "temperature": st.just(1.0),
}
CONTRASTIVE_OPTIONS = {
    "penalty_alpha": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(2, 6),
}
HOSTILE_KEYS = ("nonsense", "max_length", "num_beams", "temperature", "top_k", "do_sample")


@st.composite
def options(draw, *groups: dict, required: dict | None = None):
    """Keyword arguments: any subset of the groups' options with valid values (plus the
    `required` ones); in half the examples one of them, or an unknown or beam / sampling
    option, is given a hostile value instead."""
    required = required or {}
    merged = {k: v for group in groups for k, v in group.items() if k not in required}
    chosen = draw(st.fixed_dictionaries(required, optional=merged))
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted({*merged, *HOSTILE_KEYS})))
        chosen[key] = draw(WEIRD)
    return chosen


# ---- checks of valid results ---------------------------------------------------------------
def ids_ok(ids) -> bool:
    return all(isinstance(t, int) and 0 <= t < VOCAB for t in ids)


def check_generated(result) -> None:
    if isinstance(result, GenerationResult):
        assert all(ids_ok(row) for row in result.tokens)
        assert len(result.texts) == len(result.tokens) == len(result.finish_reasons)
        assert set(result.finish_reasons) <= {"stop", "length", "time"}
        assert all(math.isfinite(lp) for row in result.logprobs for lp in row)
    elif isinstance(result, str):
        pass
    else:
        assert isinstance(result, list), type(result)
        for item in result:
            assert isinstance(item, (str, int, list)), type(item)
            if isinstance(item, list):
                assert ids_ok(item)
        if result and isinstance(result[0], int):
            assert ids_ok(result)


# ---- generation ------------------------------------------------------------------------------
@FUZZ
@given(
    prompt=PROMPTS,
    opts=options(COMMON_OPTIONS, SAMPLING_OPTIONS),
    return_result=maybe(st.booleans()),
)
def test_generate(model, prompt, opts, return_result):
    result, _ = outcome(lambda: model.generate(prompt, return_result=return_result, **opts))
    if result is not None:
        check_generated(result)


@FUZZ
@given(
    prompt=PROMPTS,
    opts=options(BEAM_COMMON, BEAM_OPTIONS, required={"num_beams": st.integers(2, 4)}),
)
def test_generate_beam_search(model, prompt, opts):
    result, _ = outcome(lambda: model.generate(prompt, return_result=True, **opts))
    if result is not None:
        check_generated(result)


@FUZZ
@given(
    prompt=PROMPTS,
    opts=options(
        COMMON_OPTIONS,
        CONTRASTIVE_OPTIONS,
        required={"penalty_alpha": st.floats(0.1, 1), "top_k": st.integers(2, 6)},
    ),
)
def test_generate_contrastive_search(model, prompt, opts):
    result, _ = outcome(lambda: model.generate(prompt, return_result=True, **opts))
    if result is not None:
        check_generated(result)


@FUZZ
@given(prompt=maybe(TEXT), opts=options(COMMON_OPTIONS, SAMPLING_OPTIONS))
def test_stream(model, prompt, opts):
    pieces, _ = outcome(lambda: list(model.stream(prompt, **opts)))
    if pieces is not None:
        assert all(isinstance(p, str) and p for p in pieces)


@settings(FUZZ, max_examples=30)
@given(
    temperature=st.one_of(WEIRD_FLOATS, st.floats(0, 1e-30), st.floats(0, 1e-3)),
    seed=st.integers(0, 2**64 - 1),
)
def test_sampling_at_any_temperature_is_an_answer_or_a_clear_error(model, temperature, seed):
    """Tiny temperatures (denormals included) sample the best token; never a NaN error
    from torch.multinomial."""
    result, error = outcome(
        lambda: model.generate(
            "Hello", max_new_tokens=2, temperature=temperature, seed=seed, return_result=True
        )
    )
    if 0 <= temperature < 1e-30:  # so cold that only the best token can be drawn
        greedy = model.generate("Hello", max_new_tokens=2, return_result=True)
        assert result is not None and result.tokens == greedy.tokens


# ---- the forward pass, caches and tokenization ----------------------------------------------
@st.composite
def forward_inputs(draw):
    """(tokens, keyword arguments) for model(...), mostly consistent with each other."""
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    valid_tokens = st.builds(
        lambda values, dtype: torch.tensor(values, dtype=dtype).reshape(B, T),
        st.lists(st.integers(0, VOCAB - 1), min_size=B * T, max_size=B * T),
        st.sampled_from([torch.int64, torch.int32]),
    )
    tokens = draw(maybe(valid_tokens, tensors(max_dims=2) | PROMPTS))
    mask = st.builds(
        lambda v: torch.tensor(v, dtype=torch.long).reshape(B, T),
        st.lists(st.integers(0, 1), min_size=B * T, max_size=B * T),
    )
    positions = st.builds(
        lambda shape, start: (torch.arange(T) + start).expand(*shape, T).clone(),
        st.sampled_from([(), (1,), (B,), (B + 1,)]),
        st.integers(-1, N_CTX),
    )
    cache = st.builds(lambda b, n: ("new_cache", b, n), st.integers(1, 3), st.integers(1, N_CTX))
    kwargs = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "attention_mask": maybe(mask),
                "position_ids": maybe(positions),
                "logits_to_keep": maybe(st.integers(0, 8)),
                "stop_at_layer": maybe(st.integers(-CFG.n_layers, CFG.n_layers)),
                "cache": maybe(cache),
            },
        )
    )
    return tokens, kwargs


@FUZZ
@given(inputs=forward_inputs())
def test_forward(model, inputs):
    tokens, kwargs = inputs
    if isinstance(kwargs.get("cache"), tuple) and kwargs["cache"][:1] == ("new_cache",):
        _, batch, max_len = kwargs["cache"]
        kwargs["cache"] = model.new_cache(batch, max_len)
    out, _ = outcome(lambda: model(tokens, **kwargs))
    if out is not None:
        assert isinstance(out, torch.Tensor) and out.dim() == 3
        assert out.shape[-1] == (VOCAB if kwargs.get("stop_at_layer") is None else CFG.d_model)
        assert torch.isfinite(out).all()
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 2:
            assert out.shape[0] == tokens.shape[0]


@FUZZ
@given(batch=maybe(st.integers(1, 4)), max_len=maybe(st.one_of(st.none(), st.integers(1, N_CTX))))
def test_new_cache(model, batch, max_len):
    cache, _ = outcome(lambda: model.new_cache(batch, max_len))
    if cache is not None:
        assert cache.batch == batch and cache.max_len == (N_CTX if max_len is None else max_len)


@FUZZ
@given(
    text=maybe(st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=3)), PROMPTS),
    return_mask=maybe(st.booleans()),
)
def test_to_tokens(model, text, return_mask):
    out, _ = outcome(lambda: model.to_tokens(text, return_mask=return_mask))
    if out is not None:
        tokens = out[0] if isinstance(out, tuple) else out
        assert tokens.dtype == torch.long and tokens.dim() == 2 and tokens.numel() > 0


# ---- scoring ---------------------------------------------------------------------------------
SCORABLE = maybe(
    st.one_of(
        st.text(min_size=6, max_size=20),
        st.lists(st.integers(0, VOCAB - 1), min_size=2, max_size=8),
        tensors(dtypes=[torch.int64], max_dims=1, max_side=8, high=VOCAB - 1),
    ),
    WEIRD,
) | st.one_of(
    st.text(max_size=2),
    st.lists(st.integers(-1, VOCAB), max_size=8),
    tensors(dtypes=[torch.float32, torch.bool, torch.int32], max_dims=2, max_side=6, high=VOCAB),
    st.binary(max_size=6),
)
WINDOW = maybe(st.one_of(st.none(), st.integers(2, N_CTX)), WEIRD | st.sampled_from([1, N_CTX + 1]))


@FUZZ
@given(
    text=SCORABLE, bos=maybe(st.booleans()), stride=WINDOW, max_length=WINDOW,
    details=maybe(st.booleans()),
)  # fmt: skip
def test_perplexity(model, text, bos, stride, max_length, details):
    out, _ = outcome(
        lambda: model.perplexity(
            text, bos=bos, stride=stride, max_length=max_length, return_details=details
        )
    )
    if out is not None:
        ppl = out[0] if isinstance(out, tuple) else out
        assert isinstance(ppl, float) and ppl >= 1 and not math.isnan(ppl)


@FUZZ
@given(text=SCORABLE, bos=maybe(st.booleans()), stride=WINDOW)
def test_score(model, text, bos, stride):
    out, _ = outcome(lambda: model.score(text, bos=bos, stride=stride))
    if out is not None:
        assert len(out.tokens) == len(out.logprobs) == len(out.strings)
        assert ids_ok(out.tokens)
        assert all(lp <= 0 or math.isnan(lp) for lp in out.logprobs)


@FUZZ
@given(
    context=maybe(st.text(max_size=10)),
    choices=maybe(
        st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3),
        WEIRD | st.lists(st.text(max_size=2), max_size=2),
    ),
    bos=maybe(st.booleans()),
)
def test_choose(model, context, choices, bos):
    out, _ = outcome(lambda: model.choose(context, choices, bos=bos))
    if out is not None:
        assert 0 <= out.best < len(choices) and 0 <= out.best_norm < len(choices)
        assert all(ll <= 0 for ll in out.loglikelihoods)


# ---- loading and configs ------------------------------------------------------------------
LOAD_CFG = GPT2Config(n_layers=1, d_model=16, n_heads=2, n_ctx=8, d_vocab=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz_ckpt")
    GPT2(LOAD_CFG).init_weights(seed=0).save(str(directory))
    return directory


@settings(FUZZ, max_examples=40)
@given(
    name=maybe(st.sampled_from(["ckpt", "ckpt-str"]), WEIRD | st.sampled_from(["", "a\0b", "x" * 5000, "a/b"])),
    dtype=maybe(st.sampled_from([None, "float32", "bf16", "float16", "auto", torch.float64]), WEIRD | st.sampled_from(["int8", "fp64", torch.int64, "int4"])),
    device=maybe(st.sampled_from([None, "cpu", "cpu:0", torch.device("cpu")]), WEIRD | st.sampled_from(["meta", "cuda", "cuda:7", "xla", "", "nonsense"])),
    quantize=maybe(st.sampled_from([None, "int8"]), WEIRD | st.sampled_from(["int4", ""])),
    process=maybe(st.booleans()),
)  # fmt: skip
def test_load(checkpoint, monkeypatch_env, name, dtype, device, quantize, process):
    name = (
        {"ckpt": checkpoint, "ckpt-str": str(checkpoint)}.get(name, name)
        if isinstance(name, str)
        else name
    )
    model, _ = outcome(
        lambda: gpt2lab.load(name, dtype=dtype, device=device, quantize=quantize, process=process)
    )
    if model is not None:
        assert isinstance(model, GPT2) and model.device.type == "cpu"
        logits = model(torch.tensor([[1, 2, 3]]))
        assert logits.shape[-1] == model.cfg.d_vocab and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def monkeypatch_env(tmp_path_factory):
    """No network and an empty hub cache: a random name must fail fast, offline."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hub")))
    yield
    mp.undo()


JSON = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4), HUGE_INTS,
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=6,
)  # fmt: skip
HF_VALUES = {
    "n_layer": maybe(st.integers(1, 3)),
    "n_embd": maybe(st.sampled_from([8, 16, 32])),
    "n_head": maybe(st.sampled_from([1, 2, 4])),
    "n_positions": maybe(st.integers(1, 64)),
    "n_ctx": maybe(st.integers(1, 64)),
    "vocab_size": maybe(st.integers(1, 100)),
    "n_inner": maybe(st.one_of(st.none(), st.integers(1, 64))),
    "activation_function": maybe(st.sampled_from(["gelu_new", "relu", "gelu", "tanh"])),
    "layer_norm_epsilon": maybe(st.floats(1e-12, 1e-3)),
    "scale_attn_weights": maybe(st.booleans()),
    "scale_attn_by_inverse_layer_idx": maybe(st.booleans()),
    "reorder_and_upcast_attn": maybe(st.booleans()),
    "add_cross_attention": maybe(st.just(False)),
    "tie_word_embeddings": maybe(st.just(True)),
    "gpt2lab_ln_free": maybe(st.booleans()),
    "bos_token_id": JSON,
    "eos_token_id": JSON,
    "something_else": JSON,
}


@settings(FUZZ, max_examples=150)
@given(
    hf=maybe(
        st.fixed_dictionaries({"model_type": maybe(st.just("gpt2"))}, optional=HF_VALUES), JSON
    )
)
def test_config_from_hf(hf):
    cfg, _ = outcome(lambda: GPT2Config.from_hf(hf))
    if cfg is not None:
        for name in ("n_layers", "d_model", "n_heads", "n_ctx", "d_vocab", "d_mlp"):
            value = getattr(cfg, name)
            assert type(value) is int and value >= 1
        assert isinstance(cfg.layer_norm_eps, float) and 0 < cfg.layer_norm_eps < math.inf
        assert all(
            type(getattr(cfg, f)) is bool
            for f in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "ln_free")
        )
        assert cfg.n_params <= gpt2lab.config.MAX_PARAMS
        assert GPT2Config.from_hf(cfg.to_hf()) == cfg  # what is accepted round-trips


# ---- bounded resources: refused before allocating ---------------------------------------------
@pytest.fixture
def little_memory(monkeypatch):
    """Pretend 64 MB are free (and check every request against it)."""
    monkeypatch.setattr(validate, "UNCHECKED_BYTES", 0)
    monkeypatch.setattr(validate, "available_memory", lambda device=None: 64 << 20)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.generate("Hello", num_beams=10**6, max_new_tokens=2),
        lambda m: m.generate("Hello", num_beams=10**12, max_new_tokens=2),
        lambda m: m.generate("Hello", num_beams=400, num_return_sequences=400, max_new_tokens=2),
        lambda m: m.generate(["Hello", "Hi there, friend"], num_beams=10**9, max_new_tokens=2),
        lambda m: m.generate(["Hello"] * 500, max_new_tokens=2),
        lambda m: m.generate("Hello", penalty_alpha=0.5, top_k=50_000, max_new_tokens=2),
        lambda m: list(m.stream("Hello", penalty_alpha=0.5, top_k=50_000, max_new_tokens=2)),
        lambda m: m.new_cache(batch=10**9),
        lambda m: m.new_cache(batch=10**5, max_len=N_CTX),
        lambda m: m.choose("The", [" a"] * 1000),
    ],
    ids=[
        "beams-1e6",
        "beams-1e12",
        "return-sequences",
        "beams-padded-prompts",
        "batch",
        "contrastive",
        "stream",
        "cache-1e9",
        "cache-1e5",
        "choose",
    ],  # fmt: skip
)
def test_requests_that_do_not_fit_are_refused_before_allocating(model, little_memory, call):
    with pytest.raises(GPT2LabError, match=r"would need [\d.]+ [KMGTP]?B of memory"):
        call(model)


def test_huge_beams_are_refused_with_real_free_memory(model):
    """The case that was OOM-killed: a million beams, checked against this machine."""
    with pytest.raises(GPT2LabError, match="beam search with 1000000 beams"):
        model.generate("Hello", num_beams=10**6, max_new_tokens=2)


def test_requests_that_fit_still_run(model, little_memory):
    assert (
        len(model.generate("Hello", num_beams=4, max_new_tokens=3, return_result=True).tokens) == 1
    )
    assert model.new_cache(2, 16).batch == 2


GB = 1 << 30


def write_cgroup(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")


@pytest.mark.parametrize(
    "files, meminfo, expect",
    [
        # cgroup v2: limit 8 GB, 6 GB in use of which 1 GB inactive file cache -> 3 GB left
        ({"memory.max": str(8 * GB), "memory.current": str(6 * GB),
          "memory.stat": f"anon {4 * GB}\nfile {2 * GB}\ninactive_file {GB}"}, 100 * GB, 3 * GB),
        ({"memory.max": str(8 * GB), "memory.current": str(6 * GB)}, 100 * GB, 2 * GB),
        ({"memory.max": str(8 * GB), "memory.current": str(6 * GB)}, GB, GB),  # the machine's less
        ({"memory.max": "max", "memory.current": str(6 * GB)}, 5 * GB, 5 * GB),  # no limit
        ({"memory.max": str(4 * GB), "memory.current": str(5 * GB)}, 100 * GB, 0),  # over it
        ({"memory.max": str(8 * GB)}, 100 * GB, 8 * GB),  # usage unreadable: the limit
        # cgroup v1 (hierarchical inactive file cache in total_inactive_file)
        ({"memory/memory.limit_in_bytes": str(4 * GB), "memory/memory.usage_in_bytes": str(3 * GB),
          "memory/memory.stat": f"cache {2 * GB}\ntotal_inactive_file {GB // 2}"}, 100 * GB,
         GB + GB // 2),
        ({"memory/memory.limit_in_bytes": "9223372036854771712",
          "memory/memory.usage_in_bytes": str(3 * GB)}, 5 * GB, 5 * GB),  # v1's "no limit"
        ({}, 7 * GB, 7 * GB),  # no cgroup files at all
    ],
    ids=["v2", "v2-no-stat", "v2-machine-less", "v2-max", "v2-over", "v2-no-usage", "v1",
         "v1-unlimited", "none"],
)  # fmt: skip
def test_cpu_memory_is_the_container_limit_minus_its_usage(
    tmp_path, monkeypatch, files, meminfo, expect
):
    """Inside a container, what is left is its limit minus what it already uses (its
    inactive file cache counted as free), or the machine's MemAvailable if that is less."""
    write_cgroup(tmp_path, files)
    monkeypatch.setattr(validate, "CGROUP_ROOT", str(tmp_path))
    monkeypatch.setattr(validate, "_meminfo_available", lambda: meminfo)
    assert validate.available_memory("cpu") == expect


def test_cuda_memory_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    """Memory PyTorch has reserved but not allocated is free for our next allocation,
    though the driver counts it as taken."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (GB, 80 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * GB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * GB)
    assert validate.available_memory("cuda:0") == 4 * GB
    assert validate.available_memory(torch.device("cuda")) == 4 * GB


def test_sampling_from_nan_weights_is_a_clear_error(model):
    broken = GPT2(CFG).init_weights(seed=0).eval()
    with torch.no_grad():
        broken.blocks[0].mlp.c_fc.weight[0, 0] = math.nan
    for options in (dict(do_sample=True, seed=0), dict(), dict(num_beams=2),
                    dict(penalty_alpha=0.5, top_k=3)):  # fmt: skip
        with pytest.raises(GPT2LabError, match="not finite"):
            broken.generate("Hello", max_new_tokens=2, **options)


@pytest.mark.parametrize("in_features", [1, 7, 8, 24, 40, 48])
def test_int8_weights_of_a_narrow_layer(in_features):
    # torch's int8 kernel is wrong below / between multiples of 16 and crashes on odd
    # widths; Int8Linear must still compute x @ (q * s).T + b.
    from gpt2lab.quantize import Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 24)
    x = torch.randn(3, in_features)
    exact = linear(x)
    y = Int8Linear.from_linear(linear)(x.bfloat16()).float()
    assert torch.isfinite(y).all()
    assert (y - exact).abs().max() <= 0.05 * exact.abs().max()
