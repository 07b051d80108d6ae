"""FactoredMatrix and the OV / QK circuits, against transformer-lens 3.x.

1. On random factors (plain matrices, leading dimensions on either side, broadcasting,
   inner dimension below and above the outer ones), every operation gives what
   transformer_lens.FactoredMatrix gives on the same factors, within 1e-5 relative:
   shapes, products with tensors / vectors / factored matrices on either side (the
   same factorisation, not just the same product), .T, AB, BA, the SVD (singular
   values; singular vectors up to sign), eigenvalues, norm, get_corner, indexing,
   collapse_l / collapse_r, make_even, unsqueeze and scalar multiples.
2. On the same random GPT-2 weights, unprocessed and processed as TransformerLens'
   from_pretrained does, `model.OV` / `model.QK` and the full OV circuit
   W_E @ OV @ W_U (kept factored: never vocab x vocab) match HookedTransformer's
   within 1e-4.
3. Bad input is a one-line GPT2LabError.
"""

from __future__ import annotations

import pytest
import torch
from tl_reference import hooked_transformer

import gpt2lab as gl
from gpt2lab.errors import GPT2LabError
from gpt2lab.interp import FactoredMatrix

tl = pytest.importorskip("transformer_lens")
TLFactoredMatrix = tl.FactoredMatrix

# (A's shape, B's shape): not_square and not, leading dimensions on one side, on both, broadcast
# against a size-1 dimension or a missing one, and an inner dimension bigger than ldim / rdim
CASES = [
    ((5, 3), (3, 6)),
    ((7, 3), (3, 7)),
    ((4, 8, 2), (2, 8)),
    ((8, 2), (3, 2, 8)),
    ((2, 3, 6, 4), (3, 4, 6)),
    ((2, 1, 6, 4), (1, 3, 4, 6)),
    ((6, 9), (9, 6)),
    ((6, 9), (9, 5)),
]
SQUARE = [case for case in CASES if case[0][-2] == case[1][-1]]


def factors(case, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g, dtype=dtype) for shape in case)


def both(case, seed=0):
    A, B = factors(case, seed)
    return FactoredMatrix(A, B), TLFactoredMatrix(A, B)


def assert_rel(ours, ref, tol=1e-5):
    """|ours - ref| <= tol * max|ref| everywhere (relative to the tensor's scale)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = ref.abs().max().clamp_min(1e-30)
    err = (ours - ref).abs().max() / scale
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def assert_same_fm(ours, ref, tol=1e-5):
    """The same factorisation (shape, inner dimension, factors) and so the same product."""
    assert isinstance(ours, FactoredMatrix), type(ours)
    assert ours.shape == ref.shape and ours.mdim == ref.mdim
    assert_rel(ours.A, ref.A, tol)
    assert_rel(ours.B, ref.B, tol)
    assert_rel(ours.AB, ref.AB, tol)


def up_to_sign(ours, ref, dim=-2):
    """`ours` with each singular vector (columns, or rows for dim=-1) flipped to agree in
    sign with `ref`'s: singular vectors are defined up to sign."""
    sign = torch.sign((ours * ref).sum(dim, keepdim=True))
    return ours * sign


def assert_same_eigenvalues(ours, ref, tol=1e-5):
    """The same multiset of complex eigenvalues (each row of leading dimensions): matched
    greedily nearest-first, since conjugate pairs make a sort order fragile."""
    assert ours.shape == ref.shape and ours.is_complex() and ref.is_complex()
    scale = ref.abs().max().item()
    for mine, theirs in zip(
        ours.reshape(-1, ours.shape[-1]), ref.reshape(-1, ref.shape[-1]), strict=True
    ):
        left = theirs.tolist()
        for value in sorted(mine.tolist(), key=lambda z: (z.real, z.imag)):
            nearest = min(range(len(left)), key=lambda n: abs(left[n] - value))
            assert abs(left[nearest] - value) <= tol * scale, (value, left[nearest])
            left.pop(nearest)


