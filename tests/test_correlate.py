"""Cross-model neuron correlations (gpt2lab.interp.correlate) against independent references.

Two small random-weight models (2 and 3 layers, different MLP widths) over a small token
stream; the reference materialises every activation with run_with_cache and computes
numpy.corrcoef over the kept tokens, the best / worst match by brute force, and the
baseline by rotating the activations explicitly (Y @ Q) before numpy.corrcoef. The
streaming code never materialises activations nor rotates them; it must agree anyway.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gpt2lab import GPT2, GPT2Config, GPT2LabError
from gpt2lab.interp.corpus import open_corpus, windows
from gpt2lab.interp.correlate import (
    _rotation_seed,
    correlate,
    fingerprint,
    haar_rotation,
    layer_pairs,
    load_correlations,
    pass_bytes,
    plan_passes,
)

EOT = 50256
SEQ = 16
HOOK = "blocks.{layer}.mlp.hook_post"


def small(n_layers: int, d_mlp: int, seed: int, d_vocab: int = 50257) -> GPT2:
    cfg = GPT2Config(n_layers=n_layers, d_model=32, n_heads=4, n_ctx=64, d_vocab=d_vocab,
                     d_mlp=d_mlp)  # fmt: skip
    return GPT2(cfg).init_weights(seed=seed).eval()


@pytest.fixture(scope="module")
def models():
    return small(2, 48, seed=0), small(3, 40, seed=1)


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 2000, (10, SEQ), generator=g)
    t[0, 3] = t[4, 0] = t[7, 9] = EOT  # dropped from the statistics, still read as context
    return t


def materialise(model, tokens, keep) -> np.ndarray:
    """[kept tokens, n_layers * d_mlp] float64: every layer's hook_post, side by side."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.hook_post"))
    layers = range(model.cfg.n_layers)
    return np.concatenate([cache[HOOK.format(layer=i)][keep].double().numpy() for i in layers], 1)


def reference(a, b, tokens, keep, pairs, rotate=None):
    """Brute force: full r matrix from numpy.corrcoef, masked to the chosen layer pairs;
    with `rotate` ("a" or "b") that model's activations are first rotated per layer."""
    X, Y = materialise(a, tokens, keep), materialise(b, tokens, keep)
    da, db = a.cfg.d_mlp, b.cfg.d_mlp
    if rotate == "b":
        for i in range(b.cfg.n_layers):
            q = haar_rotation(db, _rotation_seed(0, "b", i)).numpy()
            Y[:, i * db : (i + 1) * db] = Y[:, i * db : (i + 1) * db] @ q
    if rotate == "a":
        for i in range(a.cfg.n_layers):
            q = haar_rotation(da, _rotation_seed(0, "a", i)).numpy()
            X[:, i * da : (i + 1) * da] = X[:, i * da : (i + 1) * da] @ q
    R = np.corrcoef(X.T, Y.T)[: X.shape[1], X.shape[1] :]
    allowed = np.zeros_like(R, dtype=bool)
    for la, lb in pairs:
        allowed[la * da : (la + 1) * da, lb * db : (lb + 1) * db] = True
    return R, allowed


def brute_best(R, allowed, width_other):
    """Per row: max r (first index on ties), its (layer, neuron), min r; NaN rows where no
    pair is allowed."""
    hi = np.where(allowed, R, -np.inf)
    lo = np.where(allowed, R, np.inf)
    arg = hi.argmax(1)
    best, worst = hi.max(1), lo.min(1)
    best[~allowed.any(1)] = np.nan
    worst[~allowed.any(1)] = np.nan
    return best, worst, arg // width_other, arg % width_other


@pytest.mark.parametrize("layers, memory_gb", [("all", 0.0002), ("all", 4.0), ("same", 0.0002),
                                               ("window=1", 0.0002)])  # fmt: skip
