"""The explorer page end to end: Playwright drives Debian's chromium (headless) against the
real app (create_app + uvicorn on 127.0.0.1) serving the bundled model.

What the page shows is checked against the library: the token strip against the
tokenizer, the lens grid's cells against logit_lens, the attention canvas against the
pattern's first row, the streamed and the steered continuations against model.generate
with the same options and seed. Screenshots go to test-artifacts/ (git-ignored).

The browser is a requirement, not an option: when /usr/bin/chromium is missing the
session fixture installs it with apt-get (as root), and otherwise fails saying how to
get it; the test never skips. GPT2LAB_CHROMIUM points at another chromium binary.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import uvicorn
from playwright.sync_api import Page, sync_playwright

import gpt2lab
from gpt2lab.interp import logit_lens
from gpt2lab.serve.app import create_app
from gpt2lab.serve.settings import ServeSettings
from gpt2lab.steering import actadd

CHROMIUM = Path(os.environ.get("GPT2LAB_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
PROMPT = "When Mary and John went to the store, John gave a drink to"
WAIT_MS = 120_000  # generous: the machine may be shared; these are waits, not assertions


def install_chromium() -> None:
    """Debian's chromium, installed with apt-get when we are root (as in CI's container)."""
    if CHROMIUM.exists() or str(CHROMIUM) != "/usr/bin/chromium":
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        subprocess.run(install, env=env, capture_output=True)


@pytest.fixture(scope="module")
def browser():  # module scope: Playwright's sync API keeps an event loop running in this
    # thread while it is open, which would break every later test that calls asyncio.run
    install_chromium()
    if not CHROMIUM.exists():
        pytest.fail(
            f"the browser test needs chromium at {CHROMIUM}: install Debian's package "
            "(`apt-get install -y chromium`, as root) or set GPT2LAB_CHROMIUM to a chromium "
            "binary",
            pytrace=False,
        )
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def start_server(app):
    """uvicorn on a free loopback port in a thread; returns (base_url, stop)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:  # waiting for start-up, not a timed assertion
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)

    def stop():
        server.should_exit = True
        thread.join(30)
        sock.close()

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def model():
    return gpt2lab.load("bundled")


@pytest.fixture(scope="module")
def base(model):
    url, stop = start_server(create_app(model, ServeSettings(max_tokens_cap=64)))
    yield url
    stop()


@pytest.fixture
def page(browser, base):
    """A fresh page on the explorer; fails the test on any script error or dialog."""
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    p = context.new_page()
    p.set_default_timeout(WAIT_MS)
    problems: list[str] = []
    p.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    p.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    p.goto(base + "/")
    p.wait_for_selector("body[data-ready='1']")
    yield p
    context.close()
    assert problems == []


def shown(text: str) -> str:
    """The page's rendering of a token's text in cells (whitespace made visible)."""
    if text == "":
        return "∅"
    return text.replace("\n", "↵").replace("\t", "⇥").replace(" ", "·")


