"""The greedy pick (kernels/pick.py): each row's argmax and its log-softmax, against
torch's argmax and float64 log-softmax, native or not; and generation through it."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.kernels import native
from gpt2lab.kernels import pick as kpick


def _reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.double()
    ids = x.argmax(-1)  # the first index of the maximum
    return ids, torch.log_softmax(x, -1).gather(1, ids[:, None]).squeeze(1)


@pytest.fixture(params=["native", "torch"])
def greedy(request, monkeypatch):
    if request.param == "native":
        if native.module_for("f32") is None:
            pytest.skip("no native kernels on this CPU")
    else:
        monkeypatch.setattr(native, "module_for", lambda kind: None)
    return kpick.greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 2, 15, 16, 17, 33, 1000, 50257])
def test_argmax_and_log_softmax_of_each_row(greedy, dtype, V):
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(3, V, generator=g) * 6).to(dtype)
    if V > 4:  # ties: the first index wins, as torch's argmax
        logits[1, V - 2] = logits[1].max()
        logits[1, 1] = logits[1, V - 2]
    ids, lp = greedy(logits)
    ref_ids, ref_lp = _reference(logits)
    assert ids.dtype == torch.long and lp.dtype == torch.float32 and lp.shape == (3,)
    assert torch.equal(ids, ref_ids)
    # float32 sums of V exponentials (each to ~2 ulp), then a log: a few ulp of log V
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=1e-6 * (1 + abs(V).bit_length()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_row_that_is_not_finite_has_a_nan_log_prob(greedy, bad):
    logits = torch.randn(3, 100)
    logits[1, 40] = bad
    logits[2] = float("-inf")
    _, lp = greedy(logits)
    assert torch.isfinite(lp[0]) and torch.isnan(lp[1]) and torch.isnan(lp[2])


def test_strided_rows_are_read_as_given(greedy):
    base = torch.randn(4, 2 * 300)
    logits = base[:, ::2]  # not contiguous
    ids, lp = greedy(logits)
    ref_ids, ref_lp = _reference(logits)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=1e-5)