# ---- 1. random factors --------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_shapes_products_and_transpose(case):
    fm, ref = both(case)
    assert fm.shape == ref.shape and isinstance(fm.shape, torch.Size)
    assert (fm.ndim, fm.ldim, fm.rdim, fm.mdim) == (ref.ndim, ref.ldim, ref.rdim, ref.mdim)
    assert fm.has_leading_dims == ref.has_leading_dims
    assert repr(fm) == repr(ref)
    A, B = fm.pair
    assert A.shape == ref.A.shape and B.shape == ref.B.shape  # broadcast to the full shape
    assert_rel(fm.AB, ref.AB)
    assert_rel(fm.AB, factors(case)[0] @ factors(case)[1])
    assert_same_fm(fm.T, ref.T)
    assert_rel(fm.T.AB, fm.AB.transpose(-2, -1))
    if fm.ldim == fm.rdim:
        assert_rel(fm.BA, ref.BA)


@pytest.mark.parametrize("case", CASES)
def test_svd_norm_and_collapses(case):
    fm, ref = both(case)
    U, S, V = fm.svd()
    rU, rS, rV = ref.svd()
    assert U.shape == rU.shape and S.shape == rS.shape and V.shape == rV.shape
    assert_rel(S, rS)
    assert torch.all(S[..., :-1] >= S[..., 1:])  # descending
    assert_rel(U @ torch.diag_embed(S) @ V.transpose(-2, -1), fm.AB)
    eye = torch.eye(S.shape[-1]).expand(*S.shape, S.shape[-1])
    assert_rel(U.transpose(-2, -1) @ U, eye)
    assert_rel(V.transpose(-2, -1) @ V, eye)
    assert_rel(up_to_sign(fm.U, rU), rU)  # random factors: distinct, nonzero singular values
    assert_rel(up_to_sign(fm.V, rV), rV)
    assert fm.S is S and fm.svd()[0] is U  # computed once per instance

    assert_rel(fm.norm(), ref.norm())
    assert_rel(fm.norm(), torch.linalg.matrix_norm(fm.AB))

    assert_rel(up_to_sign(fm.collapse_l(), ref.collapse_l(), dim=-1), ref.collapse_l())
    assert_rel(up_to_sign(fm.collapse_r(), ref.collapse_r()), ref.collapse_r())
    assert_rel(U @ fm.collapse_l(), fm.AB)
    assert_rel(fm.collapse_r() @ V.transpose(-2, -1), fm.AB)

    even, ref_even = fm.make_even(), ref.make_even()
    assert isinstance(even, FactoredMatrix) and even.shape == ref_even.shape
    assert even.mdim == ref_even.mdim
    assert_rel(up_to_sign(even.A, ref_even.A), ref_even.A)
    assert_rel(up_to_sign(even.B, ref_even.B, dim=-1), ref_even.B)
    assert_rel(even.AB, fm.AB)


def test_vh_is_v_as_in_transformer_lens():
    fm, ref = both(CASES[0])
    with pytest.warns(DeprecationWarning, match="use .V"):
        vh = fm.Vh
    with pytest.warns(DeprecationWarning):
        ref_vh = ref.Vh
    assert vh is fm.V and vh.shape == ref_vh.shape == (6, 3)


@pytest.mark.parametrize("case", SQUARE)
def test_eigenvalues(case):
    fm, ref = both(case)
    eig = fm.eigenvalues
    assert eig.shape == (*fm.shape[:-2], fm.mdim) and eig.is_complex()
    assert_same_eigenvalues(eig, ref.eigenvalues)
    # and they are A @ B's eigenvalues: its others are zero (when mdim < ldim)
    full = torch.linalg.eigvals(fm.AB.double())
    k = min(fm.mdim, fm.ldim)
    top = lambda e: torch.gather(e, -1, e.abs().argsort(-1, descending=True)[..., :k])  # noqa: E731
    assert_same_eigenvalues(top(eig.to(torch.complex128)), top(full), tol=1e-4)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_get_corner(case, k):
    fm, ref = both(case)
    corner = fm.get_corner(k)
    assert_rel(corner, ref.get_corner(k))
    assert torch.equal(corner, fm.get_corner(k))
    assert_rel(corner, fm.AB[tuple(slice(k) for _ in range(fm.ndim))])


