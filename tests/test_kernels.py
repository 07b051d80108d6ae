"""The native GEMV kernels (gpt2lab.kernels.native) against float64 matrix products,
and their build machinery (lock, messages, fallback, switches).

Error bounds, with u = 2**-24 (float32 unit roundoff) and S = sum_k |x_k w_k| + |b|:
- the float32 sum of K exact or float32-rounded products plus the bias, in any order,
  is within (K + 2) u S of the exact value (the classic gamma_n bound, n <= K + 2
  operations along any path; vdpbf16ps products are exact);
- GELU has |gelu'| <= 1.13, so that error passes through at most 1.13 times, and our
  vector GELU adds ACT_REL |gelu(z)| (1 + z^2) + ACT_ABS (exp to ~2 ulp, the tanh form
  or erfc's 1.2e-7 fraction, and z^2 rounded inside the exponent: checked on its own
  below over |z| <= 12);
- a bf16 output is one round-to-nearest of that float32 value: a relative 2**-8 more.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2lab.kernels import native
from gpt2lab.quantize import quantize_weight

needs = {
    kind: pytest.mark.skipif(not native.cpu_supports(kind), reason=f"CPU without the {flag}")
    for kind, flag in [("f32", "AVX-512F"), ("bf16", "AVX-512 BF16"), ("int8", "AVX-512 VNNI")]
}
U = 2.0**-24
ACT_REL, ACT_ABS = 2.0**-21, 1e-30
GELU_SLOPE = 1.13
ACTS = {1: "tanh", 2: "none"}  # act code -> F.gelu's `approximate`
ROWS = [1, 2, 3, 8, 17]


def _act(z: torch.Tensor, act: int) -> torch.Tensor:
    """GELU in float64, in forms that keep their relative accuracy where the result is
    tiny (F.gelu's 1 + tanh(u) and 1 + erf(z / sqrt 2) cancel to nothing there; they
    agree elsewhere, see test_the_reference_is_torch_gelu)."""
    if act == 1:
        u = math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)
        return z / (1 + torch.exp(-2 * u))
    if act == 2:
        return z * 0.5 * torch.special.erfc(-z / math.sqrt(2))
    return z


def _act_error(z: torch.Tensor, act: int) -> torch.Tensor:
    if act == 0:
        return torch.zeros_like(z)
    return ACT_REL * _act(z, act).abs() * (1 + z * z) + ACT_ABS


def _data(rows, k, n, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=gen) * 2).to(dtype)
    w = (torch.randn(n, k, generator=gen) * 0.1).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    return x, w, b


def _float_bound(x, w, b, z, act):
    """|kernel's float32 result - act(z)| before any rounding to bf16 (see the top)."""
    k = x.shape[1]
    s = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    dot = (k + 2) * U * s
    return (GELU_SLOPE * dot if act else dot) + _act_error(z, act)


@needs["f32"]
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k", [16, 48, 336, 1024])  # 48, 336: the steps after 64-wide ones
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("act", [0, 1, 2])
def test_f32_gemv_is_the_matrix_product(rows, k, with_bias, act):
    gemv = native.f32_gemv()
    assert gemv is not None  # builds on this machine
    x, w, b = _data(rows, k, 75, rows * 1000 + k, torch.float32)  # 75: a 16-column tail
    bias = b if with_bias else None
    z = x.double() @ w.double().T + (0 if bias is None else bias.double())
    y = gemv(x, w, b if with_bias else torch.empty(0), act)
    assert y.shape == (rows, 75) and y.dtype == torch.float32
    err = (y.double() - _act(z, act)).abs()
    assert (err <= _float_bound(x, w, bias, z, act)).all(), err.max()


@needs["bf16"]
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k", [32, 96, 352, 1024])  # 96, 352: the steps after 128-wide ones
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("act", [0, 1, 2])
def test_bf16_gemv_is_one_rounding_of_the_matrix_product(rows, k, with_bias, act):
    gemv = native.bf16_gemv()
    assert gemv is not None
    x, w, b = _data(rows, k, 75, rows * 1000 + k, torch.bfloat16)
    bias = b if with_bias else None
    z = x.double() @ w.double().T + (0 if bias is None else bias.double())
    ref = _act(z, act)
    y = gemv(x, w, b if with_bias else torch.empty(0, dtype=torch.bfloat16), act)
    assert y.shape == (rows, 75) and y.dtype == torch.bfloat16
    err = (y.double() - ref).abs()
    bound = 2.0**-8 * ref.abs() + (1 + 2.0**-8) * _float_bound(x, w, bias, z, act)
    assert (err <= bound).all(), err.max()