def run(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#run")
    page.wait_for_selector("body[data-run='done']")


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_a_prompt_runs_lens_grid_and_attention(page, model):
    run(page, PROMPT)
    ids = model.tokenizer.encode(PROMPT)
    n, rows = len(ids), model.cfg.n_layers + 1
    # token strip: one span per token, its text, its id on hover
    strip = page.locator("#token-strip .token")
    assert strip.count() == n
    assert strip.all_text_contents() == [model.tokenizer.decode([i]) for i in ids]
    assert f"id {ids[3]}" in strip.nth(3).get_attribute("title")
    # next token: the model's top token first
    with torch.no_grad():
        top = int(model(torch.tensor([ids]))[0, -1].argmax())
    first = page.locator("#next-table tr").first.locator("td.tok")
    assert first.text_content() == shown(model.tokenizer.decode([top]))
    # lens grid: (n_layers + 1) x n_tokens cells, each the logit lens's top token
    cells = page.locator("#lens-grid td.lens-cell")
    assert cells.count() == rows * n
    lens = logit_lens(model, PROMPT, k=5)
    for r, p in [(0, 0), (1, 5), (rows - 1, n - 1), (rows // 2, n // 2)]:
        cell = page.locator(f"#lens-grid td[data-row='{r}'][data-pos='{p}'] .t")
        assert cell.text_content() == shown(lens.top_strings[r][p][0])
    # a click shows the cell's top-k
    page.click(f"#lens-grid td[data-row='{rows - 1}'][data-pos='{n - 1}']")
    detail = page.locator("#lens-detail td.tok")
    assert detail.all_text_contents() == [shown(s) for s in lens.top_strings[rows - 1][n - 1]]
    # attention: one canvas per head of layer 0, n x n pixels, drawn
    page.wait_for_selector("#attention-maps[data-rendered]")
    maps = page.locator("canvas.attention-map")
    assert maps.count() == model.cfg.n_heads
    size = maps.first.evaluate("c => [c.width, c.height]")
    assert size == [n, n]
    # query 0 attends only to itself (weight 1: dark); above the diagonal is blank (white)
    corner = maps.first.evaluate(
        "c => Array.from(c.getContext('2d').getImageData(0, 0, 1, 1).data)"
    )
    above = maps.first.evaluate(
        f"c => Array.from(c.getContext('2d').getImageData({n - 1}, 0, 1, 1).data)"
    )
    assert corner[:3] == [25, 85, 195] and above[:3] == [255, 255, 255]
    # another layer and a single head
    page.select_option("#att-layer", "2")
    page.select_option("#att-head", "1")
    page.wait_for_function(
        "() => { const c = document.querySelectorAll('canvas.attention-map');"
        " return c.length === 1 && c[0].dataset.layer === '2' && c[0].dataset.head === '1'; }"
    )
    # neuron panel: the last position's most active neurons
    assert page.locator("#neuron-list .neuron").count() == 8
    screenshot(page, "explorer-run.png")


def test_steering_panel_shows_plain_and_steered(page, model):
    run(page, PROMPT)
    page.fill("#steer-pos", "Love")
    page.fill("#steer-neg", "Hate")
    page.fill("#steer-coef", "4")
    page.fill("#steer-max", "24")
    page.fill("#steer-temp", "0.8")
    page.fill("#steer-seed", "0")
    page.click("#steer-run")
    page.wait_for_selector("#steer-section[data-done='1']")
    plain = page.text_content("#steer-plain")
    steered = page.text_content("#steer-steered")
    options = {"max_new_tokens": 24, "temperature": 0.8, "seed": 0}
    hook = f"blocks.{model.cfg.n_layers // 2}.hook_resid_pre"
    vector = actadd(model, "Love", "Hate", hooks=hook)
    assert plain == model.generate(PROMPT, **options)
    assert steered == model.generate(PROMPT, steer=(vector, 4.0), **options)
    assert plain != steered
    screenshot(page, "explorer-steering.png")


def test_streamed_generation(page, model):
    page.fill("#prompt", PROMPT)
    page.fill("#gen-max", "20")
    page.fill("#gen-temp", "0.8")
    page.fill("#gen-seed", "3")
    page.click("#gen-run")
    page.wait_for_selector("#stream-section[data-done='1']")
    expected = model.generate(PROMPT, max_new_tokens=20, temperature=0.8, seed=3)
    assert page.text_content("#gen-out") == PROMPT + expected


def test_script_in_a_prompt_renders_as_text(page):
    prompt = 'Say <script>alert(1)</script> and <img src=x onerror="alert(2)"> ok'
    run(page, prompt)
    assert "".join(page.locator("#token-strip .token").all_text_contents()) == prompt
    for where in ("#token-strip", "#lens-grid", "#next-table", "#neuron-list"):
        assert page.locator(f"{where} script, {where} img").count() == 0
    assert page.evaluate("document.scripts.length") == 1  # app.js only
    header = page.locator("#lens-grid th.col").all_text_contents()
    assert "<" in "".join(header) and "script" in "".join(header)
    screenshot(page, "explorer-script-prompt.png")
    # the page fixture asserts that no dialog fired and no script error happened


def test_a_full_context_prompt_stays_usable(page, model):
    """n_ctx tokens: the grid pages through positions, attention still draws."""
    n = model.cfg.n_ctx
    text = " ".join(["word"] * n)
    ids = model.tokenizer.encode(text)[:n]
    text = model.tokenizer.decode(ids)
    assert model.tokenizer.encode(text) == ids
    run(page, text)
    rows = model.cfg.n_layers + 1
    assert page.locator("#token-strip .token").count() == n
    assert page.locator("#lens-grid td.lens-cell").count() == rows * 64
    # the grid opens on the page holding the last position; it pages back
    first = page.locator("#lens-grid td.lens-cell").first
    assert first.get_attribute("data-pos") == str((n - 1) // 64 * 64)
    page.click("#lens-prev")
    assert first.get_attribute("data-pos") == str((n - 1) // 64 * 64 - 64)
    page.wait_for_selector("#attention-maps[data-rendered]")
    size = page.locator("canvas.attention-map").first.evaluate("c => [c.width, c.height]")
    assert size == [n, n]
    screenshot(page, "explorer-long-prompt.png")
