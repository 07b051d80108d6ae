"""The /v1/interp routes: their numbers equal the library's (and an independent computation
from run_with_cache and the weights), and every bad request is a 400 with OpenAI's body.

The router runs in a bare FastAPI app (no engine, no other routes), so these tests check
the routes alone; tests/test_serve_browser.py drives them through the real app."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from fastapi import FastAPI
from fastapi.testclient import TestClient

import gpt2lab
from gpt2lab.interp import TunedLens, logit_lens
from gpt2lab.interp.patching import patch_prompts
from gpt2lab.serve import interp
from gpt2lab.steering import actadd

PROMPT = "When Mary and John went to the store, John gave a drink to"
CLEAN = "Mary and John: John gave it to"  # short: patching runs layers x positions passes
CORRUPTED = "Mary and John: Mary gave it to"


@pytest.fixture(scope="module")
def model():
    return gpt2lab.load("bundled")


def make_app(model, **state):
    app = FastAPI()
    app.include_router(interp.router(), prefix="/v1/interp")
    app.state.model = model
    for key, value in state.items():
        setattr(app.state, key, value)
    return app


@pytest.fixture(scope="module")
def client(model):
    return TestClient(make_app(model, settings=SimpleNamespace(max_prompt_tokens=200)))


def post(client, route, body):
    r = client.post(f"/v1/interp/{route}", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def ids_of(model, text):
    return model.tokenizer.encode(text)


# ---- numbers ------------------------------------------------------------------------
def test_tokens_ids_and_offsets(client, model):
    text = "Hi <b>there</b>, café 😀 done"
    got = post(client, "tokens", {"prompt": text})
    ids = ids_of(model, text)
    assert [t["id"] for t in got["tokens"]] == ids
    assert got["n_tokens"] == len(ids) and got["text"] == text
    # offsets tile the text; a token inside one character (the emoji is split) is empty
    assert got["tokens"][0]["start"] == 0 and got["tokens"][-1]["end"] == len(text)
    for a, b in zip(got["tokens"], got["tokens"][1:], strict=False):
        assert a["end"] == b["start"]
    assert "".join(text[t["start"] : t["end"]] for t in got["tokens"]) == text
    for t in got["tokens"]:
        assert t["text"] == model.tokenizer.decode([t["id"]])
        if "\ufffd" not in t["text"]:
            assert text[t["start"] : t["end"]] == t["text"]
    with_bos = post(client, "tokens", {"prompt": ids[:3], "prepend_bos": True})
    assert [t["id"] for t in with_bos["tokens"]] == [model.tokenizer.eot_token, *ids[:3]]


def test_next_token_is_the_models_softmax(client, model):
    got = post(client, "next_token", {"prompt": PROMPT, "k": 7})
    with torch.no_grad():
        logits = model(torch.tensor([ids_of(model, PROMPT)]))[0, -1]
    probs, top = logits.float().softmax(-1).topk(7)
    assert [t["id"] for t in got["top"]] == top.tolist()
    assert [t["text"] for t in got["top"]] == [model.tokenizer.decode([i]) for i in top.tolist()]
    torch.testing.assert_close(
        torch.tensor([t["prob"] for t in got["top"]]), probs, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        torch.tensor([t["logprob"] for t in got["top"]]), probs.log(), atol=1e-5, rtol=1e-5
    )


def independent_lens(model, ids):
    """softmax(ln_final(resid) @ W_U) of every residual stream, from run_with_cache."""
    L = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=names)
        resid = torch.stack([cache[n][0] for n in names])  # [rows, pos, d]
        ln = model.ln_final
        normed = F.layer_norm(resid, resid.shape[-1:], ln.weight, ln.bias, ln.eps)
        return (normed @ model.W_U).float().softmax(-1)  # [rows, pos, vocab]


def test_lens_grid_is_the_logit_lens(client, model):
    ids = ids_of(model, PROMPT)
    got = post(client, "lens", {"prompt": PROMPT, "k": 3})
    rows = model.cfg.n_layers + 1
    assert got["rows"] == ["embed"] + [f"block {i}" for i in range(model.cfg.n_layers)]
    assert got["lens"] == "logit lens" and got["k"] == 3
    assert [t["id"] for t in got["tokens"]] == ids
    top_ids, top_probs = torch.tensor(got["top_ids"]), torch.tensor(got["top_probs"])
    assert top_ids.shape == top_probs.shape == (rows, len(ids), 3)
    # the library's logit lens (its full log-probabilities) ...
    lib = logit_lens(model, PROMPT, k=3, keep_logprobs=True)
    assert torch.equal(top_ids, lib.top_ids)
    lib_probs = lib.logprobs.exp().gather(-1, top_ids)
    torch.testing.assert_close(top_probs, lib_probs.float(), atol=1e-5, rtol=0)
    # ... and an independent computation from the cache and the weights
    probs = independent_lens(model, ids)
    torch.testing.assert_close(top_probs, probs.gather(-1, top_ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(got["entropy"]), lib.entropy, atol=1e-5, rtol=0)
    # the last row is the model's own prediction
    with torch.no_grad():
        out = model(torch.tensor([ids]))[0].float().softmax(-1)
    torch.testing.assert_close(top_probs[-1], out.gather(-1, top_ids[-1]), atol=1e-5, rtol=0)
    assert got["strings"] == {
        str(i): model.tokenizer.decode([i]) for i in top_ids.unique().tolist()
    }


def test_tuned_lens_route_uses_the_loaded_lens(model):
    tuned = TunedLens(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in tuned.translators:
            t.weight.copy_(0.05 * torch.randn(t.weight.shape, generator=gen))
    client = TestClient(make_app(model, tuned_lens=tuned))
    got = post(client, "lens", {"prompt": PROMPT, "lens": "tuned", "k": 2})
    ref = tuned.apply(PROMPT, k=2)
    assert got["lens"] == "tuned lens"
    assert torch.equal(torch.tensor(got["top_ids"]), ref.top_ids)
    torch.testing.assert_close(torch.tensor(got["top_probs"]), ref.top_probs, atol=1e-5, rtol=0)
    plain = post(client, "lens", {"prompt": PROMPT, "lens": "logit", "k": 2})
    assert plain["top_probs"][0] != got["top_probs"][0]  # the translators changed row 0
    info = client.get("/v1/interp/info").json()
    assert info["tuned_lens"] is True


@pytest.mark.parametrize("head", [None, 2])
def test_attention_is_run_with_caches_pattern(client, model, head):
    ids = ids_of(model, PROMPT)
    body = {"prompt": PROMPT, "layer": 1} | ({} if head is None else {"head": head})
    got = post(client, "attention", body)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids]))
    ref = cache["blocks.1.attn.hook_pattern"][0]  # [heads, q, k]
    heads = list(range(model.cfg.n_heads)) if head is None else [head]
    assert got["heads"] == heads and got["layer"] == 1
    n = len(ids)
    for h, pattern in zip(heads, got["pattern"], strict=True):
        assert [len(row) for row in pattern] == list(range(1, n + 1))  # the lower triangle
        full = torch.zeros(n, n)
        for q, row in enumerate(pattern):
            full[q, : q + 1] = torch.tensor(row)
        torch.testing.assert_close(full, ref[h].float(), atol=1e-5, rtol=0)
        torch.testing.assert_close(full.sum(-1), torch.ones(n), atol=1e-4, rtol=0)


def test_neurons_are_the_most_active_with_their_vocabulary_effects(client, model):
    ids = ids_of(model, PROMPT)
    got = post(client, "neurons", {"prompt": PROMPT, "position": -2, "k": 4, "vocab_k": 3})
    assert got["position"] == len(ids) - 2 and got["token"]["id"] == ids[-2]
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids]))
    L, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    acts = torch.stack([cache[f"blocks.{i}.mlp.hook_post"][0, -2] for i in range(L)])
    values, flat = acts.reshape(-1).topk(4)
    assert [(n["layer"], n["neuron"]) for n in got["neurons"]] == [
        (i // d_mlp, i % d_mlp) for i in flat.tolist()
    ]
    torch.testing.assert_close(
        torch.tensor([n["activation"] for n in got["neurons"]]), values, atol=1e-5, rtol=0
    )
    for n in got["neurons"]:
        effect = model.W_out[n["layer"], n["neuron"]].float() @ model.W_U.float()  # [vocab]
        up, down = effect.topk(3), effect.topk(3, largest=False)
        assert [t["id"] for t in n["promotes"]] == up.indices.tolist()
        assert [t["id"] for t in n["suppresses"]] == down.indices.tolist()
        torch.testing.assert_close(
            torch.tensor([t["score"] for t in n["promotes"]]), up.values, atol=1e-5, rtol=1e-5
        )
    one = post(client, "neurons", {"prompt": PROMPT, "layer": 3, "k": 2})
    assert {n["layer"] for n in one["neurons"]} == {3}
    top3 = cache["blocks.3.mlp.hook_post"][0, -1].topk(2).indices.tolist()
    assert [n["neuron"] for n in one["neurons"]] == top3


def test_patching_is_patch_prompts(client, model):
    body = {"clean": CLEAN, "corrupted": CORRUPTED, "answer": " Mary", "wrong": " John"}
    got = post(client, "patching", body | {"what": "resid_pre"})
    ref = patch_prompts(model, CLEAN, CORRUPTED, " Mary", " John", progress=False)
    assert got["dims"] == ["layer", "pos"] and got["labels"] == ref.labels
    values = torch.tensor(got["values"])
    torch.testing.assert_close(values, ref.values, atol=1e-5, rtol=0)
    # the prompts differ in one token: patching it at layer 0 restores the clean run
    diff = [
        i
        for i, (a, b) in enumerate(zip(ids_of(model, CLEAN), ids_of(model, CORRUPTED), strict=True))
        if a != b
    ]
    assert len(diff) == 1 and abs(got["values"][0][diff[0]] - 1.0) < 1e-4
    assert got["clean_logit_diff"] == pytest.approx(ref.extra["clean_logit_diff"], abs=1e-5)
    heads = post(client, "patching", body | {"what": "z"})
    assert heads["dims"] == ["layer", "head"]
    assert torch.tensor(heads["values"]).shape == (model.cfg.n_layers, model.cfg.n_heads)


def test_steering_vector_is_actadd(client, model):
    got = post(client, "steering_vector", {"positive": "Love", "negative": "Hate"})
    hook = f"blocks.{model.cfg.n_layers // 2}.hook_resid_pre"
    ref = actadd(model, "Love", "Hate", hooks=hook).directions[hook]
    assert got["hook"] == hook and got["shape"] == list(ref.shape)
    torch.testing.assert_close(torch.tensor(got["values"]), ref, atol=1e-6, rtol=0)


def test_info(client, model):
    info = client.get("/v1/interp/info").json()
    assert info["model"]["n_layers"] == model.cfg.n_layers
    assert info["model"]["n_heads"] == model.cfg.n_heads
    assert info["max_prompt_tokens"] == 200 and info["tuned_lens"] is False
    assert info["steering"] == [] and "resid_pre" in info["patch_sites"]


# ---- bad requests ------------------------------------------------------------------------
BAD = [
    ("lens", {"prompt": 5}, "prompt"),
    ("lens", {"prompt": ""}, "prompt"),
    ("lens", {"prompt": [1, 50257]}, "prompt"),
    ("lens", {"prompt": ["a", "b"]}, "prompt"),
    ("tokens", {"prompt": [2**70]}, "prompt"),
    ("tokens", {"prompt": [3, -1]}, "prompt"),
    ("lens", {"prompt": "x", "k": 0}, "k"),
    ("lens", {"prompt": "x", "k": 11}, "k"),
    ("lens", {"prompt": "x", "k": "3"}, "k"),
    ("lens", {"prompt": "x", "lens": "tuned"}, "lens"),
    ("lens", {"prompt": "x", "lens": "other"}, "lens"),
    ("lens", {"prompt": "x", "path": "/etc/passwd"}, "path"),
    ("lens", {"prompt": "x", "prepend_bos": "yes"}, "prepend_bos"),
    ("lens", {"prompt": "a " * 201}, "prompt"),  # over max_prompt_tokens (200)
    ("tokens", {"prompt": list(range(300))}, "prompt"),  # over n_ctx too
    ("tokens", {}, "prompt"),
    ("next_token", {"prompt": "x", "k": 101}, "k"),
    ("attention", {"prompt": "x"}, "layer"),
    ("attention", {"prompt": "x", "layer": 4}, "layer"),
    ("attention", {"prompt": "x", "layer": -1}, "layer"),
    ("attention", {"prompt": "x", "layer": True}, "layer"),
    ("attention", {"prompt": "x", "layer": 0, "head": 4}, "head"),
    ("attention", {"prompt": "x", "layer": 0, "head": 1.5}, "head"),
    ("neurons", {"prompt": "a b", "position": 2}, "position"),
    ("neurons", {"prompt": "a b", "position": -3}, "position"),
    ("neurons", {"prompt": "a b", "layer": 9}, "layer"),
    ("neurons", {"prompt": "a b", "vocab_k": 21}, "vocab_k"),
    ("patching", {"clean": "a b", "corrupted": "a", "answer": " a", "wrong": " b"}, None),
    ("patching", {"clean": "a b", "corrupted": "a c", "answer": " a", "wrong": " b c"}, None),
    (
        "patching",
        {"clean": "a b", "corrupted": "a c", "answer": " a", "wrong": " b", "what": "x"},
        "what",
    ),  # fmt: skip
    (
        "patching",
        {"clean": "a " * 65, "corrupted": "b " * 65, "answer": " a", "wrong": " b"},
        "clean",
    ),  # fmt: skip
    ("patching", {"clean": "a b", "corrupted": "a b", "answer": " a", "wrong": " b"}, None),
    ("patching", {"clean": "a b", "corrupted": "a c", "answer": [1], "wrong": " b"}, "answer"),
    ("patching", {"clean": "a b", "corrupted": "a c", "answer": 2**70, "wrong": " b"}, "answer"),
    (
        "steering_vector",
        {"positive": "a", "negative": "b", "hook": "blocks.9.hook_resid_pre"},
        None,
    ),  # fmt: skip
    ("steering_vector", {"positive": "a", "negative": ""}, "negative"),
]


@pytest.mark.parametrize(("route", "body", "param"), BAD)
def test_bad_requests_are_400_with_an_openai_error(client, route, body, param):
    r = client.post(f"/v1/interp/{route}", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]


MALFORMED = [
    b"{not json",
    b"[1, 2]",
    b'"text"',
    b"",
    b'{"prompt": "x",}',
    b'{"prompt": "a\\ud800"}',
]


@pytest.mark.parametrize("content", MALFORMED)
def test_malformed_bodies_are_400(client, content):
    r = client.post(
        "/v1/interp/lens", content=content, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_over_limit_messages_name_the_limit(client):
    error = client.post("/v1/interp/lens", json={"prompt": "a " * 201}).json()["error"]
    assert "200" in error["message"] and error["code"] == "context_length_exceeded"


def test_all_heads_of_a_long_prompt_is_refused_one_head_is_not(client, monkeypatch):
    monkeypatch.setattr(interp, "MAX_ATTENTION_VALUES", 100)
    body = {"prompt": [64] * 20, "layer": 0}  # 20 tokens
    error = client.post("/v1/interp/attention", json=body).json()["error"]
    assert error["param"] == "head" and "one head" in error["message"]
    monkeypatch.setattr(interp, "MAX_ATTENTION_VALUES", 20 * 21 // 2)
    assert client.post("/v1/interp/attention", json=body | {"head": 0}).status_code == 200


def test_a_long_prompt_stays_bounded(model):
    """n_ctx tokens: every route answers; the lens grid covers every position, k capped."""
    client = TestClient(make_app(model))
    ids = [(i * 7919) % 50000 for i in range(model.cfg.n_ctx)]
    lens = post(client, "lens", {"prompt": ids})
    assert len(lens["top_ids"][0]) == model.cfg.n_ctx and len(lens["top_ids"][0][0]) == 5
    att = post(client, "attention", {"prompt": ids, "layer": 0, "head": 0})
    assert len(att["pattern"][0]) == model.cfg.n_ctx
    assert client.post("/v1/interp/lens", json={"prompt": ids + [1]}).status_code == 400


def test_no_model_yet_is_503(model):
    client = TestClient(make_app(None))
    r = client.post("/v1/interp/lens", json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"


# ---- schemathesis: no 5xx for requests generated from the routes' OpenAPI schema --------
FUZZ_EXAMPLES = 12  # per route and generation mode


def test_openapi_fuzz_no_server_errors(model):
    """Requests drawn from the OpenAPI schema (valid and invalid): never a 5xx. Each
    operation's hypothesis strategy is driven directly (schemathesis 4's pytest plugin
    breaks on pytest 9)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    app = make_app(model, settings=SimpleNamespace(max_prompt_tokens=24))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 8
    for op in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.body else [])
        for mode in modes:

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            def run(case):
                case.call_and_validate(checks=[not_a_server_error])

            run()
