"""Robust symmetric eigendecompositions of Kronecker factors, and the EKFAC scale estimate.

``torch.linalg.eigh`` can fail to converge, or return non-finite values, on float32 factors that are low-rank or
badly scaled. :func:`robust_eigh` symmetrizes, tries the factor's own precision, retries in float64, clamps the
tiny negative eigenvalues that rounding produces, and returns ``None`` instead of raising so that the caller can
keep its last good basis (docs/DESIGN.md, section 7).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def robust_eigh(matrix: Tensor) -> tuple[Tensor, Tensor] | None:
    """Eigenvalues (ascending, clamped at 0) and eigenvectors of a symmetric PSD matrix, or ``None``.

    Args:
        matrix: ``(d, d)`` symmetric positive semi-definite matrix (a Kronecker factor).

    Returns:
        ``(eigenvalues (d,), eigenvectors (d, d))`` in ``matrix.dtype``, such that
        ``eigenvectors @ diag(eigenvalues) @ eigenvectors.T`` reconstructs the matrix; ``None`` when the input
        is not finite or both the native and the float64 decompositions failed.
    """
    symmetric = 0.5 * (matrix + matrix.transpose(0, 1))
    if not bool(torch.isfinite(symmetric).all()):
        return None
    # Coordinates whose row and column are all zero (an input that was never nonzero: one-hot categories not seen
    # yet) are eigenvectors with eigenvalue 0, and the rest decomposes alone. Left in, hundreds of repeated zero
    # eigenvalues can make LAPACK's eigh fail to converge in float32 and float64 alike (a 501 x 501 factor of
    # Taxi's one-hot observations with 34 categories seen).
    zero = (symmetric == 0).all(dim=1)
    if bool(zero.any()):
        return _eigh_with_zero_coordinates(symmetric, zero, matrix.dtype)
    return _eigh_attempts(symmetric, matrix.dtype)


def _eigh_attempts(symmetric: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """``torch.linalg.eigh`` in the matrix's own precision, then in float64; ``None`` when both fail."""
    dtypes = [symmetric.dtype] if symmetric.dtype == torch.float64 else [symmetric.dtype, torch.float64]
    for attempt in dtypes:
        try:
            values, vectors = torch.linalg.eigh(symmetric.to(attempt))
        except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
            continue
        if bool(torch.isfinite(values).all()) and bool(torch.isfinite(vectors).all()):
            return values.clamp_min(0).to(dtype), vectors.to(dtype)
    return None


