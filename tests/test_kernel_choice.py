"""The kernel chooser (gpt2lab/kernels/choose.py) and every candidate it may pick.

The chooser is tested with a fake clock: candidates "take" times drawn from a table, so
the test knows the brute-force answer (the fastest best time over the timed runs) and
asserts no wall-clock time. Every candidate kernel, forced in turn, is checked against a
float64 reference within its stated bound, so whichever one a CPU picks is right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2lab import kernels
from gpt2lab.errors import GPT2LabError
from gpt2lab.kernels import attention, choose, native
from gpt2lab.kernels import linear as klinear
from gpt2lab.kernels.choose import ROUNDS, Chooser, row_bucket
from gpt2lab.quantize import Int8Linear, quantize_weight


class FakeClock:
    """Time advances only when a candidate 'runs', by the next cost in its list."""

    def __init__(self, costs: dict[str, list[float]]):
        self.now, self.costs, self.calls = 0.0, {k: list(v) for k, v in costs.items()}, []

    def __call__(self) -> float:
        return self.now

    def runner(self, name: str):
        def run(copy):
            self.calls.append(name)
            self.now += self.costs[name].pop(0)

        return run


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["aten", "onednn", "onednn_fused", "native"]),
        st.lists(st.integers(1, 50), min_size=ROUNDS + 1, max_size=ROUNDS + 1),  # exact sums
        min_size=2,
        max_size=4,
    )
)
def test_the_chooser_picks_the_brute_force_fastest(tmp_path_factory, costs):
    # brute force: each candidate's best over its timed runs (the first run is a warm-up)
    best = {name: min(runs[1:]) for name, runs in costs.items()}
    fastest = min(best.values())
    clock = FakeClock(costs)
    c = Chooser(tmp_path_factory.mktemp("cache") / "k.json", clock=clock)
    runs = {name: clock.runner(name) for name in costs}
    name = c.pick(("linear", "float32", 1, 8, 8, "none"), runs, op="linear", dtype="float32")
    assert best[name] == fastest
    # ties go to the earlier candidate
    assert name == next(n for n in costs if best[n] == fastest)
    assert c.choices[("linear", "float32", 1, 8, 8, "none")].seconds == pytest.approx(best)
    assert len(clock.calls) == (ROUNDS + 1) * len(costs)  # each: warm-up + ROUNDS timed
    # interleaved: every timed round runs each candidate once before the next round
    timed = clock.calls[len(costs) :]
    assert [timed[i : i + len(costs)] for i in range(0, len(timed), len(costs))] == [
        list(costs)
    ] * ROUNDS


def test_answers_are_kept_in_the_cache_file_per_machine(tmp_path):
    path = tmp_path / "sub" / "kernels.json"
    costs = {"aten": [1, 5, 5, 5], "onednn": [1, 2, 3, 2]}
    clock = FakeClock(costs)
    key = ("linear", "bfloat16", 1, 64, 32, "none")
    c = Chooser(path, clock=clock)
    assert c.pick(key, {n: clock.runner(n) for n in costs}, op="linear", dtype="bf") == "onednn"
    assert c.choices[key].gbps is None  # no weight bytes given
    data = json.loads(path.read_text())
    (machine,) = data
    assert machine == choose.machine_key() and "threads" in machine and torch.__version__ in machine
    assert data[machine]["linear:bfloat16:1:64:32:none"]["name"] == "onednn"

    # a new process (a new chooser) reads the answer: nothing runs
    never = {"aten": lambda i: pytest.fail("timed again"), "onednn": lambda i: pytest.fail("timed")}
    c2 = Chooser(path, clock=FakeClock({}))
    assert c2.pick(key, never, op="linear", dtype="bf") == "onednn"
    assert c2.choices[key].source == "cache file"
    # ... unless the cached winner cannot run here (a native kernel not built): measured
    clock3 = FakeClock({"aten": [1, 1, 1, 1], "native": [1, 3, 3, 3]})
    c3 = Chooser(path, clock=clock3)
    runs = {n: clock3.runner(n) for n in ("aten", "native")}
    assert c3.pick(key, runs, op="linear", dtype="bf") == "aten"
    # another machine (other CPU, threads or torch) finds nothing of this one's
    data = json.loads(path.read_text())
    path.write_text(json.dumps({"other machine": data[machine]}))
    clock4 = FakeClock({"aten": [1, 9, 9, 9], "onednn": [1, 1, 1, 1]})
    c4 = Chooser(path, clock=clock4)
    assert c4.pick(key, {n: clock4.runner(n) for n in costs}, op="linear", dtype="b") == "onednn"
    assert len(clock4.calls) == 8
    assert set(json.loads(path.read_text())) == {"other machine", machine}  # merged, not lost


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"m": 3}', "\x00\xff"])
def test_a_corrupt_cache_file_is_measured_again(tmp_path, content):
    path = tmp_path / "kernels.json"
    path.write_bytes(content.encode("latin-1"))
    clock = FakeClock({"a": [1, 2, 2, 2], "b": [1, 1, 1, 1]})
    c = Chooser(path, clock=clock)
    assert c.pick(("k",), {n: clock.runner(n) for n in "ab"}, op="x", dtype="y") == "b"
    assert json.loads(path.read_text())[choose.machine_key()]["k"]["name"] == "b"


def test_an_unwritable_cache_costs_only_a_measurement(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    clock = FakeClock({"a": [1, 1, 1, 1], "b": [1, 2, 2, 2]})
    c = Chooser(blocker / "kernels.json", clock=clock)  # its folder is a file
    assert c.pick(("k",), {n: clock.runner(n) for n in "ab"}, op="x", dtype="y") == "a"
    again = {"a": lambda i: pytest.fail("timed"), "b": lambda i: pytest.fail("timed")}
    assert c.pick(("k",), again, op="x", dtype="y") == "a"  # kept in the process


def test_a_failing_candidate_is_dropped_and_none_left_is_an_error(tmp_path):
    clock = FakeClock({"slow": [1, 5, 5, 5]})

    def broken(copy):
        raise RuntimeError("cannot take this shape")

    c = Chooser(tmp_path / "k.json", clock=clock)
    runs = {"broken": broken, "slow": clock.runner("slow")}
    assert c.pick(("k",), runs, op="x", dtype="y") == "slow"
    with pytest.raises(GPT2LabError, match="no kernel"):
        c.pick(("k2",), {"broken": broken, "also": broken}, op="x", dtype="y")


def test_one_thread_measures_while_the_others_wait(tmp_path):
    c = Chooser(tmp_path / "k.json")
    count = {"a": 0, "b": 0}
    gate = threading.Barrier(8)

    def runner(name):
        def run(copy):
            count[name] += 1

        return run

    answers = []

    def ask():
        gate.wait()
        answers.append(c.pick(("k",), {n: runner(n) for n in "ab"}, op="x", dtype="y"))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 8 and len(set(answers)) == 1
    assert count == {"a": ROUNDS + 1, "b": ROUNDS + 1}  # measured once


def test_forcing_is_scoped_to_the_block_and_thread(tmp_path, monkeypatch):
    c = Chooser(tmp_path / "k.json", clock=FakeClock({}))
    c.choices[("k",)] = choose.Choice("a", {"a": 1.0, "b": 2.0})
    runs = {"a": lambda i: None, "b": lambda i: None}
    seen = []
    with kernels.force("linear", "b"):
        assert c.pick(("k",), runs, op="linear", dtype="float32") == "b"
        with kernels.force("linear.float32", "a"):  # the innermost wins
            assert c.pick(("k",), runs, op="linear", dtype="float32") == "a"
        other = threading.Thread(
            target=lambda: seen.append(c.pick(("k",), runs, op="linear", dtype="float32"))
        )
        other.start()
        other.join()
        assert c.pick(("k",), runs, op="attend", dtype="float32") == "a"  # other op
        assert c.pick(("k",), {"a": runs["a"]}, op="linear", dtype="x") == "a"  # b cannot run
    assert seen == ["a"]  # the other thread was not forced
    assert c.pick(("k",), runs, op="linear", dtype="float32") == "a"
    monkeypatch.setenv("GPT2LAB_KERNELS", "attend=b, linear.float32=b")
    c.choices[("k16",)] = choose.Choice("a", {"a": 1.0, "b": 2.0})
    assert c.pick(("k16",), runs, op="linear", dtype="bfloat16") == "a"
    assert c.pick(("k",), runs, op="linear", dtype="float32") == "b"
    assert c.choices[("k",)].source.startswith("forced")  # kept for the process
    monkeypatch.delenv("GPT2LAB_KERNELS")
    assert c.pick(("k",), runs, op="linear", dtype="float32") == "b"  # read when decided
    for bad in ("linear", "linear=", "=native", "a=b,,c"):
        monkeypatch.setenv("GPT2LAB_KERNELS", bad)
        with pytest.raises(GPT2LabError, match="GPT2LAB_KERNELS"):
            c.pick(("k",), runs, op="linear", dtype="float32")


def test_a_timed_run_goes_over_copies_totalling_twice_the_cache(tmp_path):
    from pathlib import Path

    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        text = (index / "size").read_text().strip()
        sizes.append(int(text[:-1]) * {"K": 1024, "M": 1 << 20}[text[-1]])
    budget = choose.cache_budget()
    assert budget >= min(2 * max(sizes, default=0), 512 << 20) and budget >= 32 << 20
    assert choose.copies_for(budget * 3) == 1 and choose.copies_for(1) == 64
    assert choose.copies_for(budget // 5) == 5 + (budget % 5 != 0)  # (rounded up)
    # each timed run goes over every copy; the time kept is per copy
    clock = FakeClock({"a": [1] * 20, "b": [2] * 20})
    c = Chooser(tmp_path / "k.json", clock=clock)
    runs = {n: clock.runner(n) for n in "ab"}
    seen = []
    runs = {n: (lambda i, r=runs[n]: seen.append(i) or r(i)) for n in "ab"}
    assert c.pick(("k",), runs, op="x", dtype="y", copies=3) == "a"
    assert seen == [0, 0] + [0, 1, 2] * 2 * ROUNDS
    assert c.choices[("k",)].seconds == {"a": 1.0, "b": 2.0}


@pytest.mark.parametrize(
    "rows, bucket",
    [(1, 1), (2, 2), (3, 4), (8, 8), (9, 16), (500, 512), (1024, 1024), (10**6, 1024)],
)
def test_row_buckets(rows, bucket):
    assert row_bucket(rows) == bucket


# ---- every candidate, forced, computes the function -----------------------------------------
def _linear_case(dtype, rows, seed=0, out=640, inp=256):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, inp, generator=gen) * 0.05).to(dtype)
    b = (torch.randn(out, generator=gen) * 0.05).to(dtype)
    x = torch.randn(1, rows, inp, generator=gen).to(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
@pytest.mark.parametrize("act", ["none", "gelu_tanh", "gelu_erf"])
def test_every_linear_candidate_is_the_product_within_its_bound(dtype, rows, act):
    x, w, b = _linear_case(dtype, rows)
    approximate = {"gelu_tanh": "tanh", "gelu_erf": "none"}.get(act)
    ref = F.linear(x.double(), w.double(), b.double())
    if approximate:
        ref = F.gelu(ref, approximate=approximate)
    # float32: accumulation order only; bf16: one rounding of the float32 result
    # (2^-8 relative) plus bf16's own rounding of the output of a two-step path
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    names = klinear.candidates(x, w, act)
    assert names[0] == "aten" and len(names) >= 1
    with torch.inference_mode():
        for name in names:
            with kernels.force("linear", name):
                got = klinear.linear(x, w, b, act)
            assert got.shape == ref.shape and got.dtype == dtype, name
            err = (got.double() - ref).abs().max().item()
            assert err <= tol * ref.abs().max().item(), f"{name}: {err}"
    print(f"{dtype} rows {rows} {act}: candidates {names}")


def test_the_model_takes_the_measured_kernel_and_any_forced_one_agrees(tmp_path):
    # a gpt2-medium-width layer is past the size under which nothing is timed
    x, w, b = _linear_case(torch.bfloat16, 1, out=1024, inp=1024)
    with torch.inference_mode():
        y = klinear.linear(x, w, b)
        key = ("linear", "bfloat16", 1, 1024, 1024, "none")
        choice = kernels.chooser().choices[key]
        assert choice.name in klinear.candidates(x, w, "none")
        assert set(choice.seconds) == set(klinear.candidates(x, w, "none"))
        assert choice.gbps and choice.gbps > 0
        for name in choice.seconds:
            with kernels.force("linear.bfloat16", name):
                other = klinear.linear(x, w, b)
            torch.testing.assert_close(other.float(), y.float(), rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("rows", [1, 4, 8, 33])
def test_every_int8_candidate_is_the_dequantized_product(rows):
    gen = torch.Generator().manual_seed(rows)
    dense = torch.nn.Linear(256, 384)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(384, 256, generator=gen) * 0.05)
        dense.bias.copy_(torch.randn(384, generator=gen) * 0.05)
    layer = Int8Linear.from_linear(dense)
    x = torch.randn(2, rows, 256, generator=gen).bfloat16()
    q = layer.q_weight.double()
    s = layer.scales.double()
    ref = x.double() @ (q * s[:, None]).T + layer.bias.double()
    names = klinear.int8_candidates(x, layer) + ["dequant"]
    with torch.inference_mode():
        for act in ("none", "gelu_tanh"):
            want = ref if act == "none" else F.gelu(ref, approximate="tanh")
            for name in names:
                y = klinear.INT8_CANDIDATES[name](x, layer, act)
                err = (y.double() - want).abs().max().item()
                # bf16 output (2^-8) and a bf16 bias add (torch) / 16-bit activations (native)
                assert err <= 2**-7 * want.abs().max().item() + 1e-2, f"{name} {act}: {err}"
                if name != "dequant":  # (the fallback, run only where nothing else can)
                    with kernels.force("int8", name):
                        assert torch.equal(layer(x, act), y)
    print(f"int8 candidates at {rows} rows: {names}")


@pytest.mark.parametrize(
    "T, S, masked", [(1, 1, False), (1, 300, False), (7, 7, False), (5, 12, True), (64, 64, True)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_attention_candidate_is_attention(T, S, masked, dtype):
    gen = torch.Generator().manual_seed(T * 100 + S)
    B, H, dh = 2, 4, 16
    q, k, v = (torch.randn(B, H, n, dh, generator=gen).to(dtype) for n in (T, S, S))
    allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    if masked:
        allowed &= torch.rand(T, S, generator=gen) > 0.3
        allowed[:, 0] = True
        mask = attention.AttnMask(allowed, False)
    else:
        mask = attention.AttnMask(None, T > 1)
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    ref = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.double()
    assert attention.candidates(q, k, mask) == ["sdpa"]  # autograd on: torch's only
    with torch.inference_mode():
        names = attention.candidates(q, k, mask)
        # at inference: more for one query, and for bf16 prefill
        assert names[0] == "sdpa" and len(names) == 1 + (T == 1) * (
            1 + (dtype != torch.float32)
        ) + (T > 1 and dtype == torch.bfloat16)
        for name in names:
            with kernels.force("attend", name):
                got = attention.attend(q, k, v, mask, 0.25)
            err = (got.double() - ref).abs().max().item()
            tol = 2**-6 if dtype == torch.bfloat16 else 1e-5
            assert got.shape == (B, H, T, dh) and err < tol * ref.abs().max().item(), name
        # and the pattern path's scores are the masked scores
        got = attention.scores(q, k, mask, 0.25)
        want = scores.masked_fill(~allowed, float("-inf"))
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite)
        assert (got.double()[finite] - want[finite]).abs().max() < 2**-6 * want[finite].abs().max()


def test_tune_and_info_show_the_choices(tmp_path):
    env = {**os.environ, "GPT2LAB_KERNEL_CACHE": str(tmp_path / "k.json")}
    cmd = [sys.executable, "-m", "gpt2lab"]
    out = subprocess.run(
        [*cmd, "tune", "--model", "gpt2", "--dtypes", "bfloat16", "--rows", "1"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = all_lines = out.stdout.strip().splitlines()
    # gpt2's five weights at one row, the MLP's first also with its GELU fused, then the
    # native decoding step against the eager one where the native kernels run
    step = [ln for ln in lines if ln.startswith("step:")]
    assert len(step) == (1 if native.step_class("bf16") is not None else 0), lines
    assert all(ln.startswith("step:bf16:1:12:768:3072 ") for ln in step), step
    assert all(("eager" in ln and "native" in ln) for ln in step), step
    lines = [ln for ln in lines if not ln.startswith("step:")]
    assert len(lines) == 6 and all(" -> " in ln and "GB/s" in ln for ln in lines), lines
    keys = {ln.split()[0] for ln in lines}
    assert {"linear:bfloat16:1:2304:768:none", "linear:bfloat16:1:50257:768:none"} <= keys
    # written to the file unless measured while other processes took the cores
    kept = {ln.split()[0] for ln in all_lines if ln.endswith("; measured)")}
    assert all(ln.endswith("; measured)") or "under load" in ln for ln in all_lines), lines
    path = tmp_path / "k.json"
    entries = next(iter(json.loads(path.read_text()).values())) if path.exists() else {}
    assert set(entries) == kept
    info = subprocess.run([*cmd, "info", "--kernels"], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert info.returncode == 0, info.stderr
    assert "machine" in info.stdout and all(k in info.stdout for k in kept)
    for bad in (["--rows", "x"], ["--rows", "0"], ["--dtypes", "fp8"]):
        res = subprocess.run([*cmd, "tune", *bad], capture_output=True, text=True, env=env,
                             timeout=600)  # fmt: skip
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
        assert res.stderr.startswith("gpt2lab: error:"), res.stderr


def test_native_kernel_choice_survives_a_cpu_without_it(tmp_path, monkeypatch):
    # a cache file written where the native kernel won, read where it cannot run
    monkeypatch.setattr(klinear, "_native_supports", lambda kind, k: False)
    x, w, b = _linear_case(torch.float32, 1, out=1024, inp=128)
    key = ("linear", "float32", 1, 1024, 128, "none")
    path = tmp_path / "k.json"
    path.write_text(json.dumps({choose.machine_key(): {choose.file_key(key): {
        "name": "native", "seconds": {"native": 1e-6, "aten": 1.0}}}}))  # fmt: skip
    monkeypatch.setattr(choose, "_chooser", Chooser(path))
    with torch.inference_mode():
        y = klinear.linear(x, w, b)
    assert kernels.chooser().choices[key].name in ("aten", "onednn")
    np.testing.assert_allclose(y.numpy(), F.linear(x, w, b).numpy(), rtol=1e-5, atol=1e-5)


def test_the_int8_unembedding_follows_edits_of_the_tied_embedding(small_ckpt):
    from gpt2lab.checkpoint import load

    model = load(small_ckpt, quantize="int8")
    tokens = torch.tensor([[464, 3139, 286, 4881, 318]])
    W = model.wte.weight
    with torch.inference_mode(), kernels.force("dense_or_int8", "int8"):
        before = model(tokens)
        with torch.no_grad():
            W[100:200] *= -1  # an in-place edit of W_E (and so of the tied W_U)
        after = model(tokens)
    # the int8 copy was made again: logits for the edited tokens flip with the rows
    # (|w| and so each row's int8 scale are unchanged by a sign flip: exactly negated)
    assert torch.equal(after[..., 100:200], -before[..., 100:200])
    assert torch.equal(after[..., 200:], before[..., 200:])
    # and the int8 unembedding is the per-row int8 product (float64 reference)
    q, s = (t.double() for t in quantize_weight(W))
    with torch.inference_mode():
        h = model.ln_final(model(tokens, stop_at_layer=model.cfg.n_layers))
        with kernels.force("dense_or_int8", "int8"):
            got = model.unembed(h, W).double()
    ref = h.double() @ (q * s[:, None]).T
    assert (got - ref).abs().max() <= 2**-7 * ref.abs().max() + 1e-2


def test_an_answer_measured_on_a_busy_machine_is_not_kept_in_the_file(tmp_path):
    class Busy(Chooser):
        def cpu_share(self, wall, cpu):  # other processes had half the cores
            return 0.5

    path = tmp_path / "k.json"
    clock = FakeClock({"a": [1, 2, 2, 2], "b": [1, 1, 1, 1]})
    c = Busy(path, clock=clock)
    assert c.pick(("k",), {n: clock.runner(n) for n in "ab"}, op="x", dtype="y") == "b"
    assert "under load (50% CPU)" in c.choices[("k",)].source
    assert not path.exists()  # used by this process, not written for later ones
    # the real share: a quiet, memory-bound kernel keeps its threads busy
    real = Chooser(tmp_path / "r.json")
    assert real.cpu_share(2.0, 2.0 * torch.get_num_threads()) == 1.0
    assert real.cpu_share(2.0, 1.0 * torch.get_num_threads()) == 0.5
