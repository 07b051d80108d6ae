"""Many concurrent streaming clients against one server (bounded, loopback only): every
stream is well formed and carries exactly what `model.generate` gives for that request
alone (greedy and seeded sampling), and repeated rounds do not grow the process' memory.
Throughput is measured in benchmarks/serve_load.py, not here."""

from __future__ import annotations

import json
import threading

import httpx
import psutil
import pytest

import gpt2lab
from gpt2lab.serve import BackgroundServer, ServeSettings, create_app

CLIENTS = 16
PROMPTS = ["ROMEO: What light", "The king is dead, and", "Once upon a time", "To be, or not"]


@pytest.fixture(scope="module")
def served():
    model = gpt2lab.load("bundled")
    app = create_app(model, ServeSettings(model_name="bundled", max_batch=8, max_streams=32))
    with BackgroundServer(app) as server:
        yield model, server.url, app


def request(i: int) -> dict:
    body = {"model": "bundled", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 8 + i % 5,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    if i % 2:
        body.update(temperature=0.9, top_k=50, seed=1000 + i)
    else:
        body.update(temperature=0)
    return body


def read_stream(url: str, body: dict) -> tuple[str, int]:
    """(text, completion tokens) of one streamed completion; fails on any malformed event."""
    pieces, usage, done = [], None, False
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ") and not done
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            assert usage is None  # the usage chunk is the last before [DONE]
            if chunk["choices"]:
                (choice,) = chunk["choices"]
                assert choice["index"] == 0
                pieces.append(choice["text"])
            else:
                usage = chunk["usage"]
    assert done and usage is not None
    return "".join(pieces), usage["completion_tokens"]


def one_round(url: str) -> list[tuple[str, int]]:
    out: list = [None] * CLIENTS
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            out[i] = read_stream(url, request(i))
        except BaseException as e:  # reported below, on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    if errors:
        raise errors[0]
    return out


def test_concurrent_streams_equal_each_request_alone(served):
    model, url, app = served
    got = one_round(url)
    for i, (text, n_tokens) in enumerate(got):
        body = request(i)
        options = {k: body[k] for k in ("temperature", "top_k", "seed") if k in body}
        ref = model.generate(
            body["prompt"], max_new_tokens=body["max_tokens"], return_result=True, **options
        )
        assert text == ref.texts[0]
        assert n_tokens == len(ref.tokens[0]) + (ref.finish_reasons[0] == "stop")
    assert app.state.engine.steps > 0


def test_memory_stays_flat_over_rounds(served):
    _, url, _ = served
    one_round(url)  # warm: kernels chosen, pools filled
    rss = psutil.Process().memory_info().rss
    for _ in range(3):
        one_round(url)
    grown = psutil.Process().memory_info().rss - rss
    assert grown < 64 * 2**20, f"the process grew {grown / 2**20:.0f} MiB over 3 rounds"


def test_the_serve_command_serves_and_stops_cleanly(tmp_path):
    """`gpt2lab serve` as a user starts it: port 0 (any free one, announced on stderr),
    healthy once loaded, answers a completion equal to model.generate, exits 0 on SIGTERM."""
    import re
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2lab", "serve", "--port", "0", "--served-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line
        url = f"http://127.0.0.1:{match.group(1)}"
        deadline = time.monotonic() + 120  # start-up bound, not a timing assertion
        while httpx.get(url + "/health").status_code != 200:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 6, "temperature": 0}
        text = httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"]
        assert text == gpt2lab.load("bundled").generate("Hello", max_new_tokens=6)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit by SIGTERM,
    # as any process that honours it)
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert "Application shutdown complete" in err and "Traceback" not in err