def _int8_case(rows, k, seed, x_dtype):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(200, k, generator=gen) * 0.05
    q, scales = quantize_weight(w)
    bias = torch.randn(200, generator=gen)
    x = (torch.randn(rows, k, generator=gen) * 3).to(x_dtype)
    x[0, 5] = 40.0  # an outlier sets the row's scale
    if rows > 1:
        x[1] = 0.0  # an all-zero row: the output is the bias
    return x, q, scales, bias


def _int8_bound(x, q, scales):
    """The activations are exact to max|x_row| / (127 * 508) per element (16 bits)."""
    per_row = (q.double().abs() * scales.double()[:, None]).sum(1)
    return per_row * x.double().abs().amax(1, keepdim=True) / (127 * 508) + 1e-4


@needs["int8"]
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k", [64, 320, 1024])  # 320: the 64-byte tail after 256-byte steps
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_gemv_is_the_matrix_product(rows, k, with_bias):
    """float32 in, float32 out: the error of the kernel's 16-bit activations alone."""
    gemv = native.int8_gemv()
    assert gemv is not None
    x, q, scales, bias = _int8_case(rows, k, k + rows, torch.float32)
    ref = x.double() @ (q.double() * scales.double()[:, None]).T
    ref = ref + bias.double() if with_bias else ref
    y = gemv(x, q, q.sum(1, dtype=torch.int32), scales, bias if with_bias else torch.empty(0))
    err = (y.double() - ref).abs()
    assert y.shape == (rows, 200) and y.dtype == torch.float32
    assert (err <= _int8_bound(x, q, scales)).all(), err.max()
    if rows > 1:
        assert torch.equal(y[1], bias if with_bias else torch.zeros(200))


@needs["int8"]
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k", [64, 320, 1024])
@pytest.mark.parametrize("act", [0, 1, 2])
def test_int8_gemv_in_bf16_with_gelu(rows, k, act):
    gemv = native.int8_gemv()
    x, q, scales, bias = _int8_case(rows, k, 7 * k + rows, torch.bfloat16)
    z = x.double() @ (q.double() * scales.double()[:, None]).T + bias.double()
    ref = _act(z, act)
    y = gemv(x, q, q.sum(1, dtype=torch.int32), scales, bias, act)
    assert y.shape == (rows, 200) and y.dtype == torch.bfloat16
    pre = _int8_bound(x, q, scales)
    bound = 2.0**-8 * ref.abs() + (1 + 2.0**-8) * (
        (GELU_SLOPE * pre if act else pre) + _act_error(z, act)
    )
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), err.max()


@pytest.mark.parametrize("act", [1, 2])
def test_the_reference_is_torch_gelu(act):
    z = torch.linspace(-14, 14, 4001, dtype=torch.float64)
    assert torch.allclose(_act(z, act), F.gelu(z, approximate=ACTS[act]), rtol=1e-14, atol=1e-14)


@needs["f32"]
@pytest.mark.parametrize("act", [1, 2])
def test_the_vector_gelu_over_a_wide_range(act):
    """Identity weights make the product exact, so only the activation's error is left,
    down to where float32 underflows."""
    z = torch.linspace(-14, 14, 16 * 401).reshape(-1, 16)
    eye = torch.eye(16)
    y = torch.cat([native.f32_gemv()(row[None], eye, torch.empty(0), act) for row in z])
    ref = _act(z.double(), act).reshape(y.shape)
    err = (y.double() - ref).abs()
    assert (err <= _act_error(z.double(), act).reshape(y.shape)).all()


