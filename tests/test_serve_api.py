"""The OpenAI-compatible API, driven by the official `openai` client against a real uvicorn
server on 127.0.0.1 (the bundled model): the text equals model.generate with the same
options and seed (choice i of a request with seed s uses s + i), echo logprobs equal
model.score, and streams, usage, stop, logit_bias and steering behave as documented."""

from __future__ import annotations

import math
import threading

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

import gpt2lab
from gpt2lab.serve import BackgroundServer, ServeSettings, create_app
from gpt2lab.steering import SteeringVector

NAME = "bundled"
PROMPT = "ROMEO: What light"
HOOK = "blocks.1.hook_resid_pre"


def start_server(app):
    """The app on a free loopback port in a thread (gpt2lab.serve.BackgroundServer);
    returns (base_url, stop)."""
    server = BackgroundServer(app)
    return server.url, server.stop


@pytest.fixture(scope="module")
def model():
    return gpt2lab.load("bundled")


@pytest.fixture(scope="module")
def vector(model):
    torch.manual_seed(0)
    return SteeringVector({HOOK: torch.randn(model.cfg.d_model) * 8}, {"method": "test"})


@pytest.fixture(scope="module")
def server(model, vector, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vectors")
    vector.save(folder / "shout.safetensors")
    settings = ServeSettings(model_name=NAME, max_tokens_cap=64, steering_dir=str(folder))
    base, stop = start_server(create_app(model, settings))
    yield base
    stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(server, model):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    (card,) = httpx.get(server + "/v1/models").json()["data"]
    assert card["id"] == NAME
    cfg = model.cfg
    assert card["meta"]["n_ctx"] == cfg.n_ctx and card["meta"]["d_model"] == cfg.d_model
    assert card["meta"]["n_layers"] == cfg.n_layers
    assert card["meta"]["vocabulary"] == cfg.d_vocab
    assert card["meta"]["parameters"] == sum(p.numel() for p in model.parameters())


def test_a_model_id_with_a_slash(model):
    """`--model owner/name` serves under that HF repo id: GET /v1/models/owner/name finds
    it (the route took one path segment: a 404 for the server's own model)."""
    client = TestClient(create_app(model, ServeSettings(model_name="openai-community/gpt2")))
    r = client.get("/v1/models/openai-community/gpt2")
    assert r.status_code == 200 and r.json()["id"] == "openai-community/gpt2"
    r = client.get("/v1/models/openai-community/gpt3")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    "options",
    [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.9, "seed": 5}, {"seed": 11}],
    ids=["greedy", "top_p", "default_temperature"],
)
def test_text_equals_generate(client, model, options):
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, **options)
    # OpenAI's default temperature is 1 (sampling): generate is given it explicitly
    ref = model.generate(PROMPT, max_new_tokens=12, return_result=True,
                         **{"temperature": 1.0, **options})  # fmt: skip
    assert out.choices[0].text == ref.texts[0]
    assert out.usage.prompt_tokens == len(model.tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens == len(ref.tokens[0])


def test_n_and_prompt_lists_use_seed_plus_choice_index(client, model):
    prompts = ["KING:", "QUEEN: My lord"]
    out = client.completions.create(
        model=NAME, prompt=prompts, n=2, max_tokens=10, temperature=1.0, seed=7
    )
    repeated = [p for p in prompts for _ in range(2)]
    ref = model.generate(repeated, max_new_tokens=10, temperature=1.0, seed=7,
                         return_result=True)  # fmt: skip
    expected = ref.texts
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == expected
    assert expected[0] != expected[1]  # the two samples of a prompt differ (seeds 7 and 8)
    ids = [model.tokenizer.encode(p) for p in prompts]
    assert out.usage.prompt_tokens == sum(len(i) for i in ids)
    assert out.usage.completion_tokens == sum(len(t) for t in ref.tokens)


def test_token_id_prompts(client, model):
    ids = model.tokenizer.encode(PROMPT)
    out = client.completions.create(model=NAME, prompt=[ids, ids[:3]], max_tokens=6,
                                    temperature=0)  # fmt: skip
    for choice, row in zip(out.choices, [ids, ids[:3]], strict=True):
        assert choice.text == model.tokenizer.decode(model.generate(row, max_new_tokens=6))


def test_logprobs_equal_generate(client, model):
    out = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=8, temperature=0.7, seed=3, logprobs=3
    )
    ref = model.generate(PROMPT, max_new_tokens=8, temperature=0.7, seed=3, return_result=True)
    lp = out.choices[0].logprobs
    assert lp.tokens == [model.tokenizer.decode([t]) for t in ref.tokens[0]]
    assert "".join(lp.tokens) == out.choices[0].text == ref.texts[0]
    assert lp.token_logprobs == pytest.approx(ref.logprobs[0], abs=1e-4)
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) in (3, 4)  # the 3 likeliest, and the sampled token (as OpenAI)
        assert top[token] == pytest.approx(token_lp, abs=1e-6)
        assert len(top) == 3 or token_lp < sorted(top.values())[-3] - 1e-6
        assert max(top.values()) >= token_lp - 1e-6
    offsets = [len(PROMPT)]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets


