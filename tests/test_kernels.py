"""The VNNI int8 kernel (gpt2lab.kernels) against float64 matrix products."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2lab import kernels
from gpt2lab.quantize import Int8Linear, quantize_weight

needs_vnni = pytest.mark.skipif(not kernels.cpu_has_vnni(), reason="CPU without AVX-512 VNNI")


def reference(x, q, scales, bias):
    y = x.double() @ (q.double() * scales.double()[:, None]).T
    return y if bias is None else y + bias.double()


@needs_vnni
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("k", [64, 320, 1024])  # 320: the 64-byte tail after 256-byte steps
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_gemv_is_the_matrix_product(rows, k, with_bias):
    gemv = kernels.int8_gemv()
    assert gemv is not None  # builds on this machine
    gen = torch.Generator().manual_seed(k + rows)
    w = torch.randn(200, k, generator=gen) * 0.05
    q, scales = quantize_weight(w)
    bias = torch.randn(200, generator=gen) if with_bias else None
    x = torch.randn(rows, k, generator=gen) * 3
    x[0, 5] = 40.0  # an outlier sets the row's scale
    if rows > 1:
        x[1] = 0.0  # an all-zero row: the output is the bias
    y = gemv(x, q, q.sum(1, dtype=torch.int32), scales, bias if with_bias else torch.empty(0))
    ref = reference(x, q, scales, bias)
    # activations are exact to max|x_row| / (127 * 508) per element (16 bits)
    bound = (q.double().abs() * scales.double()[:, None]).sum(1) * x.abs().amax(1, keepdim=True)
    bound = bound.double() / (127 * 508) + 1e-4
    err = (y.double() - ref).abs()
    print(f"rows {rows} k {k}: max err {err.max():.2e}, max |y| {ref.abs().max():.2f}")
    assert y.shape == (rows, 200) and y.dtype == torch.float32
    assert (err <= bound).all()
    if rows > 1:
        assert torch.equal(y[1], bias if with_bias else torch.zeros(200))


@needs_vnni
def test_int8_linear_uses_the_kernel_for_few_rows_and_is_finer_than_bf16():
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(512, 384)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(384, 512, generator=gen) * 0.05)
    layer = Int8Linear.from_linear(lin)  # bf16 compute
    ref_q, ref_s = layer.q_weight, layer.scales.float()
    x = torch.randn(1, 4, 512, generator=gen).bfloat16()
    ref = reference(x.reshape(4, 512), ref_q, ref_s, layer.bias.float())
    with torch.inference_mode():
        fast = layer(x).reshape(4, 384)  # 4 rows: the kernel
        torch_kernel = torch._weight_int8pack_mm(x.reshape(4, 512), ref_q, layer.scales)
        torch_kernel = torch_kernel + layer.bias
    err_fast = (fast.double() - ref).abs().max().item()
    err_torch = (torch_kernel.double() - ref).abs().max().item()
    print(f"max err: VNNI kernel {err_fast:.4f}, torch's int8 kernel {err_torch:.4f}")
    assert fast.dtype == torch.bfloat16
    # both end in a bf16 output; the kernel's products themselves are finer
    assert err_fast <= 2**-8 * ref.abs().max().item()
    assert err_fast <= err_torch * 1.01


def test_kernel_can_be_switched_off():
    script = "from gpt2lab import kernels; print(kernels.int8_gemv() is None)"
    env = dict(os.environ, GPT2LAB_INT8_KERNEL="0")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_failed_build_falls_back_with_one_line(tmp_path):
    # No working compiler: one line on stderr, then torch's int8 kernel does the work.
    script = (
        "import torch\n"
        "from gpt2lab import kernels\n"
        "from gpt2lab.quantize import Int8Linear\n"
        "layer = Int8Linear.from_linear(torch.nn.Linear(128, 64))\n"
        "x = torch.randn(1, 128)\n"
        "with torch.inference_mode():\n"
        "    y = layer(x)\n"
        "ref = torch.nn.functional.linear(x.bfloat16(), layer.weight, layer.bias)\n"
        "print(kernels.int8_gemv() is None, float((y.float() - ref.float()).abs().max()))\n"
    )
    env = dict(os.environ, GPT2LAB_INT8_KERNEL="1", CXX="/bin/false",
               TORCH_EXTENSIONS_DIR=str(tmp_path))  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    is_none, err = out.stdout.split()
    assert is_none == "True" and float(err) < 0.02
    if kernels.cpu_has_vnni():  # a build was tried: said once, in one line
        lines = [ln for ln in out.stderr.splitlines() if "int8 kernel not built" in ln]
        assert len(lines) == 1 and "Traceback" not in out.stderr


HOLD_LOCK = (
    "import sys\n"
    "from pathlib import Path\n"
    "from gpt2lab import kernels\n"
    "build = Path(sys.argv[1])\n"
    "with kernels._build_lock(build):\n"
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
    env = dict(os.environ, GPT2LAB_INT8_KERNEL="1", CXX="/bin/false",
               TORCH_EXTENSIONS_DIR=str(tmp_path))  # fmt: skip
    build_dir = Path(
        subprocess.run(
            [sys.executable, "-c", "from torch.utils import cpp_extension as c; "
             f"print(c._get_build_directory({kernels.NAME!r}, False))"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    assert build_dir.is_relative_to(tmp_path)  # the test's own extension cache
    holder = _start_holder(build_dir)
    holder.kill()
    holder.wait()
    assert (build_dir / "lock").exists()  # the stale lock a killed build leaves
    script = "from gpt2lab import kernels; print(kernels._build() is None)"
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True" and "Traceback" not in out.stderr
    assert not (build_dir / "lock").exists()
    assert len([ln for ln in out.stderr.splitlines() if "int8 kernel not built" in ln]) == 1


def test_a_live_build_elsewhere_is_waited_for_then_given_up(tmp_path):
    holder = _start_holder(tmp_path)
    try:
        with pytest.raises(TimeoutError, match="another process"):
            with kernels._build_lock(tmp_path, wait_s=0.3):
                pass
        assert (tmp_path / "lock").exists()  # a live build's lock is not touched
    finally:
        holder.kill()
        holder.wait()
    with kernels._build_lock(tmp_path, wait_s=0.3):  # the holder died: free at once
        assert not (tmp_path / "lock").exists()


def test_a_first_build_says_it_may_take_minutes_then_how_long_it_took(
    tmp_path, monkeypatch, capsys
):
    """The compiler is faked (a real build takes minutes) and so is the clock: the notice
    before, one line with the time after, and nothing once the kernel is built."""
    from types import SimpleNamespace

    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir = Path(cpp_extension._get_build_directory(kernels.NAME, False))
    assert build_dir.is_relative_to(tmp_path)
    times = iter([100.0, 141.4, 200.0, 201.0])
    monkeypatch.setattr(kernels, "_clock", lambda: next(times))
    built = []

    def fake_load(name, **options):
        built.append(name)
        (build_dir / f"{name}.so").touch()
        return SimpleNamespace(int8_gemv="the kernel")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert kernels._build() == "the kernel"
    assert capsys.readouterr().err.splitlines() == [
        "gpt2lab: building the int8 kernel (once per machine and torch version; "
        "this may take a few minutes) ...",
        "gpt2lab: int8 kernel built in 41 s",
    ]
    assert kernels._build() == "the kernel"  # built: loaded from the cache, silently
    assert built == [kernels.NAME] * 2 and capsys.readouterr().err == ""