@pytest.mark.parametrize("kind", ["f32", "bf16", "int8"])
def test_results_do_not_depend_on_the_thread_count(kind):
    """Columns are split between threads, never a sum: every output is computed alike."""
    if not native.cpu_supports(kind):
        pytest.skip(f"CPU without the {kind} kernel's instructions")
    dtype = torch.float32 if kind == "f32" else torch.bfloat16
    x, w, b = _data(3, 1024, 3000, 1, dtype)
    if kind == "int8":
        q, s = quantize_weight(w.float())
        args = (x, q, q.sum(1, dtype=torch.int32), s, b.float(), 1)
    else:
        args = (x, w, b, 1)
    gemv = getattr(native, f"{kind}_gemv")()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gemv(*args)
        torch.set_num_threads(2)
        two = gemv(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize(("kind", "multiple"), [("f32", 16), ("bf16", 32), ("int8", 64)])
def test_an_unsupported_width_is_said_first_and_refused(kind, multiple):
    assert native.gemv_supports(kind, 4 * multiple) and native.gemv_supports(kind, 1600)
    assert not native.gemv_supports(kind, multiple // 2) and not native.gemv_supports(kind, 0)
    if not native.cpu_supports(kind):
        return
    dtype = torch.float32 if kind == "f32" else torch.bfloat16
    k = multiple + multiple // 2
    x, w = torch.zeros(1, k, dtype=dtype), torch.zeros(8, k, dtype=dtype)
    if kind == "int8":
        args = (
            x,
            w.to(torch.int8),
            torch.zeros(8, dtype=torch.int32),
            torch.ones(8),
            torch.empty(0),
        )
    else:
        args = (x, w, torch.empty(0, dtype=dtype))
    with pytest.raises(RuntimeError, match=f"not a multiple of {multiple}"):
        getattr(native, f"{kind}_gemv")()(*args)


def test_an_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown kernel 'fp8'"):
        native.gemv_supports("fp8", 64)


@needs["int8"]
def test_int8_gemv_is_finer_than_torchs_int8_kernel():
    """Same int8 weights, same bf16 activations: both end in one bf16 rounding, but the
    kernel's products are finer than torch's (which rounds the sum to bf16 before the
    bias is added)."""
    gen = torch.Generator().manual_seed(0)
    q, scales = quantize_weight(torch.randn(384, 512, generator=gen) * 0.05)
    bias = torch.randn(384, generator=gen)
    x = torch.randn(4, 512, generator=gen).bfloat16()
    ref = x.double() @ (q.double() * scales.double()[:, None]).T + bias.double()
    fast = native.int8_gemv()(x, q, q.sum(1, dtype=torch.int32), scales, bias, 0)
    theirs = torch._weight_int8pack_mm(x, q, scales.bfloat16()) + bias.bfloat16()
    err_fast = (fast.double() - ref).abs().max().item()
    err_torch = (theirs.double() - ref).abs().max().item()
    assert fast.dtype == torch.bfloat16
    assert err_fast <= 2**-8 * ref.abs().max().item()
    assert err_fast <= err_torch * 1.01


def _run(script, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", script], env=full, capture_output=True, text=True)


GETTERS = "from gpt2lab.kernels import native as n; print([g() is None for g in (n.f32_gemv, n.bf16_gemv, n.int8_gemv)])"  # noqa: E501


def test_kernels_can_be_switched_off():
    out = _run(GETTERS, GPT2LAB_NATIVE_KERNELS="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[True, True, True]"
    out = _run(GETTERS, GPT2LAB_INT8_KERNEL="0")
    assert out.returncode == 0, out.stderr
    expected = [not native.cpu_supports("f32"), not native.cpu_supports("bf16"), True]
    assert out.stdout.strip() == str(expected)


def test_failed_build_falls_back_with_one_line(tmp_path):
    # No working compiler: one line on stderr, then torch's int8 kernel does the work.
    script = (
        "import torch\n"
        "from gpt2lab.kernels import native\n"
        "from gpt2lab.quantize import Int8Linear\n"
        "layer = Int8Linear.from_linear(torch.nn.Linear(128, 64))\n"
        "x = torch.randn(1, 128)\n"
        "with torch.inference_mode():\n"
        "    y = layer(x)\n"
        "ref = torch.nn.functional.linear(x.bfloat16(), layer.weight, layer.bias)\n"
        "print(native.int8_gemv() is None, native.bf16_gemv() is None,\n"
        "      float((y.float() - ref.float()).abs().max()))\n"
    )
    out = _run(
        script, GPT2LAB_INT8_KERNEL="1", CXX="/bin/false", TORCH_EXTENSIONS_DIR=str(tmp_path)
    )
    assert out.returncode == 0, out.stderr
    int8_none, bf16_none, err = out.stdout.split()
    assert int8_none == "True" and bf16_none == "True" and float(err) < 0.02
    if native.cpu_has_vnni():  # a build was tried: said once, in one line
        lines = [ln for ln in out.stderr.splitlines() if "native kernels not built" in ln]
        assert len(lines) == 1 and "Traceback" not in out.stderr


HOLD_LOCK = (
    "import sys\n"
    "from pathlib import Path\n"
    "from gpt2lab.kernels import native\n"
    "build = Path(sys.argv[1])\n"
    "with native._build_lock(build):\n"
    "    (build / 'lock').touch()  # torch's own build lock, as a build in progress holds it\n"
    "    print('holding', flush=True)\n"
    "    sys.stdin.read()  # until killed\n"
)


def _start_holder(build_dir):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(build_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_a_killed_build_leaves_no_lock_that_blocks_later_runs(tmp_path):
    # A build killed half-way (SIGKILL: no clean-up runs) leaves torch's lock file
    # behind; torch alone would then wait for it forever. The next run must go on:
    # here it builds with a failing compiler, so it falls back, in one stderr line.
    env = dict(CXX="/bin/false", TORCH_EXTENSIONS_DIR=str(tmp_path))
    build_dir = Path(
        _run("from pathlib import Path; from torch.utils import cpp_extension as c; "
             "from gpt2lab.kernels import native; "
             "print(native._build_dir(c, Path(native.__file__).parent))", **env).stdout.strip()
    )  # fmt: skip
    assert build_dir.is_relative_to(tmp_path)  # the test's own extension cache
    holder = _start_holder(build_dir)
    holder.kill()
    holder.wait()
    assert (build_dir / "lock").exists()  # the stale lock a killed build leaves
    out = _run("from gpt2lab.kernels import native; print(native._build() is None)", **env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True" and "Traceback" not in out.stderr
    assert not (build_dir / "lock").exists()
    assert len([ln for ln in out.stderr.splitlines() if "native kernels not built" in ln]) == 1


def test_a_live_build_elsewhere_is_waited_for_then_given_up(tmp_path):
    holder = _start_holder(tmp_path)
    try:
        with pytest.raises(TimeoutError, match="another process"):
            with native._build_lock(tmp_path, wait_s=0.3):
                pass
        assert (tmp_path / "lock").exists()  # a live build's lock is not touched
    finally:
        holder.kill()
        holder.wait()
    with native._build_lock(tmp_path, wait_s=0.3):  # the holder died: free at once
        assert not (tmp_path / "lock").exists()


def test_a_first_build_says_it_may_take_minutes_then_how_long_it_took(
    tmp_path, monkeypatch, capsys
):
    """The compiler is faked (a real build takes minutes) and so is the clock: the notice
    before, one line with the time after, and nothing once the module is built."""
    from types import SimpleNamespace

    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir = native._build_dir(cpp_extension, Path(native.__file__).parent)
    assert build_dir.is_relative_to(tmp_path)
    # another installed copy (another checkout, venv) builds in a folder of its own
    assert native._build_dir(cpp_extension, tmp_path / "other-copy") != build_dir
    times = iter([100.0, 141.4, 200.0, 201.0])
    monkeypatch.setattr(native, "_clock", lambda: next(times))
    built = []
    module = SimpleNamespace(int8_gemv="the kernel")

    def fake_load(name, **options):
        built.append(name)
        (build_dir / f"{name}.so").touch()
        return module

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert native._build() is module
    assert capsys.readouterr().err.splitlines() == [
        "gpt2lab: building the native CPU kernels (once per machine and torch version; "
        "this may take a few minutes) ...",
        "gpt2lab: native kernels built in 41 s",
    ]
    assert native._build() is module  # built: loaded from the cache, silently
    assert built == [native.NAME] * 2 and capsys.readouterr().err == ""