def test_echo_max_tokens_0_equals_score(client, model):
    text = "JULIET: O Romeo, Romeo! wherefore art thou Romeo?"
    out = client.completions.create(model=NAME, prompt=text, max_tokens=0, echo=True, logprobs=2)
    choice = out.choices[0]
    assert choice.text == text
    score = model.score(text, bos=False)
    lp = choice.logprobs
    assert lp.tokens == score.strings
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert math.isnan(score.logprobs[0])
    assert lp.token_logprobs[1:] == pytest.approx(score.logprobs[1:], abs=1e-4)
    for token, token_lp, top in zip(
        lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True
    ):
        assert len(top) in (2, 3) and max(top.values()) >= token_lp - 1e-6
        assert top[token] == pytest.approx(token_lp, abs=1e-6)
    assert out.usage.completion_tokens == 0
    assert out.usage.prompt_tokens == len(score.tokens)


def test_echo_then_generated_token_like_lm_eval(client, model):
    """lm-eval's local-completions scoring request: echo, max_tokens=1, logprobs=1."""
    out = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    lp = out.choices[0].logprobs
    ref = model.generate(PROMPT, max_new_tokens=1, return_result=True)
    n = len(model.tokenizer.encode(PROMPT))
    assert len(lp.tokens) == n + 1
    assert out.choices[0].text == PROMPT + ref.texts[0]
    assert lp.token_logprobs[1:n] == pytest.approx(model.score(PROMPT, bos=False).logprobs[1:],
                                                   abs=1e-4)  # fmt: skip
    assert lp.token_logprobs[n] == pytest.approx(ref.logprobs[0][0], abs=1e-4)
    assert lp.token_logprobs[n] == pytest.approx(max(lp.top_logprobs[n].values()), abs=1e-6)
    assert lp.text_offset[n] == len(PROMPT)


def test_stream_equals_non_stream(client, model):
    options = dict(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0.9, seed=21)
    whole = client.completions.create(**options)
    chunks = list(client.completions.create(
        stream=True, stream_options={"include_usage": True}, logprobs=1, **options))  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])
    streamed_tokens = [t for c in chunks if c.choices for t in c.choices[0].logprobs.tokens]
    assert "".join(streamed_tokens) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(streamed_tokens)
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stream_sse_wire_format(server):
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "n": 2}
    with httpx.stream("POST", server + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    indexes = {int(e.split('"index": ')[1].split(",")[0]) for e in events[:-2]}
    assert indexes == {0, 1}


def test_stop_strings(client, model):
    options = dict(max_tokens=40, temperature=0)
    out = client.completions.create(model=NAME, prompt=PROMPT, stop=["\n"], **options)
    expected = model.generate(PROMPT, max_new_tokens=40, stop=["\n"])
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "stop"
    assert "\n" not in expected and "\n" in model.generate(PROMPT, max_new_tokens=40)


def test_logit_bias_forces_a_token(client, model):
    the = model.tokenizer.encode(" the")[0]
    out = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=5, temperature=0, logit_bias={str(the): 100}
    )
    assert out.choices[0].text == " the" * 5
    assert out.choices[0].text == model.generate(PROMPT, max_new_tokens=5, logit_bias={the: 100})


