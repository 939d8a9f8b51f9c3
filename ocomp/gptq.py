"""Error-feedback ternarization (GPTQ / OBQ style) of one layer, in pure numpy.

Plain ternarization rounds every weight of a row independently (`ternarize_optimal` in
passes/ternary.py minimizes ||w - alpha*t||). What matters is the layer's *output* on real
inputs X: ||X (W - Q)^T||^2 = sum over rows of (w - q)^T H (w - q) with H = X^T X. GPTQ
(Frantar et al. 2022) quantizes the columns of W one at a time and pushes each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian, so that
correlated inputs compensate each other. This module does that for ternary levels
{-alpha, 0, +alpha}, alternating the error-feedback pass with a closed-form least-squares
re-solve of the scales (per output row, or per group of consecutive input features).

The caller (the calibration engine) builds H from the layer's real inputs; this module only
does the math and knows nothing about graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Above this many multiply-adds (outputs * features^2) the products with H and the Cholesky
# factors run in float32 (as GPTQ does on GPUs); below it everything is float64. The scales
# are re-solved and the errors evaluated in float64 on small layers, so tests can compare them
# with an independent least-squares solve at tight tolerances.
FLOAT32_ABOVE = 2**31


@dataclass
class TernaryFit:
    """A ternarized weight matrix: W ~ alpha * ternary (per row, or per group of features)."""

    ternary: np.ndarray  # int8 (outputs, features), values in {-1, 0, +1}, original feature order
    alpha: np.ndarray  # float64 (outputs,) or (outputs, ceil(features / group_size))
    error: float  # ||(W - Q) X^T||^2 / ||W X^T||^2 of this fit
    error_rtn: float  # the same for plain per-row optimal ternarization (no feedback)
    error_rtn_group: float | None  # plain optimal ternarization per group; None without groups
    group_size: int | None
    permutation: np.ndarray  # the column order the feedback pass used (already undone above)
    passes: int  # error-feedback passes run
    chosen: str  # "rtn", "rtn group" or "feedback k": the candidate with the lowest error

    def dequantize(self) -> np.ndarray:
        """alpha * ternary as a float64 (outputs, features) matrix."""
        return self.ternary * _alpha_per_feature(self.alpha, self.ternary.shape[1], self.group_size)


def ternarize_error_feedback(weight: np.ndarray, hessian: np.ndarray, *, damp: float = 0.01,
                             group_size: int | None = None, block: int = 128, alternations: int = 2,
                             order: str = "act") -> TernaryFit:
    """Ternarize `weight` (outputs, features) to minimize the output error on inputs with Gram matrix `hessian`.

    `hessian` is H = X^T X (features, features) of the layer's inputs in the same feature order
    as the columns of `weight` (im2col order for a Conv). `damp` adds damp * mean(diag H) to the
    diagonal for the feedback pass (never for the scales or the reported errors). `group_size`
    gives one scale per that many consecutive input features of a row. `order`: "act" quantizes
    the columns in descending diag(H) (GPTQ's act-order), "natural" left to right.
    `alternations`: how many times the scales are re-solved and the feedback pass re-run.

    Candidates are the plain optimal ternarization and each feedback pass, every one with its
    scales re-solved by least squares for its ternary pattern; the one with the lowest output
    error is returned, so the result is never worse than plain rounding with solved scales.
    """
    if order not in ("act", "natural"):
        raise ValueError(f"order must be 'act' or 'natural', not {order!r}")
    w = np.array(weight, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64)
    if w.ndim != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"weight {w.shape} and hessian {h.shape} disagree: need (m, n) and (n, n)")
    outputs, features = w.shape
    if group_size is not None and not 1 <= group_size:
        raise ValueError(f"group_size must be >= 1, not {group_size}")
    if group_size is not None and group_size >= features:
        group_size = None  # one group per row is the per-row case
    h = (h + h.T) / 2
    dead = np.diag(h) <= 0
    w[:, dead] = 0.0  # no input ever reaches these weights: zero them, as GPTQ does
    dtype = np.float32 if outputs * features * features > FLOAT32_ABOVE else np.float64
    quad = _Quadratic(w, h, group_size, dtype)

    # Candidates: plain rounding (per row, and per group with groups) with least-squares scales.
    t_row, a_row = ternarize_rows(w, None)
    given = a_row if group_size is None else _regroup(a_row, features, group_size)
    best_a, best_err, error_rtn = quad.solve(t_row, given)
    best_t, chosen = t_row, "rtn"
    error_rtn_group = None
    t_start, alpha = t_row, a_row
    if group_size is not None:
        t_start, alpha = ternarize_rows(w, group_size)
        a_group, err_group, error_rtn_group = quad.solve(t_start, alpha)
        if err_group < best_err:
            best_t, best_a, best_err, chosen = t_start, a_group, err_group, "rtn group"

    # The feedback pass works on the damped Hessian, in the chosen column order.
    h_damped = h.copy()
    h_damped[dead, dead] = 1.0
    h_damped[np.diag_indices(features)] += damp * float(np.mean(np.diag(h_damped)))
    if order == "act":
        perm = np.argsort(-np.diag(h_damped), kind="stable")
    else:
        perm = np.arange(features)
    chol = _upper_cholesky_of_inverse(h_damped[np.ix_(perm, perm)].astype(dtype))
    del h_damped
    w_perm = w[:, perm].astype(dtype)

    passes = 0
    for k in range(alternations + 1):
        scale = _alpha_per_feature(alpha, features, group_size)[:, perm].astype(dtype)
        t = np.empty_like(t_start)
        t[:, perm] = _feedback_pass(w_perm, chol, scale, block)
        passes += 1
        alpha, err, _ = quad.solve(t)
        if err < best_err:
            best_t, best_a, best_err, chosen = t, alpha, err, f"feedback {k + 1}"
    return TernaryFit(ternary=best_t, alpha=best_a, error=best_err, error_rtn=error_rtn,
                      error_rtn_group=error_rtn_group, group_size=group_size, permutation=perm,
                      passes=passes, chosen=chosen)


def ternarize_rows(weight: np.ndarray, group_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Plain optimal ternarization, T and alpha minimizing ||w - alpha*T||^2 per row (or per group).

    For k nonzeros the best T keeps the k largest |w| with their signs and alpha is their mean,
    so the best k maximizes (cumsum_k)^2 / k (the same as passes/ternary.ternarize_optimal,
    which it reproduces for group_size=None). Returns int8 T (m, n) and alpha (m,) or (m, groups).
    """
    w = np.asarray(weight, dtype=np.float64)
    outputs, features = w.shape
    if group_size is None or group_size >= features:
        return _ternarize_optimal(w)
    groups = -(-features // group_size)
    padded = np.zeros((outputs, groups * group_size))
    padded[:, :features] = w
    t, a = _ternarize_optimal(padded.reshape(outputs * groups, group_size))
    return t.reshape(outputs, -1)[:, :features], a.reshape(outputs, groups)


def solve_scales(weight: np.ndarray, ternary: np.ndarray, hessian: np.ndarray,
                 group_size: int | None = None) -> np.ndarray:
    """Least-squares scales for a fixed ternary pattern: argmin over alpha of (w - q)^T H (w - q) per row.

    q_i = alpha_{g(i)} * t_i with g(i) = i // group_size (one alpha per row without groups).
    A group whose t is all zero gets alpha 0. Negative solutions are kept as they are (the
    feedback code flips the signs of T instead).
    """
    w = np.asarray(weight, dtype=np.float64)
    quad = _Quadratic(w, np.asarray(hessian, dtype=np.float64),
                      group_size if group_size is not None and group_size < w.shape[1] else None,
                      np.float64)
    alpha, _, _ = quad.solve(np.array(ternary), flip=False)
    return alpha


def output_error(weight: np.ndarray, quantized: np.ndarray, hessian: np.ndarray) -> float:
    """Relative output error tr((W-Q) H (W-Q)^T) / tr(W H W^T) = ||(W-Q)X^T||^2 / ||W X^T||^2."""
    w = np.asarray(weight, dtype=np.float64)
    e = w - np.asarray(quantized, dtype=np.float64)
    h = np.asarray(hessian, dtype=np.float64)
    total = float(np.sum((w @ h) * w))
    return float(np.sum((e @ h) * e)) / total if total > 0 else 0.0


# ---------------------------------------------------------------- internals


def _ternarize_optimal(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, n = w.shape
    mag = np.abs(w)
    order = np.argsort(-mag, axis=1, kind="stable")
    cumsum = np.cumsum(np.take_along_axis(mag, order, axis=1), axis=1)
    best = np.argmax(cumsum**2 / np.arange(1, n + 1), axis=1)
    alpha = cumsum[np.arange(rows), best] / (best + 1)
    keep_sorted = (np.arange(n)[None, :] <= best[:, None]) & (alpha > 0)[:, None]
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    return np.where(keep, np.sign(w), 0).astype(np.int8), alpha


def _alpha_per_feature(alpha: np.ndarray, features: int, group_size: int | None) -> np.ndarray:
    if alpha.ndim == 1:
        return np.repeat(alpha[:, None], features, axis=1)
    return np.repeat(alpha, group_size, axis=1)[:, :features]


def _regroup(alpha_row: np.ndarray, features: int, group_size: int) -> np.ndarray:
    """Per-row scales as per-group scales (the same value in every group of a row)."""
    return np.repeat(alpha_row[:, None], -(-features // group_size), axis=1)


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """Upper triangular U with U^T U = h^-1 (GPTQ's Hinv factor), without forming h^-1.

    With the reversal J, chol(J h J) = L gives h = R R^T for the upper R = J L J, so
    h^-1 = R^-T R^-1 and U = R^-1 (upper): one Cholesky and one triangular inverse.
    """
    lower = np.linalg.cholesky(h[::-1, ::-1])
    return _inverse_upper(np.ascontiguousarray(lower[::-1, ::-1]))


def _inverse_upper(r: np.ndarray, leaf: int = 256) -> np.ndarray:
    """Inverse of an upper triangular matrix by blocks: inv([[A, B], [0, C]]) = [[A^-1, -A^-1 B C^-1], [0, C^-1]]."""
    n = r.shape[0]
    if n <= leaf:
        return np.triu(np.linalg.solve(r, np.eye(n, dtype=r.dtype)))
    half = n // 2
    a_inv = _inverse_upper(r[:half, :half], leaf)
    c_inv = _inverse_upper(r[half:, half:], leaf)
    out = np.zeros_like(r)
    out[:half, :half] = a_inv
    out[half:, half:] = c_inv
    out[:half, half:] = -(a_inv @ r[:half, half:]) @ c_inv
    return out


def _feedback_pass(w: np.ndarray, chol: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    """One GPTQ pass: round column j to the nearest of {-s, 0, +s} (s = scale[:, j]) and push
    the error (w_j - q_j) / U_jj along row j of U onto the later columns, lazily by blocks.

    All arrays are in the pass's column order; returns T (int8). Vectorized over rows; works on
    the transposes so that a column of W is a contiguous vector.
    """
    wt = np.array(w.T, order="C")
    st = np.ascontiguousarray(scale.T)
    features, outputs = wt.shape
    tt = np.zeros((features, outputs), dtype=wt.dtype)
    half = st / 2
    for start in range(0, features, block):
        stop = min(start + block, features)
        w_block = wt[start:stop]  # a view: updated in place
        err_block = np.empty_like(w_block)
        u_block = chol[start:stop, start:stop]
        for i in range(stop - start):
            col = w_block[i]
            j = start + i
            ti = np.sign(col) * (np.abs(col) > half[j])
            tt[j] = ti
            err = (col - st[j] * ti) / u_block[i, i]
            err_block[i] = err
            if i + 1 < stop - start:
                w_block[i + 1:] -= u_block[i, i + 1:, None] * err[None, :]
        if stop < features:
            wt[stop:] -= chol[start:stop, stop:].T @ err_block
    return tt.T.astype(np.int8)


class _Quadratic:
    """The output-error quadratic (w - q)^T H (w - q) of every row, with W H cached.

    One product of T with H gives, for a ternary pattern T, both the least-squares scales and
    the errors: with b = S^T H w and M = S^T H S (S: t split by groups), the error at scales a
    is w^T H w - 2 a^T b + a^T M a, the least-squares a solves M a = b, and its error is
    w^T H w - a^T b.
    """

    def __init__(self, w: np.ndarray, h: np.ndarray, group_size: int | None, dtype) -> None:
        self.h = h.astype(dtype)
        self.group_size = group_size
        self.wh = (w.astype(dtype) @ self.h).astype(np.float64)
        self.whw = np.sum(self.wh * w, axis=1)
        self.total = float(self.whw.sum())

    def relative(self, row_errors: np.ndarray) -> float:
        return float(np.maximum(row_errors, 0).sum()) / self.total if self.total > 0 else 0.0

    def solve(self, t: np.ndarray, given: np.ndarray | None = None,
              flip: bool = True) -> tuple[np.ndarray, float, float | None]:
        """Least-squares alpha for T, the relative error at it and (if `given` scales are passed,
        shaped like alpha) the relative error at those. With `flip`, groups with a negative
        solution have their T negated in place so that alpha >= 0."""
        outputs, features = t.shape
        size = self.group_size or min(features, 256)
        gram, b = self._block_gram(t, size)
        if self.group_size is None:
            m = gram.sum(axis=(1, 2))
            b = b.sum(axis=1)
            alpha = np.where(m > 0, b / np.where(m > 0, m, 1.0), 0.0)
            residual = self.whw - alpha * b
            at_given = None if given is None else self.whw - 2 * given * b + given**2 * m
        else:
            alpha, residual, at_given = self._solve_groups(t, gram, b, given)
        if flip:
            negative = alpha < 0
            if negative.any():
                sign = np.where(negative, -1, 1).astype(np.int8)
                t *= _alpha_per_feature(sign, features, self.group_size).astype(np.int8)
                alpha = np.abs(alpha)
        return alpha, self.relative(residual), None if at_given is None else self.relative(at_given)

    def _block_gram(self, t: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """gram[r, k, g] = t_rk^T H_kg t_rg and b[r, k] = t_rk^T (H w_r)_k over blocks of `size`
        consecutive features; the upper block triangle only is multiplied (H is symmetric)."""
        outputs, features = t.shape
        blocks = -(-features // size)
        tf = t.astype(self.h.dtype)
        gram = np.zeros((outputs, blocks, blocks))
        b = np.zeros((outputs, blocks))
        for k in range(blocks):
            k0, k1 = k * size, min((k + 1) * size, features)
            b[:, k] = np.sum(t[:, k0:k1] * self.wh[:, k0:k1], axis=1)
            q = tf[:, k0:k1] @ self.h[k0:k1, k0:]  # (outputs, features - k0)
            q *= tf[:, k0:]
            width = features - k0
            full = (width // size) * size
            row = np.empty((outputs, blocks - k))
            row[:, :width // size] = q[:, :full].reshape(outputs, -1, size).sum(axis=2)
            if full < width:
                row[:, -1] = q[:, full:].sum(axis=1)
            gram[:, k, k:] = row
            gram[:, k + 1:, k] = row[:, 1:]
        return gram, b

    def _solve_groups(self, t: np.ndarray, gram: np.ndarray, b: np.ndarray, given: np.ndarray | None):
        outputs, features = t.shape
        size = self.group_size
        groups = gram.shape[1]
        at_given = None
        if given is not None:
            at_given = self.whw - 2 * np.sum(given * b, axis=1) + np.einsum("rk,rkg,rg->r", given, gram, given)
        # A group with no nonzero gets alpha 0 (an identity row keeps M invertible).
        padded = np.zeros((outputs, groups * size), dtype=bool)
        padded[:, :features] = t != 0
        empty = ~padded.reshape(outputs, groups, size).any(axis=2)
        m = gram.copy()
        bc = b.copy()
        rows, cols = np.nonzero(empty)
        m[rows, cols, :] = 0.0
        m[rows, :, cols] = 0.0
        m[rows, cols, cols] = 1.0
        bc[empty] = 0.0
        try:
            alpha = np.linalg.solve(m, bc[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            alpha = np.stack([np.linalg.lstsq(mi, bi, rcond=None)[0] for mi, bi in zip(m, bc)])
        residual = self.whw - np.sum(alpha * bc, axis=1)
        return alpha, residual, at_given
