"""Low-rank matrices kept as a product of two factors, A @ B (TransformerLens' FactoredMatrix).

Each attention head reads and writes the residual stream through a d_head bottleneck:
its OV circuit W_V @ W_O and its QK circuit W_Q @ W_K^T are [d_model, d_model] matrices
of rank at most d_head. Chaining them with the embedding and unembedding gives
[d_vocab, d_vocab] matrices (the "full OV circuit" W_E @ OV @ W_U) that are too big to
write down for every head, yet have rank d_head. `FactoredMatrix` keeps such a product
as its two factors, so that

* products with tensors or other factored matrices stay factored (only the thin side
  is multiplied out), so a vocab x vocab circuit costs vocab x d_head memory;
* the SVD, the Frobenius norm and the eigenvalues come from small matrices: the SVD
  from the factors' SVDs and a [rank, rank] core, the nonzero eigenvalues of A @ B from
  B @ A ([mdim, mdim]);
* any leading dimensions (layers, heads) broadcast like torch's batched matmul, and
  indexing picks layers / heads (and rows / columns) without forming the product.

The semantics are TransformerLens 3.x's (`transformer_lens.FactoredMatrix`), so
notebooks port; the tests compare every operation with it. Where TransformerLens raises
an AssertionError or a torch error on bad input, this raises a one-line GPT2LabError.

    OV = model.OV                        # [n_layers, n_heads, d_model, d_model]
    OV[3, 7].S                           # singular values of layer 3, head 7
    full = model.W_E @ OV @ model.W_U    # [n_layers, n_heads, d_vocab, d_vocab], factored
    full[0, 1].get_corner(5)             # a 5 x 5 corner, computed from the factors
"""

from __future__ import annotations

import warnings
from functools import cached_property
from numbers import Number
from typing import Any

import torch

from ..errors import GPT2LabError

_HALF = (torch.float16, torch.bfloat16)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _mT(t: torch.Tensor) -> torch.Tensor:
    """The last two dimensions swapped: the batched matrix transpose."""
    return t.transpose(-2, -1)


def _broadcast(left: tuple[int, ...], right: tuple[int, ...], what: str) -> torch.Size:
    """The broadcast of two leading shapes, or a GPT2LabError saying which operation failed."""
    try:
        return torch.broadcast_shapes(left, right)
    except RuntimeError:
        raise GPT2LabError(
            f"{what}: leading dimensions {left} and {right} do not broadcast"
        ) from None


def _for_linalg(t: torch.Tensor) -> torch.Tensor:
    """torch.linalg's SVD and eig have no 16-bit kernels: compute those in float32."""
    return t.float() if t.dtype in _HALF else t