def test_correlations_equal_numpy_corrcoef(models, tokens, layers, memory_gb, tmp_path):
    a, b = models
    res = correlate(a, b, tokens, layers=layers, seq_len=SEQ, batch_size=3, memory_gb=memory_gb,
                    out=tmp_path, save_blocks=True, block_dtype="float64")  # fmt: skip
    pairs = layer_pairs(layers, 2, 3)
    if memory_gb < 1:
        assert len(res.meta["passes"]) > 1  # the blocked path, several passes over the data
    keep = tokens != EOT
    R, allowed = reference(a, b, tokens, keep, pairs)
    assert res.meta["tokens"] == int(keep.sum())
    # every block's r, written by the run, equals numpy's
    for la, lb in pairs:
        r = load_file(str(tmp_path / "blocks" / f"r.{la}.{lb}.safetensors"))["r"].numpy()
        np.testing.assert_allclose(r, R[la * 48 : (la + 1) * 48, lb * 40 : (lb + 1) * 40],
                                   atol=1e-6, rtol=0)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "blocks").iterdir()) == sorted(
        f"r.{la}.{lb}.safetensors" for la, lb in pairs
    )
    # best and worst match of every neuron, both ways, equal brute force
    for side, RR, ok, width, shape in (("a", R, allowed, 40, (2, 48)),
                                        ("b", R.T, allowed.T, 48, (3, 40))):  # fmt: skip
        best, worst, layer, neuron = brute_best(RR, ok, width)
        t = res.tensors
        np.testing.assert_allclose(t[f"{side}.best_r"].numpy().ravel(), best, atol=1e-6, rtol=0)
        np.testing.assert_allclose(t[f"{side}.min_r"].numpy().ravel(), worst, atol=1e-6, rtol=0)
        live = ok.any(1)
        assert (t[f"{side}.best_layer"].numpy().ravel()[live] == layer[live]).all()
        assert (t[f"{side}.best_neuron"].numpy().ravel()[live] == neuron[live]).all()
        assert (t[f"{side}.best_layer"].numpy().ravel()[~live] == -1).all()
        assert t[f"{side}.best_r"].shape == shape


def test_baseline_equals_explicitly_rotated_activations(models, tokens):
    """The run never rotates activations (cov(x, yQ) = cov(x, y) Q); the reference does."""
    a, b = models
    res = correlate(a, b, tokens, layers="window=1", seq_len=SEQ, batch_size=4)
    keep = tokens != EOT
    pairs = layer_pairs("window=1", 2, 3)
    R_b, ok = reference(a, b, tokens, keep, pairs, rotate="b")
    base_a = brute_best(R_b, ok, 40)[0]
    np.testing.assert_allclose(res.baseline_r("a").numpy().ravel(), base_a, atol=1e-9, rtol=0)
    R_a, ok = reference(a, b, tokens, keep, pairs, rotate="a")
    base_b = brute_best(R_a.T, ok.T, 48)[0]
    np.testing.assert_allclose(res.baseline_r("b").numpy().ravel(), base_b, atol=1e-9, rtol=0)
    # excess and the universal criterion, from the same numbers
    R, _ = reference(a, b, tokens, keep, pairs)
    excess = brute_best(R, ok, 40)[0] - base_a
    np.testing.assert_allclose(res.excess("a").numpy().ravel(), excess, atol=1e-9, rtol=0)
    assert (res.universal("a", 0.1).numpy().ravel() == (excess > 0.1)).all()


def test_rotation_is_orthogonal_and_haar():
    for d, seed in ((7, 0), (64, 3), (200, 12)):
        q = haar_rotation(d, seed)
        assert q.dtype == torch.float64 and q.shape == (d, d)
        eye = np.eye(d)
        np.testing.assert_allclose((q.T @ q).numpy(), eye, atol=1e-12, rtol=0)
        np.testing.assert_allclose((q @ q.T).numpy(), eye, atol=1e-12, rtol=0)
        assert abs(abs(np.linalg.det(q.numpy())) - 1) < 1e-9
        # the same Gaussian through numpy's QR, with Mezzadri's sign fix: Q * sign(diag R)
        g = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        nq, nr = np.linalg.qr(g.numpy())
        np.testing.assert_allclose(q.numpy(), nq * np.sign(np.diag(nr)), atol=1e-10, rtol=0)
    # the reference code's "rotation" (Gaussian rows normalised) is not orthogonal
    g = torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = (g / g.norm(dim=1, keepdim=True)).numpy()
    assert np.abs(rows.T @ rows - np.eye(64)).max() > 0.3
    # Haar: the first entry of a column of Q is distributed as a uniform unit vector's
    # coordinate: mean 0 and variance 1/d (200 draws, d = 16)
    first = np.array([haar_rotation(16, s)[0, 0].item() for s in range(200)])
    assert abs(first.mean()) < 0.06 and abs(first.var() * 16 - 1) < 0.3