def test_gpt2lab_decoder_options(client, model):
    extra = {"top_k": 5, "repetition_penalty": 1.3, "min_tokens": 4, "no_repeat_ngram_size": 2}
    out = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=10, seed=2, extra_body=extra
    )
    expected = model.generate(
        PROMPT,
        max_new_tokens=10,
        temperature=1.0,
        seed=2,
        top_k=5,
        repetition_penalty=1.3,
        min_new_tokens=4,
        no_repeat_ngram_size=2,
    )
    assert out.choices[0].text == expected  # fmt: skip


def test_steering_by_name_and_unsteered(client, model, vector):
    extra = {"steering": {"name": "shout", "coefficient": 2.0}, "return_unsteered": True}
    out = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=10, seed=4, extra_body=extra
    )
    options = dict(max_new_tokens=10, temperature=1.0, seed=4)
    steered = model.generate(PROMPT, steer=(vector, 2.0), **options)
    plain = model.generate(PROMPT, **options)
    choice = out.choices[0].model_dump()
    assert choice["text"] == steered and choice["unsteered"]["text"] == plain
    assert steered != plain


def test_steering_inline_values(client, model, vector):
    spec = {"hook": HOOK, "values": vector[HOOK].tolist(), "coefficient": -1.5,
            "positions": "generated"}  # fmt: skip
    out = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"steering": [spec]}
    )
    from gpt2lab.steering import Steering

    how = Steering(vector, -1.5, positions="generated")
    assert out.choices[0].text == model.generate(PROMPT, max_new_tokens=8, steer=how)


def test_tokenize_detokenize(server, model):
    text = "Hello world! Ünïcödé 🙂"
    r = httpx.post(server + "/v1/tokenize", json={"prompt": text, "return_token_strs": True})
    ids = model.tokenizer.encode(text)
    assert r.json()["tokens"] == ids and r.json()["count"] == len(ids)
    assert len(r.json()["token_strs"]) == len(ids)
    back = httpx.post(server + "/v1/detokenize", json={"tokens": ids}).json()
    assert back == {"prompt": text}


def test_metrics_count_requests_and_tokens(server, client):
    before = httpx.get(server + "/metrics").text
    client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3, temperature=0)
    after = httpx.get(server + "/metrics").text

    def value(text, line_start):
        lines = [x for x in text.splitlines() if x.startswith(line_start)]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    ok = 'gpt2lab_requests_total{method="POST",route="/v1/completions",status="200"}'
    assert value(after, ok) == value(before, ok) + 1
    completion = "gpt2lab_completion_tokens_total "
    assert value(after, completion) == value(before, completion) + 3
    assert "gpt2lab_queue_length 0" in after
    assert 'gpt2lab_request_duration_seconds_bucket{route="/v1/completions",le="+Inf"}' in after


def test_client_leaving_a_stream_frees_its_slot(server, model):
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 64, "ignore_eos": True,
            "temperature": 0, "stream": True}  # fmt: skip
    with httpx.stream("POST", server + "/v1/completions", json=body) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: {")
    tick = threading.Event()  # never set: wait(0.02) is a short pause
    for _ in range(1500):  # the server notices the closed connection; bounded wait
        metrics = httpx.get(server + "/metrics").text
        if "gpt2lab_active_streams 0" in metrics and "gpt2lab_active_rows 0" in metrics:
            break
        tick.wait(0.02)
    assert "gpt2lab_active_streams 0" in metrics and "gpt2lab_active_rows 0" in metrics
    out = httpx.post(server + "/v1/completions", json={**body, "stream": False, "max_tokens": 3})
    assert out.json()["choices"][0]["text"] == model.generate(PROMPT, max_new_tokens=3)