class FactoredMatrix:
    """The matrix A @ B, of shape [*leading, ldim, rdim], kept as A [*leading, ldim, mdim]
    and B [*leading, mdim, rdim].

    A and B's leading dimensions broadcast against each other (as views, no copies), so
    `A` and `B` always have the full leading shape. `mdim` is the inner ("hidden")
    dimension: the product has rank at most mdim, and everything here costs about
    ldim x mdim + mdim x rdim per matrix rather than ldim x rdim.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        for name, t in (("A", A), ("B", B)):
            if not isinstance(t, torch.Tensor):
                raise GPT2LabError(
                    f"FactoredMatrix: {name} must be a torch.Tensor, got {type(t).__name__}"
                )
            if t.ndim < 2:
                raise GPT2LabError(
                    f"FactoredMatrix: {name} must be a matrix (at least 2 dimensions), "
                    f"got shape {_shape(t)}"
                )
        if A.shape[-1] != B.shape[-2]:
            raise GPT2LabError(
                f"FactoredMatrix: inner dimensions differ: A {_shape(A)} has {A.shape[-1]} "
                f"columns, B {_shape(B)} has {B.shape[-2]} rows"
            )
        if A.dtype != B.dtype or A.device != B.device:
            raise GPT2LabError(
                f"FactoredMatrix: A is {A.dtype} on {A.device}, B is {B.dtype} on {B.device}; "
                "they must match"
            )
        self.ldim = A.shape[-2]
        self.mdim = A.shape[-1]
        self.rdim = B.shape[-1]
        self.has_leading_dims = A.ndim > 2 or B.ndim > 2
        leading = _broadcast(_shape(A)[:-2], _shape(B)[:-2], "FactoredMatrix")
        self.shape = torch.Size((*leading, self.ldim, self.rdim))
        self.A = A.broadcast_to((*leading, self.ldim, self.mdim))
        self.B = B.broadcast_to((*leading, self.mdim, self.rdim))

    # ---- shape -------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors (A, B), broadcast to the full leading shape."""
        return self.A, self.B

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"

    # ---- products ----------------------------------------------------------------
    def __matmul__(self, other: Any) -> FactoredMatrix | torch.Tensor:
        """self @ other. With a matrix the result stays factored, and the cheaper side is
        multiplied out: if rdim > mdim, A @ (B @ other) (the new inner dimension is mdim);
        otherwise (A @ B) @ other, whose inner dimension, rdim, is no bigger. With a
        vector (1-D) the result is a tensor [*leading, ldim], computed right to left."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        other = self._operand(other, "FactoredMatrix @ tensor")
        if other.ndim == 1:
            self._check_inner(self.rdim, other.shape[0], other, "FactoredMatrix @ vector")
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        self._check_inner(self.rdim, other.shape[-2], other, "FactoredMatrix @ tensor")
        _broadcast(_shape(self.B)[:-2], _shape(other)[:-2], "FactoredMatrix @ tensor")
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Any) -> FactoredMatrix | torch.Tensor:
        """other @ self, the mirror of __matmul__: (other @ A) @ B stays factored with
        inner dimension mdim when ldim > mdim, otherwise other @ (A @ B); a vector (1-D)
        on the left gives a tensor [*leading, rdim]."""
        if isinstance(other, FactoredMatrix):
            return other.A @ (other.B @ self)
        other = self._operand(other, "tensor @ FactoredMatrix")
        if other.ndim == 1:
            self._check_inner(self.ldim, other.shape[0], other, "vector @ FactoredMatrix")
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        self._check_inner(self.ldim, other.shape[-1], other, "tensor @ FactoredMatrix")
        _broadcast(_shape(other)[:-2], _shape(self.A)[:-2], "tensor @ FactoredMatrix")
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def _operand(self, other: Any, what: str) -> torch.Tensor:
        if not isinstance(other, torch.Tensor):
            raise GPT2LabError(
                f"{what}: expected a torch.Tensor or a FactoredMatrix, got {type(other).__name__}"
            )
        if other.ndim == 0:
            raise GPT2LabError(f"{what}: a 0-d tensor is a scalar; multiply it with *, not @")
        return other

    def _check_inner(self, mine: int, theirs: int, other: torch.Tensor, what: str) -> None:
        if mine != theirs:
            raise GPT2LabError(
                f"{what}: inner dimensions differ: FactoredMatrix {tuple(self.shape)} "
                f"needs {mine}, tensor {_shape(other)} has {theirs}"
            )

    def __mul__(self, scalar: Any) -> FactoredMatrix:
        """A scalar times the matrix: (c A) @ B, so only A is scaled."""
        if isinstance(scalar, torch.Tensor):
            if scalar.numel() != 1:
                raise GPT2LabError(
                    f"FactoredMatrix * tensor: only a scalar (one element) can multiply, got "
                    f"shape {_shape(scalar)}; use @ for matrix products"
                )
            scalar = scalar.reshape(())  # a [1, 1, 1] tensor must not add dimensions to A
        elif not isinstance(scalar, Number) or isinstance(scalar, bool):
            raise GPT2LabError(
                f"FactoredMatrix * {type(scalar).__name__}: only a number or a one-element "
                "tensor can multiply; use @ for matrix products"
            )
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    @property
    def AB(self) -> torch.Tensor:
        """The product A @ B itself, [*leading, ldim, rdim]: possibly very large."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        """The reverse product B @ A, [*leading, mdim, mdim] (square matrices only). It has
        the same nonzero eigenvalues as A @ B."""
        self._check_square("BA")
        return self.B @ self.A

    def _check_square(self, what: str) -> None:
        if self.ldim != self.rdim:
            raise GPT2LabError(
                f"FactoredMatrix.{what} needs a square matrix (ldim == rdim), shape is "
                f"{tuple(self.shape)}"
            )

    @property
    def T(self) -> FactoredMatrix:
        """The transpose, (A @ B)^T = B^T @ A^T, still factored."""
        return FactoredMatrix(_mT(self.B), _mT(self.A))

    # ---- decompositions ----------------------------------------------------------
    @cached_property
    def _svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # A @ B = Ua Sa Va^T Ub Sb Vb^T. The core Sa Va^T Ub Sb is small ([rank A, rank B]);
        # its SVD Um Sm Vm^T gives A @ B = (Ua Um) Sm (Vb Vm)^T, and Ua Um, Vb Vm keep
        # orthonormal columns. Cached on the instance (the factors are not meant to change).
        A, B = _for_linalg(self.A), _for_linalg(self.B)
        Ua, Sa, Vha = torch.linalg.svd(A, full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(B, full_matrices=False)
        core = Sa[..., :, None] * (Vha @ Ub) * Sb[..., None, :]
        Um, Sm, Vhm = torch.linalg.svd(core, full_matrices=False)
        return Ua @ Um, Sm, _mT(Vhb) @ _mT(Vhm)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, S, V) with A @ B == U @ diag(S) @ V^T, as TransformerLens returns it: V, not
        Vh. U is [*leading, ldim, k], S [*leading, k] (descending), V [*leading, rdim, k],
        with k = min(ldim, mdim, rdim) (when mdim is the smallest, the rank bound).
        16-bit factors are decomposed in float32, and the results are float32."""
        return self._svd

    @property
    def U(self) -> torch.Tensor:
        """Left singular vectors, [*leading, ldim, k]."""
        return self.svd()[0]

    @property
    def S(self) -> torch.Tensor:
        """Singular values, [*leading, k], descending."""
        return self.svd()[1]

    @property
    def V(self) -> torch.Tensor:
        """Right singular vectors as columns, [*leading, rdim, k]: A @ B == U diag(S) V^T."""
        return self.svd()[2]

    @property
    def Vh(self) -> torch.Tensor:
        """V, not its transpose: TransformerLens' historical name, kept so notebooks that
        use `.Vh` get what they got there. Warns (DeprecationWarning, as TransformerLens
        3.x does); use `.V`, or `.V.transpose(-2, -1)` for the real Vh."""
        warnings.warn(
            "FactoredMatrix.Vh returns V (right singular vectors as columns), as in "
            "TransformerLens; use .V, or .V.transpose(-2, -1) for the conjugate transpose",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.svd()[2]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """The eigenvalues of B @ A, complex, [*leading, mdim]: the nonzero eigenvalues of
        A @ B, from an mdim x mdim matrix (if B A v = k v, then A B (A v) = k (A v)); A @ B's
        other ldim - mdim eigenvalues are zero. Unsorted, as torch.linalg.eig returns them.
        16-bit factors are multiplied and decomposed in float32 (TransformerLens forms B @ A
        in 16 bits first, then casts)."""
        self._check_square("eigenvalues")
        return torch.linalg.eig(_for_linalg(self.B) @ _for_linalg(self.A)).eigenvalues

    def norm(self) -> torch.Tensor:
        """The Frobenius norm of A @ B, [*leading]: sqrt of the sum of squared singular
        values, so the product is never formed."""
        return self.S.pow(2).sum(-1).sqrt()

    def make_even(self) -> FactoredMatrix:
        """The same matrix factored as (U sqrt(S)) @ (sqrt(S) V^T): both factors carry
        half the scale and have orthogonal columns / rows, with inner dimension k."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * _mT(self.V))

    def collapse_l(self) -> torch.Tensor:
        """diag(S) V^T, [*leading, k, rdim]: the matrix with its left orthogonal factor U
        dropped (A @ B == U @ collapse_l())."""
        return self.S[..., :, None] * _mT(self.V)

    def collapse_r(self) -> torch.Tensor:
        """U diag(S), [*leading, ldim, k]: the matrix with its right orthogonal factor
        dropped (A @ B == collapse_r() @ V^T)."""
        return self.U * self.S[..., None, :]

    # ---- views -------------------------------------------------------------------
    def get_corner(self, k: int = 3) -> torch.Tensor:
        """The product's first k entries along every dimension (leading ones too, as in
        TransformerLens), computed from A's first k rows and B's first k columns only."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(k) for _ in range(corner.ndim))]

    def unsqueeze(self, k: int) -> FactoredMatrix:
        """A new leading dimension of size 1 at position k (of the result's dimensions);
        k must land among the leading dimensions, not between rows and columns."""
        pos = k if k >= 0 else k + self.ndim + 1
        if not 0 <= pos <= self.ndim - 2:
            raise GPT2LabError(
                f"FactoredMatrix.unsqueeze({k}): a new dimension must go among the leading "
                f"dimensions (0..{self.ndim - 2}, or {-self.ndim - 1}..-3) of a matrix of "
                f"shape {tuple(self.shape)}"
            )
        return FactoredMatrix(self.A.unsqueeze(pos), self.B.unsqueeze(pos))

    def __getitem__(self, idx: Any) -> FactoredMatrix:
        """Index the leading dimensions, then optionally rows, then columns:
        `fm[layer]`, `fm[layer, head]`, `fm[layer, head, rows]`, `fm[layer, head, :, cols]`.
        An integer row or column index keeps its dimension (size 1), since the result is
        still a matrix. `...` stands for the dimensions not named; `None` (a new leading
        axis) may appear among the leading indices only."""
        idx = list(idx) if isinstance(idx, tuple) else [idx]
        if sum(i is Ellipsis for i in idx) > 1:
            raise GPT2LabError("FactoredMatrix index: at most one '...'")
        named = sum(i is not None and i is not Ellipsis for i in idx)
        if named > self.ndim:
            raise GPT2LabError(
                f"FactoredMatrix index {tuple(idx)} has {named} entries, too many for shape "
                f"{tuple(self.shape)}"
            )
        if Ellipsis in idx:
            at = next(n for n, i in enumerate(idx) if i is Ellipsis)
            idx[at : at + 1] = [slice(None)] * (self.ndim - named)
        lead_count = self.ndim - 2
        leading: list[Any] = []
        rows: Any = slice(None)
        cols: Any = slice(None)
        seen = 0
        for i in idx:
            if i is None:
                if seen >= lead_count:
                    raise GPT2LabError(
                        "FactoredMatrix index: None (a new axis) can only go among the leading "
                        f"dimensions of shape {tuple(self.shape)}"
                    )
                leading.append(i)
                continue
            if seen < lead_count:
                leading.append(i)
            elif seen == lead_count:
                rows = _keep_dim(i)
            else:
                cols = _keep_dim(i)
            seen += 1
        every = slice(None)
        return FactoredMatrix(self.A[(*leading, rows, every)], self.B[(*leading, every, cols)])


def _keep_dim(i: Any) -> Any:
    """An integer row / column index as a one-element slice, so the dimension stays
    (-1 becomes slice(-1, None): slice(-1, 0) would be empty)."""
    if isinstance(i, int) and not isinstance(i, bool):
        return slice(i, i + 1 if i != -1 else None)
    return i