@pytest.mark.parametrize("case", CASES)
def test_matmul_with_tensors_on_either_side(case):
    fm, ref = both(case)
    g = torch.Generator().manual_seed(1)
    lead = fm.shape[:-2]
    # thin and wide right / left operands: both of TransformerLens' branches (multiply
    # through the inner dimension, or form A @ B first), plain and with leading dims
    for n in (2, 11):
        for shape in [(fm.rdim, n), (*lead, fm.rdim, n), (1,) * len(lead) + (fm.rdim, n)]:
            right = torch.randn(shape, generator=g)
            assert_same_fm(fm @ right, ref @ right)
            assert_rel((fm @ right).AB, fm.AB @ right)
        for shape in [(n, fm.ldim), (*lead, n, fm.ldim)]:
            left = torch.randn(shape, generator=g)
            assert_same_fm(left @ fm, left @ ref)
            assert_rel((left @ fm).AB, left @ fm.AB)
    # vectors: a tensor, not a factored matrix
    v_r, v_l = torch.randn(fm.rdim, generator=g), torch.randn(fm.ldim, generator=g)
    assert_rel(fm @ v_r, ref @ v_r)
    assert_rel(fm @ v_r, fm.AB @ v_r)
    assert_rel(v_l @ fm, v_l @ ref)
    assert_rel(v_l @ fm, v_l @ fm.AB)


@pytest.mark.parametrize("case", CASES)
def test_matmul_of_factored_matrices(case):
    fm, ref = both(case)
    for seed, inner in [(2, 2), (3, 7)]:
        other_case = ((fm.rdim, inner), (inner, 5))
        other, ref_other = both(other_case, seed)
        assert_same_fm(fm @ other, ref @ ref_other)
        assert_rel((fm @ other).AB, fm.AB @ other.AB)
        assert_same_fm(other.T @ fm.T, ref_other.T @ ref.T)
        # __rmatmul__ directly (Python only calls it when the left side is not ours)
        left, ref_left = both(((5, inner), (inner, fm.ldim)), seed)
        assert_same_fm(fm.__rmatmul__(left), ref.__rmatmul__(ref_left))
        assert_rel(fm.__rmatmul__(left).AB, left.AB @ fm.AB)


def test_matmul_with_transformer_lens_factored_matrix_is_refused():
    fm, ref = both(CASES[0])
    with pytest.raises(GPT2LabError, match="expected a torch.Tensor or a FactoredMatrix"):
        fm @ ref.T


@pytest.mark.parametrize("case", CASES)
def test_scalar_multiply_and_unsqueeze(case):
    fm, ref = both(case)
    for scalar in (2.5, -3, torch.tensor(0.5), torch.tensor([[0.5]])):
        assert_same_fm(fm * scalar, ref * scalar)
        assert_same_fm(scalar * fm, scalar * ref)
    for k in range(fm.ndim - 1):
        assert_same_fm(fm.unsqueeze(k), ref.unsqueeze(k))
    assert_same_fm(fm.unsqueeze(-3), ref.unsqueeze(fm.ndim - 2))


INDICES = [
    (0,),
    (-1,),
    (slice(None), 1),
    (0, 1),
    (0, 1, 2),
    (0, 1, -1),
    (0, 1, slice(1, 4)),
    (0, 1, 2, 3),
    (0, 1, -1, -1),
    (0, 0, slice(None), torch.tensor([0, 2])),
    (None, 1),
]