def test_identical_models_match_themselves(models, tokens):
    a, _ = models
    twin = copy.deepcopy(a)
    res = correlate(a, twin, tokens, layers="all", seq_len=SEQ, batch_size=5)
    np.testing.assert_allclose(res.best_r("a").numpy(), 1.0, atol=1e-9)
    own = torch.arange(48).expand(2, 48)
    assert (res.tensors["a.best_layer"] == torch.arange(2)[:, None]).all()
    assert (res.tensors["a.best_neuron"] == own).all()
    assert (res.baseline_r("a") < 0.95).all()  # a rotated neuron is no twin
    m = res.meta["models"]
    assert m["a"]["fingerprint"] == m["b"]["fingerprint"] == fingerprint(a)


def test_shuffled_neurons_are_found(models, tokens):
    """B is A with each layer's MLP neurons permuted (the same function): every neuron's
    best match is its own image under the permutation, with r = 1."""
    a, _ = models
    b = copy.deepcopy(a)
    perms = [torch.randperm(48, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        for block, perm in zip(b.blocks, perms, strict=True):
            block.mlp.c_fc.weight.copy_(block.mlp.c_fc.weight[perm])
            block.mlp.c_fc.bias.copy_(block.mlp.c_fc.bias[perm])
            block.mlp.c_proj.weight.copy_(block.mlp.c_proj.weight[:, perm])
    res = correlate(a, b, tokens, layers="all", seq_len=SEQ, batch_size=4)
    for layer, perm in enumerate(perms):
        assert torch.equal(perm[res.tensors["a.best_neuron"][layer]], torch.arange(48))
        assert torch.equal(res.tensors["b.best_neuron"][layer], perm)
        assert (res.tensors["a.best_layer"][layer] == layer).all()
    np.testing.assert_allclose(res.best_r("a").numpy(), 1.0, atol=1e-6)


@pytest.mark.parametrize("crash_at", [4, 9])  # inside the first pass, inside the second
def test_interrupted_and_resumed_equals_uninterrupted(models, tokens, tmp_path, crash_at):
    a, b = models
    kw = dict(layers="all", seq_len=SEQ, batch_size=2, memory_gb=0.0002, checkpoint_every=1)
    whole = correlate(a, b, tokens, **kw)
    assert len(whole.meta["passes"]) >= 2

    calls = {"n": 0}

    def crash(x, hook):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise RuntimeError("simulated crash")

    b.add_hook("blocks.0.hook_resid_pre", crash)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            correlate(a, b, tokens, out=tmp_path, **kw)
    finally:
        b.reset_hooks()
    assert (tmp_path / "state.safetensors").is_file()
    resumed = correlate(a, b, tokens, out=tmp_path, resume=True, **kw)
    assert resumed.tensors.keys() == whole.tensors.keys()
    for k, v in whole.tensors.items():
        assert torch.equal(v.nan_to_num(9.0), resumed.tensors[k].nan_to_num(9.0)), k
    assert resumed.meta["corpus_hash"] == whole.meta["corpus_hash"]
    assert resumed.meta["tokens"] == whole.meta["tokens"]


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_correlate import small, SEQ
from gpt2lab.interp.correlate import correlate
dist.init_process_group("gloo")
tokens = torch.load({tokens!r})
a, b = small(2, 48, seed=0), small(3, 40, seed=1)
res = correlate(a, b, tokens, seq_len=SEQ, batch_size=2, memory_gb=0.0002, out={out!r})
res2 = correlate(a, b, tokens, seq_len=SEQ, batch_size=2, out={out!r} + "_one")
dist.destroy_process_group()
"""


@pytest.mark.slow  # (moved out of the default suite: several seconds)
def test_two_gloo_processes_equal_one(models, tokens, tmp_path):
    a, b = models
    one = correlate(a, b, tokens, seq_len=SEQ, batch_size=2, memory_gb=0.0002)
    torch.save(tokens, tmp_path / "tokens.pt")
    script = tmp_path / "ddp.py"
    out = str(tmp_path / "ddp")
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(
        tests=str(Path(__file__).parent), tokens=str(tmp_path / "tokens.pt"), out=out)))  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    two = load_correlations(out)
    assert two.meta["world"] == 2 and two.meta["tokens"] == one.meta["tokens"]
    assert two.meta["corpus_hash"] == one.meta["corpus_hash"]  # every window seen once
    for k, v in one.tensors.items():
        if v.dtype == torch.float64:  # sums added in another order: equal to rounding
            np.testing.assert_allclose(two.tensors[k].numpy(), v.numpy(), atol=1e-12, rtol=0)
        else:
            assert torch.equal(two.tensors[k], v), k
    assert (Path(out) / "state.rank1.safetensors").is_file()


def test_corpus_of_text_files(models, tmp_path):
    """The real token stream (gpt2lab.interp.corpus): text files, <|endoftext|> between
    documents dropped, the last window padded; reference over the same windows."""
    a, b = models
    text = tmp_path / "text"
    text.mkdir()
    for i in range(3):
        words = " ".join(f"word{(i * 7 + j * j) % 53} and" for j in range(40 + 10 * i))
        (text / f"doc{i}.txt").write_text(words + "\n")
    res = correlate(a, b, text, layers="same", seq_len=SEQ, batch_size=3, out=tmp_path / "o",
                    progress=True)  # fmt: skip
    source = open_corpus(text, a.tokenizer)
    ws = list(windows(source, seq_len=SEQ, batch_size=3))
    toks = torch.cat([w.tokens for w in ws])
    keep = torch.cat([w.keep for w in ws])
    assert res.meta["tokens"] == int(keep.sum()) > 100
    assert res.meta["corpus"] == source.description
    R, ok = reference(a, b, toks, keep, layer_pairs("same", 2, 3))
    best = brute_best(R, ok, 40)[0]
    np.testing.assert_allclose(res.best_r("a").numpy().ravel(), best, atol=1e-6, rtol=0)


def test_saved_result_loads_and_names_its_inputs(models, tokens, tmp_path):
    a, b = models
    res = correlate(a, b, tokens, seq_len=SEQ, batch_size=4, out=tmp_path, names=("m1", "m2"),
                    threshold=0.2)  # fmt: skip
    back = load_correlations(tmp_path)
    assert back.tensors.keys() == res.tensors.keys()
    for k, v in res.tensors.items():
        assert torch.equal(v.nan_to_num(9.0), back.tensors[k].nan_to_num(9.0))
    meta = json.loads((tmp_path / "correlations.json").read_text())
    assert meta == back.meta
    assert meta["models"]["a"] == {"name": "m1", "fingerprint": fingerprint(a), "n_layers": 2,
                                   "width": 48}  # fmt: skip
    assert meta["models"]["a"]["fingerprint"] != meta["models"]["b"]["fingerprint"]
    assert meta["threshold"] == 0.2 and meta["hook"] == HOOK
    assert meta["memory"]["peak_rss_gb"] > 0
    assert meta["memory"]["finish_block_gb"] == pytest.approx(32 * 48 * 40 / 2**30)
    assert meta["memory"]["planned_pass_gb"] == pytest.approx(
        pass_bytes(layer_pairs("all", 2, 3), 48, 40, 4 * SEQ) / 2**30
    )
    other = correlate(a, b, tokens[:8], seq_len=SEQ, batch_size=4)
    assert other.meta["corpus_hash"] != meta["corpus_hash"]
    # the table: rows by decreasing excess, universal marked by the threshold
    rows = back.top("a", 5)
    ex = back.excess("a").numpy()
    assert [r["excess"] for r in rows] == pytest.approx(sorted(ex.ravel())[::-1][:5])
    for r in rows:
        assert r["excess"] == pytest.approx(ex[r["layer"], r["neuron"]])
        assert r["universal"] == (r["excess"] > 0.2)
    assert "model A (m1)" in back.table("a", 3)


def test_plan_bounds_memory_for_two_gpt2_medium():
    """All 576 layer pairs of two gpt2-medium (24 x 4096 neurons each, 77 GB of float64
    co-moments) in passes of at most 16 GB, leaving room for both models in 24 GB."""
    pairs = layer_pairs("all", 24, 24)
    budget = 16 * 2**30
    tokens = 4 * 512
    plan = plan_passes(pairs, 4096, 4096, tokens, budget)
    assert [p for blocks in plan for p in blocks] == pairs
    for blocks in plan:
        assert pass_bytes(blocks, 4096, 4096, tokens) + 32 * 4096**2 <= budget
    total = sum(8 * 4096 * 4096 for _ in pairs)
    assert total / 1e9 == pytest.approx(77.3, abs=0.1)
    assert 5 <= len(plan) <= 8
    # the formula on a case small enough to count by hand: 1 pass of 2 blocks
    assert pass_bytes([(0, 0), (0, 1)], 10, 20, 5) == 8 * 400 + 8 * (100 + 2 * 400) + 12 * 5 * 50


def bad_cases(a, b, tokens, tmp_path):
    other_vocab = small(2, 48, seed=0, d_vocab=1000)
    eot_only = torch.full((4, SEQ), EOT)
    return {
        "vocab": (lambda: correlate(a, other_vocab, tokens, seq_len=SEQ), "share a tokenizer"),
        "not-a-model": (lambda: correlate(a, "gpt2", tokens, seq_len=SEQ), "model B"),
        "hook": (lambda: correlate(a, b, tokens, seq_len=SEQ, hook="mlp.hook_nope"),
                 "no hook point 'blocks.0.mlp.hook_nope'"),
        "hook-type": (lambda: correlate(a, b, tokens, seq_len=SEQ, hook=3), "hook must be"),
        "hook-pattern": (lambda: correlate(a, b, tokens, seq_len=SEQ, hook="attn.hook_pattern"),
                         "no neuron axis"),
        "hook-format": (lambda: correlate(a, b, tokens, seq_len=SEQ, hook="blocks.{l}.mlp"),
                        "placeholder"),
        "layers": (lambda: correlate(a, b, tokens, seq_len=SEQ, layers="diagonal"), "layers"),
        "window": (lambda: correlate(a, b, tokens, seq_len=SEQ, layers="window=-1"), "window=K"),
        "layers-type": (lambda: correlate(a, b, tokens, seq_len=SEQ, layers=[0, 1]), "layers"),
        "empty": (lambda: correlate(a, b, eot_only, seq_len=SEQ), "no tokens after filtering"),
        "threshold-high": (lambda: correlate(a, b, tokens, seq_len=SEQ, threshold=1.5),
                           "threshold must be a number in [0, 1]"),
        "threshold-neg": (lambda: correlate(a, b, tokens, seq_len=SEQ, threshold=-0.1),
                          "threshold"),
        "threshold-nan": (lambda: correlate(a, b, tokens, seq_len=SEQ, threshold=float("nan")),
                          "threshold"),
        "memory": (lambda: correlate(a, b, tokens, seq_len=SEQ, memory_gb=1e-6), "too small"),
        "seq-len": (lambda: correlate(a, b, tokens, seq_len=8), "seq_len=8"),
        "seq-len-ctx": (lambda: correlate(a, b, tokens, seq_len=65), "seq_len"),
        "tensor-1d": (lambda: correlate(a, b, tokens[0], seq_len=SEQ), "2-D"),
        "batch": (lambda: correlate(a, b, tokens, seq_len=SEQ, batch_size=0), "batch_size"),
        "resume-no-out": (lambda: correlate(a, b, tokens, seq_len=SEQ, resume=True), "out="),
        "resume-nothing": (lambda: correlate(a, b, tokens, seq_len=SEQ, resume=True,
                                             out=tmp_path / "nothing"), "nothing to resume"),
        "corpus-missing": (lambda: correlate(a, b, tmp_path / "nope", seq_len=SEQ),
                           "does not exist"),
        "block-dtype": (lambda: correlate(a, b, tokens, seq_len=SEQ, block_dtype="int8"),
                        "block_dtype"),
        "load-missing": (lambda: load_correlations(tmp_path / "nope"), "does not exist"),
    }  # fmt: skip


def test_bad_inputs_are_one_line_errors(models, tokens, tmp_path):
    a, b = models
    for name, (call, words) in bad_cases(a, b, tokens, tmp_path).items():
        with pytest.raises(GPT2LabError) as info:
            call()
        message = str(info.value)
        assert words in message and "\n" not in message, (name, message)


def test_resume_with_other_settings_is_refused(models, tokens, tmp_path):
    a, b = models
    correlate(a, b, tokens, seq_len=SEQ, batch_size=4, out=tmp_path)
    with pytest.raises(GPT2LabError, match="its batch_size differs"):
        correlate(a, b, tokens, seq_len=SEQ, batch_size=2, out=tmp_path, resume=True)
    with pytest.raises(GPT2LabError, match="its models differs"):
        correlate(b, a, tokens, seq_len=SEQ, batch_size=4, out=tmp_path, resume=True)


# ---- the CLI ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_inputs(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("correlate_cli")
    a, b = models
    a.save(str(root / "a"))
    b.save(str(root / "b"))
    small(2, 48, seed=0, d_vocab=1000).save(str(root / "v1000"))
    words = " ".join(f"token{(j * j) % 41} of" for j in range(150))
    (root / "text.txt").write_text(words + "\n")
    (root / "a-file").write_text("in the way")
    return root


def run_cli(argv, capsys):
    from gpt2lab.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli_correlate_writes_the_api_result(cli_inputs, models, capsys):
    r = cli_inputs
    code, out, err = run_cli(["neurons", "correlate", str(r / "a"), str(r / "b"), "--data",
                              str(r / "text.txt"), "--seq-len", "16", "--batch-size", "4",
                              "--layers", "window=1", "--out", str(r / "out"), "--top", "3",
                              "--threads", "1"], capsys)  # fmt: skip
    assert code == 0, err
    assert "layer pairs in" in out and "model A (" in out and "model B (" in out
    saved = load_correlations(r / "out")
    a, b = models
    api = correlate(a, b, r / "text.txt", layers="window=1", seq_len=16, batch_size=4)
    for k, v in api.tensors.items():
        assert torch.equal(v.nan_to_num(9.0), saved.tensors[k].nan_to_num(9.0)), k


CLI_BAD = {
    "layers": (["--layers", "diagonal"], "layers must be"),
    "threshold": (["--threshold", "2"], "threshold must be"),
    "hook": (["--hook", "mlp.hook_nope"], "no hook point"),
    "vocab": (["B=v1000"], "share a tokenizer"),
    "data": (["--data", "{root}/missing.txt"], "does not exist"),
    "out": (["--out", "{root}/a-file"], "is a file"),
    "resume": (["--resume", "--out", "{root}/fresh"], "nothing to resume"),
    "memory": (["--memory-gb", "0.000001"], "too small"),
}


@pytest.mark.parametrize("case", list(CLI_BAD))
def test_cli_bad_input_is_one_line_exit_1(case, cli_inputs, capsys):
    extra, words = CLI_BAD[case]
    r = cli_inputs
    model_b = str(r / "b")
    if extra and extra[0].startswith("B="):
        model_b, extra = str(r / extra[0][2:]), extra[1:]
    argv = ["neurons", "correlate", str(r / "a"), model_b, "--data", str(r / "text.txt"),
            "--seq-len", "16", "--out", str(r / "bad_out")]  # fmt: skip
    argv += [x.format(root=r) for x in extra]
    code, out, err = run_cli(argv, capsys)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert code == 1 and len(lines) == 1, (code, err)
    assert lines[0].startswith("gpt2lab: error: ") and words in lines[0], lines[0]


def test_output_folder_that_cannot_be_made_is_one_line(models, tokens, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(GPT2LabError, match="cannot create the output folder"):
        correlate(*models, tokens, layers="same", seq_len=SEQ, out=tmp_path / "afile" / "c")