def _eigh_with_zero_coordinates(symmetric: Tensor, zero: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """The eigendecomposition of a symmetric matrix whose rows (and columns) flagged by ``zero`` vanish: unit vectors
    with eigenvalue 0 for those, first (ascending order), then the decomposition of the remaining block."""
    d = symmetric.shape[0]
    inactive, active = zero.nonzero().squeeze(1), (~zero).nonzero().squeeze(1)
    values = torch.zeros(d, dtype=dtype, device=symmetric.device)
    vectors = torch.zeros(d, d, dtype=dtype, device=symmetric.device)
    vectors[inactive, torch.arange(len(inactive), device=symmetric.device)] = 1
    if len(active):
        block = _eigh_attempts(symmetric[active][:, active], dtype)
        if block is None:
            return None
        columns = torch.arange(len(inactive), d, device=symmetric.device)
        values[len(inactive) :] = block[0]
        vectors[active.unsqueeze(1), columns.unsqueeze(0)] = block[1]
    return values, vectors


def kfe_scale(activations: Tensor, grads: Tensor, basis_a: Tensor, basis_g: Tensor) -> Tensor:
    """Sum over examples of the squared per-example gradient in the Kronecker-factored eigenbasis.

    The per-example gradient of example n is ``grad_n = sum_t g_{n,t} a_{n,t}^T``; in the KFE it is
    ``U_G^T grad_n U_A``. This returns ``sum_n (U_G^T grad_n U_A)**2`` (elementwise), shape ``(out, in)``;
    dividing by the number of examples gives the EKFAC scale (George et al. 2018, eq. 11).

    Args:
        activations: ``(N, T, in)`` homogeneous layer inputs.
        grads: ``(N, T, out)`` per-example output gradients (already scaled to per-example losses).
        basis_a: ``(in, in)`` eigenvectors of A.
        basis_g: ``(out, out)`` eigenvectors of G.
    """
    n, t, d_in = activations.shape
    d_out = grads.shape[-1]
    if t == 1:
        # grad_n is rank one, g_n a_n^T: its KFE square is (g_n U_G)^2 outer (a_n U_A)^2, so the sum over
        # examples is one matrix product and no per-example matrix is ever formed.
        grads_kfe = grads.reshape(n, d_out) @ basis_g
        acts_kfe = activations.reshape(n, d_in) @ basis_a
        return grads_kfe.square().transpose(0, 1) @ acts_kfe.square()
    # Per-example (out, in) matrices, in chunks of examples to bound memory at about 2**24 elements. Two orders of
    # the same products: rotate the T rows of each example first (T (in^2 + out^2) multiply-adds per example), or
    # form the per-example gradient first and rotate it (out in (in + out)); the cheaper one is taken (the second
    # wins for early convolutions, whose many locations meet few channels).
    rotate_rows = t * (d_in * d_in + d_out * d_out) <= d_out * d_in * (d_in + d_out)
    if rotate_rows:
        grads, activations = grads @ basis_g, activations @ basis_a
    chunk = max(1, (1 << 24) // max(1, d_out * d_in))
    total = activations.new_zeros(d_out, d_in)
    for start in range(0, n, chunk):
        per_example = torch.bmm(grads[start : start + chunk].transpose(1, 2), activations[start : start + chunk])
        if not rotate_rows:
            per_example = basis_g.transpose(0, 1) @ per_example @ basis_a
        total += per_example.square().sum(0)
    return total


def warm_eigh(
    matrix: Tensor, values: Tensor, vectors: Tensor, iterations: int = 1
) -> tuple[Tensor, Tensor, float] | None:
    """Refresh an eigenbasis of a slowly moving symmetric PSD matrix without a full eigendecomposition.

    Starting from the previous basis ``vectors``, ``iterations`` steps of subspace (power) iteration with a QR,
    ``Q <- qr(matrix @ Q)``, rotate it toward the matrix's current eigenvectors; the eigenvalues are estimated as the
    diagonal of ``Q^T matrix Q`` (the refresh SOAP, Vyas et al. 2024, and Eschenhagen et al. 2025 use for Shampoo's
    factors). The QR runs on the columns sorted by the previous eigenvalues ``values``, largest first (as subspace
    iteration needs: each column is orthogonalized against the more dominant ones), and the columns are returned in
    their previous order (so that an EKFAC scale indexed by them still applies). The drift returned is the
    off-diagonal mass ``||offdiag(Q^T M Q)||_F / ||Q^T M Q||_F``: 0 when ``Q`` diagonalizes the matrix exactly, the
    caller's criterion for falling back to :func:`robust_eigh`.

    Returns:
        ``(eigenvalues (d,), eigenvectors (d, d), drift)``, or ``None`` for a non-finite input or result.
    """
    symmetric = 0.5 * (matrix + matrix.transpose(0, 1))
    if not bool(torch.isfinite(symmetric).all()):
        return None
    order = torch.argsort(values, descending=True)
    basis = vectors.to(symmetric.dtype)[:, order]
    for _ in range(iterations):
        basis, _ = torch.linalg.qr(symmetric @ basis)
    basis = basis[:, torch.argsort(order)]
    projected = basis.transpose(0, 1) @ symmetric @ basis
    diagonal = projected.diagonal()
    total = torch.linalg.matrix_norm(projected)
    off_diagonal = torch.sqrt((total.square() - diagonal.square().sum()).clamp_min(0))
    drift = float(off_diagonal / total.clamp_min(torch.finfo(total.dtype).tiny))
    if not (bool(torch.isfinite(basis).all()) and math.isfinite(drift)):
        return None
    return diagonal.clamp_min(0), basis, drift