@pytest.mark.parametrize("idx", INDICES, ids=repr)
def test_indexing(idx):
    fm, ref = both(((2, 3, 6, 4), (3, 4, 6)))
    assert_same_fm(fm[idx], ref[idx])
    if len(idx) == 1:  # fm[0] as well as fm[(0,)]
        assert_same_fm(fm[idx[0]], ref[idx[0]])


def test_indexing_rows_and_columns_of_a_plain_matrix():
    fm, ref = both(((7, 3), (3, 7)))
    for idx in [2, -1, slice(2, 5), (1, 4), (-1, -1), (slice(None), 3), (slice(None), -1)]:
        assert_same_fm(fm[idx], ref[idx])
    dense = fm.AB
    assert_rel(fm[2, 4].AB, dense[2:3, 4:5])
    assert_rel(fm[-1, -1].AB, dense[-1:, -1:])


def test_ellipsis_stands_for_the_dimensions_not_named():
    # TransformerLens has no rule for `...`; here it expands as in torch
    fm, _ = both(((2, 3, 6, 4), (3, 4, 6)))
    dense = fm.AB
    assert_rel(fm[..., 2, :].AB, dense[..., 2:3, :])
    assert_rel(fm[..., 1:3].AB, dense[..., 1:3])
    assert_rel(fm[1, ...].AB, dense[1])
    assert_rel(fm[1, ..., 0].AB, dense[1, ..., 0:1])
    assert fm[...].shape == fm.shape


def test_16_bit_factors_decompose_in_float32():
    A, B = factors(((6, 3), (3, 6)))
    fm16 = FactoredMatrix(A.to(torch.bfloat16), B.to(torch.bfloat16))
    ref = TLFactoredMatrix(A.to(torch.bfloat16).float(), B.to(torch.bfloat16).float())
    assert fm16.S.dtype == torch.float32
    assert_rel(fm16.S, ref.S)
    assert_rel(fm16.norm(), ref.norm())
    assert_same_eigenvalues(fm16.eigenvalues, ref.eigenvalues)


# ---- 2. the OV and QK circuits of the same GPT-2 in both libraries ------------------


@pytest.fixture(scope="module")
def circuits(small_ckpt):
    """{processed: (our model, TransformerLens' model of the same weights)}."""
    original = gl.load(small_ckpt)
    return {
        False: (original, hooked_transformer(original, processed=False)),
        True: (gl.load(small_ckpt, process=True), hooked_transformer(original, processed=True)),
    }


@pytest.mark.parametrize("processed", [False, True])
@pytest.mark.parametrize("name", ["OV", "QK"])
def test_ov_and_qk_match_transformer_lens(circuits, processed, name):
    model, ref_model = circuits[processed]
    cfg = model.cfg
    fm, ref = getattr(model, name), getattr(ref_model, name)
    assert isinstance(fm, FactoredMatrix)
    assert fm.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model)
    assert fm.mdim == cfg.d_head
    assert_same_fm(fm, ref, 1e-4)
    assert_rel(fm.S, ref.S, 1e-4)
    assert_rel(fm.norm(), ref.norm(), 1e-4)
    assert_same_eigenvalues(fm.eigenvalues, ref.eigenvalues, 1e-4)
    assert_rel(fm[1, 2].AB, ref[1, 2].AB, 1e-4)
    if name == "OV":  # per head, W_V @ W_O
        assert_rel(fm[1, 2].AB, model.W_V[1, 2] @ model.W_O[1, 2], 1e-5)
    else:
        assert_rel(fm[1, 2].AB, model.W_Q[1, 2] @ model.W_K[1, 2].T, 1e-5)


