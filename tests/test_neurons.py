"""Neuron statistics (gpt2lab.interp.neurons) against references computed independently:
the full activation matrix materialized with run_with_cache over the same windows, then
numpy / scipy for the moments, a brute-force lexicographic sort for the top-k, the
splitmix64 hash written again in plain Python ints for the samples. Also: an interrupted
and resumed run equals an uninterrupted one, two gloo processes equal one, bad inputs
are one-line errors."""

from __future__ import annotations

import html
import json
import math
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

import gpt2lab as gl
from gpt2lab import GPT2LabError
from gpt2lab.interp.corpus import open_corpus, windows
from gpt2lab.interp.neurons import EMPTY, load_stats, neuron_stats

WORDS = ("love hate king queen sword crown night day O my lord , . ! ? ; and the of to thy thou "
         "art hath death life heaven hell fair foul sweet bitter\n").split(" ")  # fmt: skip
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards: one thread is faster

HOOKS = ["blocks.1.mlp.hook_post", "blocks.3.hook_resid_post", "hook_embed"]
RUN = dict(seq_len=48, batch_size=3, top_k=5, n_random=4, lo=-2.0, hi=3.0, bins=25,
           context=(3, 2), drop=["<|endoftext|>", "\n"], seed=7, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return gl.load("bundled")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Six documents of seeded word salad (about 750 tokens): repeated words give
    exact ties in hook_embed, whose activation depends on the token only."""
    root = tmp_path_factory.mktemp("neuron_corpus")
    rng = random.Random(0)
    for i in range(6):
        words = [rng.choice(WORDS) for _ in range(rng.randint(40, 150))]
        (root / f"doc{i}.txt").write_text(" ".join(words))
    return root


@pytest.fixture(scope="module")
def result(model, corpus):
    return neuron_stats(model, corpus, hooks=HOOKS, **RUN)


@pytest.fixture(scope="module")
def matrix(model, corpus):
    """Per hook: every token's activation [tokens, units] (float32), and per token its
    id, kept flag, offset, doc, pos, row and column, over the same windows."""
    src = open_corpus(corpus, model.tokenizer)
    acts = {h: [] for h in HOOKS}
    info = {k: [] for k in ("tokens", "keep", "offset", "doc", "pos")}
    for w in windows(src, seq_len=RUN["seq_len"], batch_size=RUN["batch_size"], drop=RUN["drop"]):
        with torch.inference_mode():
            _, cache = model.run_with_cache(w.tokens, names_filter=HOOKS)
        for h in HOOKS:
            acts[h].append(cache[h].reshape(-1, cache[h].shape[-1]).float().numpy())
        for k in info:
            info[k].append(getattr(w, k).reshape(-1).numpy())
    out = {h: np.concatenate(a) for h, a in acts.items()}
    out.update({k: np.concatenate(v) for k, v in info.items()})
    return out


def splitmix(x: int) -> int:
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def key(offset: int, seed: int) -> int:
    return splitmix((offset + splitmix(seed)) & ((1 << 64) - 1)) >> 1


@pytest.mark.parametrize("hook", HOOKS)
def test_moments_equal_numpy_scipy(result, matrix, hook):
    x = matrix[hook][matrix["keep"]].astype(np.float64)
    assert result.get(hook, "count").item() == len(x) == result.meta["tokens_kept"][hook]
    assert result.meta["tokens_read"] == int((matrix["offset"] >= 0).sum())
    close = dict(rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.get(hook, "mean").numpy(), x.mean(0), **close)
    np.testing.assert_allclose(result.get(hook, "var").numpy(), x.var(0), **close)
    np.testing.assert_allclose(result.get(hook, "skew").numpy(), scipy.stats.skew(x, 0),
                               rtol=1e-7, atol=1e-9)  # fmt: skip
    np.testing.assert_allclose(result.get(hook, "kurtosis").numpy(),
                               scipy.stats.kurtosis(x, 0, fisher=True), rtol=1e-7, atol=1e-8)  # fmt: skip
    np.testing.assert_array_equal(result.get(hook, "frac_active").numpy(), (x > 0).mean(0))


@pytest.mark.parametrize("hook", HOOKS)
def test_histogram_equals_numpy(result, matrix, hook):
    x = matrix[hook][matrix["keep"]].astype(np.float64)
    lo, hi, bins = RUN["lo"], RUN["hi"], RUN["bins"]
    b = np.clip(np.floor((x - lo) * (bins / (hi - lo))), -1, bins).astype(int) + 1
    want = np.stack([np.bincount(b[:, u], minlength=bins + 2) for u in range(x.shape[1])])
    np.testing.assert_array_equal(result.get(hook, "hist").numpy(), want)
    # the inner bins agree with numpy.histogram wherever no value sits on an edge
    u = 0
    inner, _ = np.histogram(x[:, u], bins=bins, range=(lo, hi))
    assert abs(want[u, 1:-1] - inner).sum() <= (x[:, u] == hi).sum()


@pytest.mark.parametrize("hook", HOOKS)
def test_top_k_equals_brute_force_sort(result, matrix, hook):
    k, (before, after), seq = RUN["top_k"], RUN["context"], RUN["seq_len"]
    keep, off = matrix["keep"], matrix["offset"]
    x = matrix[hook]
    rows = np.flatnonzero(keep)
    ties = 0
    for u in range(x.shape[1]):
        vals = x[rows, u]
        order = np.lexsort((off[rows], -vals))[:k]  # value descending, then lower offset
        best = rows[order]
        ties += len(np.unique(vals[order])) < k
        np.testing.assert_array_equal(result.get(hook, "top_val")[u].numpy(), x[best, u])
        np.testing.assert_array_equal(result.get(hook, "top_off")[u].numpy(), off[best])
        np.testing.assert_array_equal(result.get(hook, "top_doc")[u].numpy(), matrix["doc"][best])
        np.testing.assert_array_equal(result.get(hook, "top_pos")[u].numpy(), matrix["pos"][best])
        if u % 97 == 0:  # contexts: the window's tokens around the max, and this unit's acts
            for i, t in enumerate(best):
                col = t % seq
                span = np.arange(col - before, col + after + 1)
                inside = (span >= 0) & (span < seq)
                ctx = result.get(hook, "top_ctx")[u, i].numpy()
                np.testing.assert_array_equal(ctx[inside], matrix["tokens"][t - col + span[inside]])
                assert (ctx[~inside] == -1).all()
                act = result.get(hook, "top_act")[u, i].numpy()
                np.testing.assert_array_equal(act[inside], x[t - col + span[inside], u])
    if hook == "hook_embed":
        assert ties > 100  # the tie-break was really exercised


def test_random_and_bin_samples_equal_brute_force(result, matrix):
    hook, seed = "blocks.1.mlp.hook_post", RUN["seed"]
    keep = matrix["keep"]
    rows = np.flatnonzero(keep)
    keys = np.array([key(int(matrix["offset"][t]), seed) for t in rows], dtype=np.int64)
    pick = rows[np.argsort(keys)[: RUN["n_random"]]]
    np.testing.assert_array_equal(result.get(hook, "rnd_off").numpy(), matrix["offset"][pick])
    np.testing.assert_array_equal(result.get(hook, "rnd_val").numpy(), matrix[hook][pick].T)
    lo, hi, bins = RUN["lo"], RUN["hi"], RUN["bins"]
    x = matrix[hook][rows].astype(np.float64)
    b = np.clip(np.floor((x - lo) * (bins / (hi - lo))), -1, bins).astype(int) + 1
    for u in range(0, x.shape[1], 37):
        for bin_ in range(bins + 2):
            members = np.flatnonzero(b[:, u] == bin_)
            got_off = result.get(hook, "qs_off")[u, bin_].item()
            if not len(members):
                assert result.get(hook, "qs_key")[u, bin_].item() == EMPTY
                continue
            t = members[np.argmin(keys[members])]
            assert got_off == matrix["offset"][rows[t]]
            assert result.get(hook, "qs_val")[u, bin_].item() == matrix[hook][rows[t], u]


def test_quantile_samples_lie_in_the_quantiles_bin(result, matrix):
    hook = "blocks.1.mlp.hook_post"
    x = matrix[hook][matrix["keep"]].astype(np.float64)
    lo, hi, bins = RUN["lo"], RUN["hi"], RUN["bins"]
    width = (hi - lo) / bins
    for u in (0, 5, 500):
        for s in result.quantile_samples(hook, u, (0.1, 0.5, 0.9, 0.99)):
            exact = np.quantile(x[:, u], s["quantile"], method="inverted_cdf")
            bin_of = lambda v: min(max(math.floor((v - lo) / width), -1), bins) + 1  # noqa: E731
            assert bin_of(exact) == s["bin"] == bin_of(s["value"])


def test_batching_changes_nothing_but_rounding(model, corpus):
    # Other batch sizes are other row counts, for which another kernel may be measured
    # fastest (gpt2lab.kernels), and float32 activations would then differ in their last
    # bits. With one kernel for every row count, only the float64 sums' order differs.
    from gpt2lab import kernels

    with kernels.force("linear", "onednn"):
        one = neuron_stats(model, corpus, hooks=HOOKS[1:], **{**RUN, "max_batches": 4})
        other = neuron_stats(model, corpus, hooks=HOOKS[1:],
                             **{**RUN, "max_batches": 12, "batch_size": 1})  # fmt: skip
    for name, t in other.tensors.items():
        if t.dtype == torch.float64:
            torch.testing.assert_close(t, one.tensors[name], rtol=1e-9, atol=1e-12)
        else:
            assert torch.equal(t, one.tensors[name]), name


def test_save_load_round_trip(result, tmp_path, model):
    result.save(tmp_path / "r")
    back = load_stats(tmp_path / "r")
    assert back.meta == json.loads(json.dumps(result.meta))
    assert back.tensors.keys() == result.tensors.keys()
    assert all(torch.equal(back.tensors[k], t) for k, t in result.tensors.items())
    assert back.meta["model"]["fingerprint"] == result.meta["model"]["fingerprint"]
    assert back.meta["corpus"]["hash"].startswith("sha256:")
    assert back.meta["filters"]["drop"] == RUN["drop"]
    top = back.top(1, 3)
    assert top[0]["value"] == back.get(1, "top_val")[3, 0].item()
    assert model.tokenizer.decode(top[0]["tokens"])


def test_resume_equals_uninterrupted(model, corpus, tmp_path):
    run = {**RUN, "hooks": HOOKS[:2]}
    whole = neuron_stats(model, corpus, out=tmp_path / "whole", **run)
    part = neuron_stats(model, corpus, out=tmp_path / "cut", max_batches=3, checkpoint_every=2,
                        **run)  # fmt: skip
    assert part.meta["complete"] is False and not (tmp_path / "cut" / "neurons.json").exists()
    part = neuron_stats(model, corpus, out=tmp_path / "cut", resume=True, max_batches=2, **run)
    done = neuron_stats(model, corpus, out=tmp_path / "cut", resume=True, **run)
    assert done.meta["complete"] and done.meta["tokens_read"] == whole.meta["tokens_read"]
    for name, t in whole.tensors.items():
        assert torch.equal(done.tensors[name], t), name
    saved = load_stats(tmp_path / "cut")
    assert all(torch.equal(saved.tensors[k], t) for k, t in whole.tensors.items())


@pytest.mark.slow  # (moved out of the default suite: several seconds)
def test_killed_cli_run_resumes_to_the_uninterrupted_result(model, corpus, tmp_path):
    """A real interruption: the CLI process is killed (SIGKILL) once a checkpoint exists,
    then `--resume` finishes; the result equals an uninterrupted API run."""
    import os
    import signal
    import time

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "gpt2lab", "neurons", "stats", "--data", str(corpus),
           "--out", str(out), "--hook", "blocks.0.mlp.hook_post", "--seq-len", "8",
           "--batch-size", "1", "--checkpoint-every", "1", "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "state.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "neurons.json").exists()  # killed part-way, before the results
    again = [("50" if a == "1" and cmd[i - 1] == "--checkpoint-every" else a)
             for i, a in enumerate(cmd)]  # fmt: skip
    done = subprocess.run(again + ["--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    whole = neuron_stats(model, corpus, hooks=["blocks.0.mlp.hook_post"], seq_len=8,
                         batch_size=1, progress=False)  # fmt: skip
    resumed = load_stats(out)
    assert resumed.meta["tokens_read"] == whole.meta["tokens_read"]
    for name, t in whole.tensors.items():
        assert torch.equal(resumed.tensors[name], t), name


DIST_SCRIPT = """
import sys, torch, torch.distributed as dist
torch.set_num_threads(1)
rank, port, corpus, out, run = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
import json, gpt2lab as gl
from gpt2lab.interp.neurons import neuron_stats
neuron_stats(gl.load("bundled"), corpus, out=out, **json.loads(run))
dist.destroy_process_group()
"""


@pytest.mark.slow  # (moved out of the default suite: several seconds)
def test_two_gloo_processes_equal_one(model, corpus, tmp_path, monkeypatch):
    # One kernel everywhere: each rank runs on fewer threads, for which other kernels
    # may be measured fastest (last-bit differences; see the batching test above).
    from gpt2lab import kernels

    run = {**RUN, "hooks": HOOKS[:2]}
    monkeypatch.setenv("GPT2LAB_KERNELS", "linear=onednn")  # (the ranks' processes)
    with kernels.force("linear", "onednn"):
        one = neuron_stats(model, corpus, **run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "dist_run.py"
    script.write_text(textwrap.dedent(DIST_SCRIPT))
    args = [str(port), str(corpus), str(tmp_path / "two"), json.dumps(run)]
    procs = [subprocess.Popen([sys.executable, str(script), str(r), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    two = load_stats(tmp_path / "two")
    assert (tmp_path / "two" / "state-1-of-2.safetensors").exists()
    assert two.meta["tokens_read"] == one.meta["tokens_read"]
    for name, t in one.tensors.items():
        if t.dtype == torch.float64:  # moments merged in another order: equal to rounding
            torch.testing.assert_close(two.tensors[name], t, rtol=1e-9, atol=1e-12)
        else:
            assert torch.equal(two.tensors[name], t), name


@pytest.mark.parametrize(
    "case,match",
    [
        ("unknown_hook", "unknown hook 'blocks.1.mlp.hook_nope'"),
        ("no_neuron_axis", "no neuron axis"),
        ("k0", "top_k must be an integer >= 1"),
        ("bins", "bins must be an integer"),
        ("range", "hi must be greater than lo"),
        ("seq_len", "seq_len must be an integer in"),
        ("context", "context must be"),
        ("empty", "has no tokens"),
        ("all_dropped", "no tokens left after dropping"),
        ("missing_corpus", "does not exist"),
        ("resume_missing", "checkpoint .* does not exist"),
        ("resume_corrupt", "checkpoint .* is not readable"),
        ("resume_other", "other settings"),
        ("load_missing", "holds no neuron statistics"),
        ("load_corrupt", "is not readable"),
        ("neuron", "neuron must be an integer in"),
    ],
)
def test_bad_inputs(model, corpus, tmp_path, result, case, match):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "eots.txt").write_text("\n\n\n")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "state.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json}")
    result.save(tmp_path / "res")
    (tmp_path / "res" / "neurons.safetensors").write_bytes(b"garbage")
    small = dict(hooks=HOOKS[:1], seq_len=16, batch_size=1, progress=False)

    def other_settings():
        neuron_stats(model, corpus, out=tmp_path / "o", max_batches=1, **small)
        neuron_stats(model, corpus, out=tmp_path / "o", resume=True, **{**small, "seq_len": 8})

    run = {
        "unknown_hook": lambda: neuron_stats(model, corpus, hooks=["blocks.1.mlp.hook_nope"]),
        "no_neuron_axis": lambda: neuron_stats(model, corpus, hooks=["blocks.0.attn.hook_pattern"]),
        "k0": lambda: neuron_stats(model, corpus, top_k=0),
        "bins": lambda: neuron_stats(model, corpus, bins=0),
        "range": lambda: neuron_stats(model, corpus, lo=1.0, hi=1.0),
        "seq_len": lambda: neuron_stats(model, corpus, seq_len=10_000),
        "context": lambda: neuron_stats(model, corpus, context=3),
        "empty": lambda: neuron_stats(model, tmp_path / "empty.txt", **small),
        "all_dropped": lambda: neuron_stats(
            model, tmp_path / "eots.txt", drop=["\n\n", "\n", "<|endoftext|>"], **small
        ),  # fmt: skip
        "missing_corpus": lambda: neuron_stats(model, tmp_path / "nope", **small),
        "resume_missing": lambda: neuron_stats(
            model, corpus, out=tmp_path / "x", resume=True, **small
        ),  # fmt: skip
        "resume_corrupt": lambda: neuron_stats(
            model, corpus, out=tmp_path / "bad", resume=True, **small
        ),  # fmt: skip
        "resume_other": other_settings,
        "load_missing": lambda: load_stats(tmp_path),
        "load_corrupt": lambda: load_stats(tmp_path / "res"),
        "neuron": lambda: result.top(1, 5000),
    }[case]
    with pytest.raises(GPT2LabError, match=match) as info:
        run()
    assert "\n" not in str(info.value)


# ---- the neuron card -------------------------------------------------------------------
def test_card_is_self_contained_escaped_and_reads_the_weights(model, tmp_path):
    from gpt2lab.interp.neuron_card import neuron_card, write_card

    text = "<script>alert('x')</script> & <b>bold</b> the king the king\n" * 12
    (tmp_path / "evil.txt").write_text(text)
    res = neuron_stats(model, tmp_path / "evil.txt", hooks=[2], seq_len=32, batch_size=2,
                       top_k=4, progress=False)  # fmt: skip
    neuron = int(res.get(2, "top_val")[:, 0].argmax())
    page = neuron_card(res, model, 2, neuron, k=4)
    write_card(tmp_path / "card.html", page)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    lower = page.lower()
    for forbidden in ("<script", "src=", "<link", "@import", "url(", "href="):
        assert forbidden not in lower, forbidden
    assert "&lt;script&gt;" in page or "&lt;" in page  # corpus text arrives escaped
    assert "<svg" in page and page.count("<rect") == res.params.bins + 2
    # promoted / suppressed tokens: W_out[n] @ W_U, brute force in numpy
    w_out = model.blocks[2].mlp.W_out[neuron].detach().double().numpy()
    w_u = model.W_U.detach().double().numpy()
    logits = w_out @ w_u
    for t in np.argsort(-logits)[:3].tolist() + np.argsort(logits)[:3].tolist():
        assert html.escape(repr(model.tokenizer.decode([t]))) in page, t
    # vocabulary moments of cos(W_out[n], W_U[:, v]) over v (plain kurtosis), via scipy
    cos = logits / (np.linalg.norm(w_out) * np.linalg.norm(w_u, axis=0))
    for value in (cos.mean(), cos.var(), scipy.stats.skew(cos),
                  scipy.stats.kurtosis(cos, fisher=False)):  # fmt: skip
        assert f"{value:.5g}" in page
    # the top context's max token carries the top value
    assert 'class="max" style="background: rgba(220,40,40,1.000)"' in page


# ---- the CLI -----------------------------------------------------------------------------
def run_cli(argv, capsys) -> tuple[int, str, str]:
    from gpt2lab.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_cli_stats_top_show(model, corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    code, stdout, err = run_cli(["neurons", "stats", "--data", str(corpus), "--out", str(out),
                                 "--hook", "blocks.1.mlp.hook_post", "--seq-len", "48",
                                 "--batch-size", "3", "--top-k", "5", "--drop", "<|endoftext|>",
                                 "--drop", "\n", "--lo", "-2", "--hi", "3", "--bins", "25",
                                 "--threads", "1"], capsys)  # fmt: skip
    assert code == 0, err
    assert "tokens read" in stdout and "saved" in stdout
    saved = load_stats(out)
    api = neuron_stats(model, corpus, hooks=["blocks.1.mlp.hook_post"],
                       **{**RUN, "n_random": 8, "context": (12, 4), "seed": 0})  # fmt: skip
    assert saved.tensors.keys() == api.tensors.keys()
    assert all(torch.equal(saved.tensors[k], t) for k, t in api.tensors.items())
    code, stdout, err = run_cli(["neurons", "top", str(out), "--layer", "1", "-n", "7", "-k", "3"],
                                capsys)  # fmt: skip
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith("blocks.1.mlp.hook_post unit 7: count ") and len(lines) == 4
    best = api.top(1, 7, 1)[0]
    assert f"{best['value']:9.4f}" in lines[1] and "[[" in lines[1]
    card = tmp_path / "card.html"
    code, stdout, err = run_cli(["neurons", "show", str(out), "--layer", "1", "-n", "7",
                                 "--out", str(card)], capsys)  # fmt: skip
    assert code == 0, err
    assert card.read_text().startswith("<!DOCTYPE html>")


CLI_BAD = {
    "hook": (["stats", "--data", "{corpus}", "--hook", "blocks.0.hook_nope"], "unknown hook"),
    "top_k": (["stats", "--data", "{corpus}", "--top-k", "0"], "top_k must be an integer >= 1"),
    "data": (["stats", "--data", "{tmp}/missing"], "does not exist"),
    "empty": (["stats", "--data", "{tmp}/empty.txt"], "has no tokens"),
    "dropped": (
        ["stats", "--data", "{tmp}/nl.txt", "--drop", "\n\n", "--drop", "<|endoftext|>"],
        "no tokens left",
    ),  # fmt: skip
    "out": (["stats", "--data", "{corpus}", "--out", "{tmp}/a-file"], "is a file"),
    "resume": (
        ["stats", "--data", "{corpus}", "--resume", "--out", "{tmp}/fresh"],
        "does not exist",
    ),  # fmt: skip
    "results": (["top", "{tmp}", "--layer", "0", "-n", "1"], "holds no neuron statistics"),
    "layer_and_hook": (["top", "{res}", "-n", "1"], "--layer L"),
    "neuron": (["top", "{res}", "--layer", "1", "-n", "99999"], "neuron must be"),
    "k": (["top", "{res}", "--layer", "1", "-n", "1", "-k", "0"], "k must be"),
    "show_hook": (
        ["show", "{res}", "--layer", "3", "-n", "1", "--out", "{tmp}/c.html"],
        "no statistics for hook",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(CLI_BAD))
def test_cli_bad_input_is_one_line_exit_1(case, corpus, result, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nl.txt").write_text("\n\n\n\n")
    (tmp_path / "a-file").write_text("x")
    result.save(tmp_path / "res")
    args, words = CLI_BAD[case]
    argv = ["neurons"] + [a.format(corpus=corpus, tmp=tmp_path, res=tmp_path / "res") for a in args]
    if args[0] == "stats":
        argv += ["--seq-len", "16", "--threads", "1"] + (
            [] if "--out" in args else ["--out", str(tmp_path / "o")]
        )
    code, out, err = run_cli(argv, capsys)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, (code, err)
    assert lines[0].startswith("gpt2lab: error: ") and words in lines[0], lines[0]


def test_output_folder_that_cannot_be_made_is_one_line(model, corpus, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(GPT2LabError, match="cannot create the output folder"):
        neuron_stats(model, corpus, seq_len=16, batch_size=2, out=tmp_path / "afile" / "s")
