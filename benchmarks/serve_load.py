"""Load benchmark of `gpt2lab serve`: many streaming clients against one client at a time.

    python benchmarks/serve_load.py [--model bundled|medium|PATH] [--clients 16]
                                    [--seconds 30] [--max-tokens 64] [--max-batch 16]

The server runs as its own process (`python -m gpt2lab serve` on 127.0.0.1, a free
port), as a user would start it; the clients are asyncio tasks in this process
speaking plain HTTP (httpx), each sending streaming completions (`stream: true` with
`stream_options.include_usage`) back to back for the whole period, each with its own
seed and temperature 1 so rows differ. Every stream is checked: each event is
`data: <JSON chunk>` with one choice, the usage chunk comes last, then `data: [DONE]`;
anything else counts as an error. Two phases, one after the other:
1. one client at a time (the baseline: tokens/s of a single stream);
2. `--clients` concurrent clients (continuous batching shares each decode step).
The table gives completed tokens/s (completion tokens from the usage chunks / wall
time), the ratio to phase 1, errors, and the server's resident memory (psutil) at the
start and end of phase 2 and its peak: flat memory means no per-request leak.
`--model medium` serves random weights of gpt2-medium's shape (made with transformers,
no hub). Timings on a shared 2-core VM vary; the server and clients share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from machine import print_machine  # noqa: E402

PROMPTS = [
    "ROMEO: What light through yonder window breaks?",
    "The king is dead, and",
    "Once upon a time, in a small village by the sea,",
    "To be, or not to be:",
    "My mistress' eyes are",
    "Now is the winter of our discontent",
]


TEMPERATURE = [1.0]  # --temperature (0: greedy)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def medium_checkpoint() -> str:
    """Random weights of gpt2-medium's shape in HF's layout (transformers, no hub)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(tempfile.mkdtemp(prefix="gpt2lab-medium-"))
    cfg = GPT2Config(n_layer=24, n_embd=1024, n_head=16, n_positions=1024)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return str(path)


def start_server(model: str, port: int, max_batch: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gpt2lab", "serve", "--model", model, "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", "256"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().strip()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become healthy in 300 s")


async def one_stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, str | None]:
    """(completion tokens, error or None) of one streamed completion, checked."""
    chunks, usage, done = 0, None, False
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return 0, f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if not line:
                    continue
                if not line.startswith("data: "):
                    return 0, f"not an SSE data line: {line[:80]!r}"
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                if done or usage is not None and json.loads(data).get("choices"):
                    return 0, "event after the usage chunk or [DONE]"
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif len(chunk.get("choices", [])) != 1:
                    return 0, f"chunk without one choice: {data[:80]!r}"
                else:
                    chunks += 1
    except (httpx.HTTPError, ValueError) as e:
        return 0, f"{type(e).__name__}: {e}"
    if not done or usage is None:
        return 0, "stream ended without usage and [DONE]"
    return int(usage["completion_tokens"]), None


async def client_loop(
    url: str, name: str, seconds: float, max_tokens: int, seed: int, stats: dict
) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=600) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            body = {"model": name, "prompt": rng.choice(PROMPTS), "max_tokens": max_tokens,
                    "temperature": TEMPERATURE[0], "seed": rng.randrange(2**31), "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            tokens, error = await one_stream(client, url, body)
            stats["tokens"] += tokens
            stats["requests"] += 1
            if error:
                stats["errors"].append(error)


def run_phase(url: str, name: str, clients: int, seconds: float, max_tokens: int, proc) -> dict:
    stats = {"tokens": 0, "requests": 0, "errors": []}
    mem = psutil.Process(proc.pid)
    rss = [mem.memory_info().rss]

    async def sample_memory(stop: asyncio.Event) -> None:
        while not stop.is_set():
            rss.append(mem.memory_info().rss)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def main() -> float:
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_memory(stop))
        start = time.monotonic()
        await asyncio.gather(
            *(client_loop(url, name, seconds, max_tokens, i, stats) for i in range(clients))
        )
        wall = time.monotonic() - start
        stop.set()
        await sampler
        return wall

    wall = asyncio.run(main())
    rss.append(mem.memory_info().rss)
    return {**stats, "wall": wall, "rss": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    args = ap.parse_args()
    TEMPERATURE[0] = args.temperature
    model = medium_checkpoint() if args.model == "medium" else args.model
    port = free_port()
    proc = start_server(model, port, args.max_batch)
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        # model name: whatever the server calls it
        name = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
        run_phase(url, name, 1, 3, 8, proc)  # warm-up (kernels chosen, caches built)
        single = run_phase(url, name, 1, args.seconds, args.max_tokens, proc)
        many = run_phase(url, name, args.clients, args.seconds, args.max_tokens, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    print_machine(
        f"server: gpt2lab serve --model {args.model} --max-batch {args.max_batch}",
        f"requests: streamed, {args.max_tokens} new tokens, temperature {args.temperature}",
    )
    base = single["tokens"] / single["wall"]
    mib = 1 << 20
    print(f"\n{'clients':>8} {'requests':>9} {'tokens/s':>9} {'vs 1':>6} {'errors':>7} "
          f"{'RSS start':>10} {'RSS end':>8} {'RSS peak':>9}")  # fmt: skip
    for label, r in (("1", single), (str(args.clients), many)):
        rate = r["tokens"] / r["wall"]
        print(f"{label:>8} {r['requests']:>9} {rate:>9.1f} {rate / base:>5.2f}x "
              f"{len(r['errors']):>7} {r['rss'][0] / mib:>8.0f}Mi {r['rss'][-1] / mib:>6.0f}Mi "
              f"{max(r['rss']) / mib:>7.0f}Mi")  # fmt: skip
    errors = single["errors"] + many["errors"]
    for e in errors[:5]:
        print("error:", e)
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
