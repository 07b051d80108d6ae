"""Steering vectors: what they compute (closed form, numpy), where (absolute positions,
with and without the KV cache, left padding, per row), and their files (safetensors,
llama.cpp GGUF read back with the gguf package's own reader)."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch

import gpt2lab as gl
from gpt2lab import GPT2, GPT2Config, GPT2LabError
from gpt2lab.steering import (
    Steering,
    SteeringVector,
    actadd,
    load_gguf,
    mean_difference,
    reading_vector,
    save_gguf,
    steer,
)

HOOK = "blocks.1.hook_resid_pre"
POS = ["I love thee dearly", "sweet joy of my heart", "a fair and happy day"]
NEG = ["I hate thee bitterly", "foul grief of my heart", "a dark and wretched day"]


@pytest.fixture(scope="module")
def model():
    cfg = GPT2Config(n_layers=3, d_model=64, n_heads=4, n_ctx=64, d_vocab=50257, d_mlp=256)
    return GPT2(cfg).init_weights(seed=0).eval()


@pytest.fixture(scope="module")
def vec(model):
    return mean_difference(model, POS, NEG, hooks=[HOOK, "blocks.2.hook_resid_post"])


def unit(v):
    return v / np.linalg.norm(v)


def _closed_form(x, v, c, op):
    u = unit(v)
    p = x @ u
    if op == "add":
        return x + c * v
    if op == "ablate":
        return x - np.outer(p, u)
    if op == "ablate_add":
        return x - np.outer(p, u) + c * v
    return x + np.outer(np.minimum(p, c) - p, u)  # cap


@pytest.mark.parametrize("op", ["add", "ablate", "ablate_add", "cap"])
@pytest.mark.parametrize("preserve", [False, True])
def test_operators_closed_form(model, vec, op, preserve):
    tokens = model.to_tokens("The quick brown fox jumps over the lazy dog")
    v = vec[HOOK].numpy().astype(np.float64)
    c = 0.7 if op == "cap" else 3.0
    _, plain = model.run_with_cache(tokens, names_filter=HOOK)
    with steer(model, vec.only(HOOK), c, operator=op, preserve_norm=preserve):
        _, steered = model.run_with_cache(tokens, names_filter=HOOK)
    x = plain[HOOK][0].double().numpy()
    want = _closed_form(x, v, c, op)
    if preserve:
        want = want * (np.linalg.norm(x, axis=-1) / np.linalg.norm(want, axis=-1))[:, None]
    np.testing.assert_allclose(steered[HOOK][0].double().numpy(), want, rtol=1e-5, atol=1e-4)
    if op == "ablate" and not preserve:
        assert np.abs(steered[HOOK][0].double().numpy() @ unit(v)).max() < 1e-4


@pytest.mark.parametrize("op", ["add", "ablate", "ablate_add", "cap"])
def test_zero_vector_is_bit_identical(model, vec, op):
    tokens = model.to_tokens(["Hello there, friend", "A"], padding_side="left")
    zero = 0 * vec
    plain = model(tokens)
    with steer(model, zero, 5.0, operator=op, positions="generated"):
        assert torch.equal(model(tokens), plain)
    with steer(model, zero, 5.0, operator=op):
        assert torch.equal(model(tokens), plain)
    assert model.generate("Once upon", max_new_tokens=8, steer=(zero, 3.0)) == model.generate(
        "Once upon", max_new_tokens=8
    )


def test_api_equals_raw_hook(model, vec):
    tokens = model.to_tokens("To be, or not to be, that is the question")
    v = vec[HOOK]

    def raw(x, hook):
        return x + 2.5 * v

    with model.hooks(fwd_hooks=[(HOOK, raw)]):
        want = model(tokens)
    with model.hooks(), steer(model, vec.only(HOOK), 2.5):  # same (step-by-step) path
        got = model(tokens)
    assert torch.equal(got, want)
    with steer(model, vec.only(HOOK), 2.5):  # the fused path: equal to rounding
        torch.testing.assert_close(model(tokens), want, rtol=1e-5, atol=1e-5)


# ---- absolute positions: KV cache == full recomputation ----------------------------------
def _mode_mask(mode, ids, prompt_len):
    """Reference selection over absolute positions ids [B, S] (real-token index)."""
    if mode == "all":
        return torch.ones_like(ids, dtype=torch.bool)
    if mode == "prompt":
        return ids < prompt_len[:, None]
    if mode == "generated":
        return ids >= prompt_len[:, None]
    if isinstance(mode, int):
        return ids >= mode
    return mode[ids.clamp(max=len(mode) - 1)] & (ids < len(mode))


@pytest.mark.parametrize("mode", ["all", "prompt", "generated", 3, "mask"])
@pytest.mark.parametrize("op", ["add", "ablate_add"])
def test_kv_cache_equals_recomputation(model, vec, mode, op):
    """Greedy decoding with the cache, steered, against recomputing the whole sequence
    each step with a raw hook that steers the positions computed independently; a
    left-padded batch of two prompts of different lengths."""
    prompts = ["The king said that", "Hi"]
    tokens, mask = model.to_tokens(prompts, padding_side="left", return_mask=True)
    mask = mask.bool()
    B, T = tokens.shape
    prompt_len = mask.sum(1)
    spec = (
        torch.tensor([True, False, True, False, False, True, True, False, True])
        if mode == "mask"
        else mode
    )
    v = vec[HOOK].double()
    c = 4.0
    u = v / v.norm()

    def reference(x, hook, sel):
        xd = x.double()
        new = xd + c * v if op == "add" else xd - (xd @ u)[..., None] * u + c * v
        return torch.where(sel[..., None], new, xd).float()

    n_new = 6
    with torch.inference_mode():
        # cached, steered
        cache = model.new_cache(B, T + n_new)
        got_logits, seq = [], tokens
        with steer(model, vec.only(HOOK), c, operator=op, positions=spec):
            logits = model(tokens, attention_mask=mask, cache=cache)[:, -1]
            for _ in range(n_new):
                got_logits.append(logits)
                nxt = logits.argmax(-1)
                seq = torch.cat([seq, nxt[:, None]], 1)
                logits = model(nxt[:, None], cache=cache)[:, -1]
        # recomputed, raw hook over absolute positions
        full_mask = torch.cat([mask, torch.ones(B, n_new, dtype=torch.bool)], 1)
        ids = (full_mask.long().cumsum(1) - 1).clamp(min=0)
        for step in range(n_new):
            S = T + step
            sel = _mode_mask(spec, ids[:, :S], prompt_len) & full_mask[:, :S]
            with model.hooks(fwd_hooks=[(HOOK, lambda x, h, sel=sel: reference(x, h, sel))]):
                want = model(seq[:, :S], attention_mask=full_mask[:, :S])[:, -1]
            torch.testing.assert_close(got_logits[step], want, rtol=1e-5, atol=1e-5)
            assert torch.equal(got_logits[step].argmax(-1), seq[:, S])


def test_generate_and_stream_use_absolute_positions(model, vec):
    """generate / stream with positions="generated" equal the hand-written cached loop."""
    v1 = vec.only(HOOK)
    text = model.generate(
        "Once upon a time", max_new_tokens=6, steer=Steering(v1, 6.0, positions="generated")
    )
    streamed = "".join(
        model.stream(
            "Once upon a time", max_new_tokens=6, steer=Steering(v1, 6.0, positions="generated")
        )
    )
    assert text == streamed
    with steer(model, v1, 6.0, positions="generated"):
        assert model.generate("Once upon a time", max_new_tokens=6) == text
    # "generated" leaves the prompt alone: the first new token is the plain model's
    plain = model.generate("Once upon a time", max_new_tokens=1)
    assert (
        text.startswith(plain)
        or model.tokenizer.encode(text)[0] == model.tokenizer.encode(plain)[0]
    )


def test_per_row_vectors(model, vec):
    prompts = ["The king said that", "Hi there"]
    tokens, mask = model.to_tokens(prompts, padding_side="left", return_mask=True)
    v1 = vec.only(HOOK)
    with torch.inference_mode():
        plain = model(tokens, attention_mask=mask)
        with steer(model, [v1, None], [3.0, 0.0]):
            mixed = model(tokens, attention_mask=mask)
        with steer(model, v1, 3.0):
            both = model(tokens, attention_mask=mask)
        with steer(model, v1, [3.0, -2.0]):
            coefs = model(tokens, attention_mask=mask)
        with steer(model, v1, -2.0):
            neg = model(tokens, attention_mask=mask)
    assert torch.equal(mixed[1], plain[1])  # the unsteered row: bit for bit
    assert torch.equal(mixed[0], both[0])
    assert torch.equal(coefs[0], both[0]) and torch.equal(coefs[1], neg[1])
    # rows expand over beams and contrastive candidates (each prompt's rows consecutive)
    with steer(model, [v1, None], [3.0, 0.0]):
        beams = model.generate(prompts, max_new_tokens=4, num_beams=2)
        cands = model.generate(prompts, max_new_tokens=4, penalty_alpha=0.6, top_k=3)
    assert beams[1] == model.generate(prompts, max_new_tokens=4, num_beams=2)[1]
    assert cands[1] == model.generate(prompts, max_new_tokens=4, penalty_alpha=0.6, top_k=3)[1]


def test_actadd_sequence_at_front(model):
    a = actadd(model, "Love", "Hate is what I feel", hooks=HOOK)
    pos = model.to_tokens("Love")[0].tolist()
    neg = model.to_tokens("Hate is what I feel")[0].tolist()
    n = len(neg)
    space = model.tokenizer.encode(" ")[0]
    padded = torch.tensor([pos + [space] * (n - len(pos)), neg])
    _, cache = model.run_with_cache(padded, names_filter=HOOK)
    torch.testing.assert_close(a[HOOK], cache[HOOK][0] - cache[HOOK][1], rtol=0, atol=0)
    assert a[HOOK].shape == (n, 64)
    # applied at positions 0..n-1 (here from 2: 2..n+1) of a longer text, nowhere else
    tokens = model.to_tokens("It was the best of times, it was the worst of times")
    _, plain = model.run_with_cache(tokens, names_filter=HOOK)
    with steer(model, a, 2.0, positions="from=2"):
        _, got = model.run_with_cache(tokens, names_filter=HOOK)
    delta = got[HOOK][0] - plain[HOOK][0]
    torch.testing.assert_close(delta[2 : 2 + n], 2.0 * a[HOOK], rtol=1e-5, atol=1e-5)
    assert delta[:2].abs().max() == 0 and delta[2 + n :].abs().max() == 0


def test_makers_equal_numpy(model):
    hooks = [HOOK]
    _, cp = model.run_with_cache(POS, names_filter=HOOK)
    _, cn = model.run_with_cache(NEG, names_filter=HOOK)
    P, N = cp[HOOK][:, -1].double().numpy(), cn[HOOK][:, -1].double().numpy()
    md = mean_difference(model, POS, NEG, hooks=hooks)
    np.testing.assert_allclose(md[HOOK].numpy(), P.mean(0) - N.mean(0), rtol=1e-5, atol=1e-5)
    rv = reading_vector(model, POS, NEG, hooks=hooks)
    D = P - N
    _, _, vt = np.linalg.svd(D, full_matrices=False)
    axis = vt[0] if (np.sign(D @ vt[0]).sum() >= 0) else -vt[0]
    np.testing.assert_allclose(rv[HOOK].numpy(), axis, rtol=1e-4, atol=1e-5)
    assert abs(float(rv[HOOK].norm()) - 1) < 1e-5
    assert rv.meta["method"] == "reading_vector" and rv.meta["data"]["pairs"] == 3


def test_arithmetic(vec):
    w = 2 * vec - vec / 2
    torch.testing.assert_close(w[HOOK], 1.5 * vec[HOOK])
    assert torch.equal((-vec)[HOOK], -vec[HOOK])
    other = SteeringVector({"blocks.0.hook_resid_pre": torch.ones(64)})
    s = vec + other
    assert set(s.hooks) == {HOOK, "blocks.2.hook_resid_post", "blocks.0.hook_resid_pre"}


def test_file_round_trip_and_checks(model, vec, tmp_path):
    path = vec.save(tmp_path / "v.safetensors")
    back = SteeringVector.load(path, model)
    for h in vec.hooks:
        assert torch.equal(back[h], vec[h])
    assert back.meta["model"]["fingerprint"] == vec.meta["model"]["fingerprint"]
    assert back.meta["hooks"] == vec.hooks and back.meta["read"] == "last"
    assert back.meta["data"]["hash"].startswith("sha256:")
    # the safetensors header names every hook exactly, readable without gpt2lab
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        assert set(f.keys()) == set(vec.hooks)
        assert '"fingerprint"' in f.metadata()["gpt2lab"]
    # other weights: a warning; another size or an unknown hook: an error
    other = GPT2(model.cfg).init_weights(seed=1)
    with pytest.warns(UserWarning, match="other weights"):
        SteeringVector.load(path, other)
    bigger = GPT2(
        GPT2Config(n_layers=3, d_model=128, n_heads=4, n_ctx=64, d_vocab=50257, d_mlp=256)
    )
    with pytest.raises(GPT2LabError, match="width 64"):
        SteeringVector.load(path, bigger)
    shallow = GPT2(
        GPT2Config(n_layers=2, d_model=64, n_heads=4, n_ctx=64, d_vocab=50257, d_mlp=256)
    )
    with pytest.raises(GPT2LabError, match="no hook point named 'blocks.2.hook_resid_post'"):
        SteeringVector.load(path, shallow)


def test_gguf_control_vector(model, vec, tmp_path):
    gguf = pytest.importorskip("gguf")
    v = SteeringVector(
        {
            "blocks.1.hook_resid_post": vec[HOOK],
            "blocks.3.hook_resid_pre": vec["blocks.2.hook_resid_post"],
        }
    )
    deep = GPT2(
        GPT2Config(n_layers=4, d_model=64, n_heads=4, n_ctx=64, d_vocab=50257, d_mlp=256)
    ).init_weights(seed=0)
    path = save_gguf(v, tmp_path / "v.gguf", deep, coefficient=2.0)
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    got = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    assert set(got) == {
        "direction.1",
        "direction.2",
    }  # blocks.3.hook_resid_pre == output of block 2
    np.testing.assert_array_equal(got["direction.1"], 2.0 * vec[HOOK].numpy())
    np.testing.assert_array_equal(got["direction.2"], 2.0 * vec["blocks.2.hook_resid_post"].numpy())
    back = load_gguf(path, deep)
    assert set(back.hooks) == {"blocks.1.hook_resid_post", "blocks.2.hook_resid_post"}
    # the mapping is an identity of the model: adding at block k's output == at k+1's input
    tokens = deep.to_tokens("Hello world, again")
    d = vec[HOOK]
    with deep.hooks():
        with steer(deep, SteeringVector({"blocks.2.hook_resid_post": d}), 3.0):
            a = deep(tokens)
        with steer(deep, SteeringVector({"blocks.3.hook_resid_pre": d}), 3.0):
            b = deep(tokens)
    assert torch.equal(a, b)
    for bad, match in [
        ({"blocks.0.hook_resid_post": d}, "blocks 1..3"),
        ({"blocks.1.hook_resid_pre": d}, "direction.0"),
        ({"blocks.1.hook_mlp_out": d}, "no GGUF equivalent"),
    ]:
        with pytest.raises(GPT2LabError, match=match):
            save_gguf(SteeringVector(bad), tmp_path / "bad.gguf", deep)
    with pytest.raises(GPT2LabError, match="sequence"):
        save_gguf(
            actadd(deep, "a b", "c", hooks="blocks.1.hook_resid_post"), tmp_path / "s.gguf", deep
        )


def test_threads_do_not_share_steering(model, vec):
    prompt = "The meaning of life is"
    plain = model.generate(prompt, max_new_tokens=8)
    steered = model.generate(prompt, max_new_tokens=8, steer=(vec, 8.0))
    assert steered != plain
    out = {}

    def run(name, s):
        for _ in range(3):
            if s:
                with steer(model, vec, 8.0):
                    out.setdefault(name, set()).add(model.generate(prompt, max_new_tokens=8))
            else:
                out.setdefault(name, set()).add(model.generate(prompt, max_new_tokens=8))

    threads = [threading.Thread(target=run, args=(i, i % 2 == 0)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out[0] == out[2] == {steered} and out[1] == out[3] == {plain}


def test_score_and_perplexity_steered(model, vec):
    text = "So foul and fair a day I have not seen"
    with steer(model, vec, 5.0):
        want = model.perplexity(text)
    assert model.perplexity(text, steer=(vec, 5.0)) == want != model.perplexity(text)


BAD = [
    (lambda m, v: steer(m, v, 1.0, operator="multiply"), "operator must be one of"),
    (lambda m, v: steer(m, v, float("nan")), "finite"),
    (lambda m, v: steer(m, v, "big"), "coefficient"),
    (lambda m, v: steer(m, v, positions="middle"), "positions must be"),
    (lambda m, v: steer(m, v, positions="from=-1"), "k >= 0"),
    (lambda m, v: steer(m, v, positions=[1, 2]), "boolean mask"),
    (lambda m, v: steer(m, "v"), "SteeringVector"),
    (lambda m, v: steer(m, [None, None]), "at least one row"),
    (lambda m, v: steer(m, [v, None], [1.0, 2.0, 3.0]), "3 coefficients for 2 rows"),
    (
        lambda m, v: steer(m, SteeringVector({"blocks.9.hook_resid_pre": torch.ones(64)})),
        "no hook point",
    ),
    (
        lambda m, v: steer(m, SteeringVector({"blocks.0.attn.hook_z": torch.ones(64)})),
        "head or score axis",
    ),
    (lambda m, v: steer(m, SteeringVector({HOOK: torch.ones(32)})), "width 32"),
    (lambda m, v: SteeringVector({HOOK: torch.tensor([float("inf")] * 64)}), "not finite"),
    (lambda m, v: SteeringVector({}), "at least one"),
    (lambda m, v: mean_difference(m, [], NEG, hooks=HOOK), "non-empty list"),
    (lambda m, v: mean_difference(m, POS, [""], hooks=HOOK), "empty or non-text"),
    (lambda m, v: mean_difference(m, POS, NEG), "name the hooks"),
    (lambda m, v: mean_difference(m, POS, NEG, layers=7), "layer"),
    (lambda m, v: mean_difference(m, POS, NEG, hooks=HOOK, read="first"), "read must be"),
    (lambda m, v: mean_difference(m, POS, NEG, hooks=HOOK, read=40), "more than 40 tokens"),
    (lambda m, v: reading_vector(m, POS, NEG[:2], hooks=HOOK), "pair the texts"),
    (lambda m, v: reading_vector(m, POS[:1], NEG[:1], hooks=HOOK), "at least 2 pairs"),
    (lambda m, v: actadd(m, "", "x", hooks=HOOK), "non-empty"),
    (lambda m, v: m.generate("Hi", steer="v.safetensors"), "steer= takes"),
    (lambda m, v: SteeringVector.load("/nonexistent/v.safetensors"), "does not exist"),
]


@pytest.mark.parametrize("make, match", BAD, ids=[m for _, m in BAD])
def test_bad_input(model, vec, make, match):
    with pytest.raises(GPT2LabError, match=match):
        with make(model, vec):
            model(model.to_tokens("Hi"))


def test_writes_make_folders_and_fail_in_one_line(model, vec, tmp_path):
    deep = tmp_path / "a" / "b" / "v.safetensors"
    vec.save(deep)  # missing folders are created, as for every gpt2lab output
    assert torch.equal(SteeringVector.load(deep)[HOOK], vec[HOOK])
    (tmp_path / "file").write_text("x")
    with pytest.raises(GPT2LabError, match="cannot write"):
        vec.save(tmp_path / "file" / "v.safetensors")  # a file where a folder must be
    with pytest.raises(GPT2LabError, match="cannot write"):
        save_gguf(
            SteeringVector({"blocks.1.hook_resid_post": vec[HOOK]}),
            tmp_path / "file" / "v.gguf",
            model,
        )


def test_not_a_vector_file(model, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(GPT2LabError, match="not a steering vector file"):
        SteeringVector.load(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({HOOK: torch.ones(64)}, str(plain))
    with pytest.raises(GPT2LabError, match="not a gpt2lab steering vector"):
        SteeringVector.load(plain)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(GPT2LabError, match="not a GGUF file|holds no direction"):
        load_gguf(bad, model)


def test_bundled_steering_changes_text():
    m = gl.load("bundled")
    v = mean_difference(m, POS, NEG, layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # made on this model: no fingerprint warning
        v.check(m)
    assert m.generate("ROMEO:", max_new_tokens=12, steer=(v, 6.0)) != m.generate(
        "ROMEO:", max_new_tokens=12
    )