@pytest.mark.parametrize("processed", [False, True])
def test_full_ov_circuit_stays_factored(circuits, processed):
    model, ref_model = circuits[processed]
    cfg = model.cfg
    full = model.W_E @ model.OV @ model.W_U
    ref = ref_model.W_E @ ref_model.OV @ ref_model.W_U
    assert isinstance(full, FactoredMatrix)
    assert full.shape == (cfg.n_layers, cfg.n_heads, cfg.d_vocab, cfg.d_vocab)
    assert full.mdim == cfg.d_head  # vocab x d_head factors, never vocab x vocab
    assert full.A.shape == (cfg.n_layers, cfg.n_heads, cfg.d_vocab, cfg.d_head)
    assert full.B.shape == (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_vocab)
    assert_rel(full.A, ref.A, 1e-4)
    assert_rel(full.B, ref.B, 1e-4)
    assert_rel(full.get_corner(5), ref.get_corner(5), 1e-4)
    for layer, head, col in [(0, 0, 0), (1, 3, 50256), (1, 2, 1234)]:
        column = full[layer, head, :, col]
        assert column.shape == (cfg.d_vocab, 1)
        expected = model.W_E @ (model.OV[layer, head].AB @ model.W_U[:, col])
        assert_rel(column.AB[:, 0], ref[layer, head, :, col].AB[:, 0], 1e-4)
        assert_rel(column.AB[:, 0], expected, 1e-4)
    assert_rel(full.norm(), ref.norm(), 1e-4)
    assert_same_eigenvalues(full.eigenvalues, ref.eigenvalues, 1e-4)


# ---- 3. bad input -------------------------------------------------------------------


def raises_one_line(match, fn):
    with pytest.raises(GPT2LabError, match=match) as excinfo:
        fn()
    assert "\n" not in str(excinfo.value)


def test_bad_input_is_a_one_line_error():
    fm, _ = both(((2, 3, 6, 4), (3, 4, 6)))
    not_square = FactoredMatrix(*factors(((5, 3), (3, 6))))  # not not_square: ldim 5, rdim 6
    wide = FactoredMatrix(*factors(((4, 3), (3, 5))))
    A, B = factors(((5, 3), (3, 6)))
    inner = "inner dimensions differ"
    raises_one_line(inner, lambda: FactoredMatrix(A, A))
    raises_one_line(
        "do not broadcast", lambda: FactoredMatrix(torch.randn(2, 5, 3), torch.randn(3, 3, 6))
    )
    raises_one_line("at least 2 dimensions", lambda: FactoredMatrix(A, torch.randn(3)))
    raises_one_line("must be a torch.Tensor", lambda: FactoredMatrix(A.numpy(), B))
    raises_one_line("must match", lambda: FactoredMatrix(A, B.double()))
    raises_one_line(inner, lambda: fm @ torch.randn(4, 2))
    raises_one_line(inner, lambda: torch.randn(2, 4) @ fm)
    raises_one_line(inner, lambda: fm @ torch.randn(5))
    raises_one_line(inner, lambda: torch.randn(5) @ fm)
    raises_one_line(inner, lambda: fm @ wide)
    raises_one_line(inner, lambda: wide @ fm)
    raises_one_line("do not broadcast", lambda: fm @ torch.randn(4, 6, 6))
    raises_one_line("do not broadcast", lambda: torch.randn(4, 6, 6) @ fm)
    raises_one_line("scalar", lambda: fm @ torch.tensor(2.0))
    raises_one_line("expected a torch.Tensor", lambda: fm @ [[1.0]])
    raises_one_line("ldim == rdim", lambda: not_square.BA)
    raises_one_line("ldim == rdim", lambda: not_square.eigenvalues)
    raises_one_line("too many", lambda: fm[0, 0, 0, 0, 0])
    raises_one_line("too many", lambda: fm[..., 0, 0, 0, 0, 0])
    raises_one_line("at most one", lambda: fm[..., 0, ...])
    raises_one_line("None", lambda: fm[0, 0, 1, None])
    raises_one_line("leading dimensions", lambda: fm.unsqueeze(-1))
    raises_one_line("leading dimensions", lambda: fm.unsqueeze(3))
    raises_one_line("use @", lambda: fm * torch.randn(2))
    raises_one_line("use @", lambda: fm * not_square)
