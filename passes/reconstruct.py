"""Least-squares layer reconstruction (feature-map reconstruction: ThiNet, Luo et al. 2017; He et al. 2017).

A layer whose input channels were pruned, or a ternary op, gets the weights W (and bias b) that make its
output on the *current* input X (im2col of a Conv's input; already pruned and repaired upstream) closest to
the original model's output Y at the same tensor:

    [W; b] = argmin ||X W + b - Y||^2 + lambda ||W - W0||^2,   lambda = RIDGE * mean(diag(X^T X)),

solved from X^T X and X^T Y (for a depthwise conv, whose output channels each see only their own input
channel, one such system a channel: `ChannelEquations`). The ridge term pulls towards the layer's current
(pruned) weights W0 rather than towards zero: when the removed channels were dead, W0 fits exactly and is
kept exactly, whatever lambda; the bias is not regularized.

Ternary ops are fitted the same way in float; the fitted W is then ternarized again for the layer's output
error on the calibration inputs, ||X (W - alpha T)||^2: T starts from GPTQ-style error feedback
(ocomp/gptq.py; or from the exact least-squares ternarization of each row, passes/ternary.py) and is
improved by coordinate descent over the codes (`descend_codes`); with T fixed, each channel's alpha and bias
are solved exactly from the same sums (a 2x2 system a channel). A re-fit that would not lower the layer's
error on the calibration data is not applied.

Output heads (`output_heads`): a float layer whose output reaches a graph output through shape ops only
(Transpose, Reshape, Concat, ...) is not re-fitted for what changed upstream, only bias-corrected, unless it
is a dense head: one with many positions a sample (a detector's anchor scores). There a sample's decision
rests on its few top positions, while a mean-matching repair (or a plain least-squares fit) is dominated by
the many background ones: on BlazeFace (ternary + bnrecal) the mean/std bias correction of the score heads
left faces found at 23% (decision agreement with the original 72%), an unweighted re-fit raised false
positives to 69%. So each channel of a dense head that looks like a detection logit (positive on at most
SPARSE_POSITIVE of the calibration positions, on some) is re-fitted on its own, rows weighted by how much
they matter in the original, w = sigmoid(LOGIT_SHARPNESS y) + LOGIT_FLOOR: X^T W X and X^T W y
(`WeightedEquations`; y clipped below at -LOGIT_CLIP, where the sigmoid is flat), pulled by the ridge towards
the bias-corrected weights. Other channels (regressors) are left to bias correction. A head whose input
channels were pruned is re-fitted plainly first (every channel), then bias-corrected, then weighted; a
ternary head gets the plain re-fit only.

Precision: each batch's X^T X and X^T Y are products of float32 rows (BLAS sgemm, relative error ~1e-7 per
batch), summed across batches in float64, where the solve and the error figures need the range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ocomp.gptq import ternarize_error_feedback
from ocomp.graph import constant_value, input_at, is_standard, sorted_nodes
from ocomp.layers import Layer, Unsupported, layer_of
from ocomp.pipeline import Report

from .ternary import ternarize_optimal

MAX_FEATURES = 4608  # larger layers (e.g. VGG's 25088-input classifier) are not re-fitted: X^T X would not fit
RIDGE = 1e-3  # lambda relative to the mean diagonal of X^T X (the mean squared input feature)
ROWS_PER_BATCH = 4096  # im2col rows a batch at most (spatial positions subsampled deterministically)
FITTED_OPS = ("Conv", "Gemm", "MatMul")  # float ops (or the float op a ternary op computes) that are re-fitted
# Error feedback fits T to the calibration inputs; with fewer rows than this many per feature (e.g. an SE
# block's pooled 1x1 convs: one row an image) it fits their noise, and plain rounding generalizes better.
FEEDBACK_MIN_ROWS = 4
FEEDBACK_DAMP = 0.1  # of mean diag(H), added for the feedback pass
# Coordinate descent over a ternary op's codes (bnrecal --descent): default sweeps. It runs on every ternary op,
# also those with fewer than FEEDBACK_MIN_ROWS rows a feature: measured on PP-OCR cls (SE convs, one row an
# image), skipping those doubled the KL divergence to the original (0.0105 -> 0.0211 on samples 200..999).
DESCENT_SWEEPS = 8
# Dense output heads (see the module docstring). A channel is weighted when its original output is positive on at
# most this fraction of the calibration positions (and on at least one): a sparse detection logit.
SPARSE_POSITIVE = 0.1
# Row weights sigmoid(LOGIT_SHARPNESS * y) + LOGIT_FLOOR (y: the original's logit). Chosen on BlazeFace
# (ternary + bnrecal; fitted on half the calibration photos, decision / detection agreement at threshold 0.75 on
# the other half, before clipping): sharpness 1: 89.4% / 75.0%, 2: 96.2% / 100%, 4 (floor 0): 76.0% / 86.1%;
# floor 1e-2 (sharpness 2): 80.8% / 100% (29% false positives). An unweighted fit: 72.1% / 66.7%.
LOGIT_SHARPNESS = 2.0
LOGIT_FLOOR = 1e-3
# Targets below -LOGIT_CLIP are clipped to it: no decision depends on a logit of -50 (sigmoid 2e-22) against one
# of -5000, yet their squared errors dominated the fit (BlazeFace's score logits reach -11000). Chosen on the
# held-out half of the calibration photos (decision agreement at threshold 0.75 / 0.5): none 96.2% / 75.0%,
# 100: 97.1% / 85.6%, 50: 97.1% / 87.5%, 30: 95.2% / 85.6%.
LOGIT_CLIP = 50.0
SHAPE_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Identity")


def descend_codes(ternary: np.ndarray, hessian: np.ndarray, target: np.ndarray,
                  sweeps: int) -> tuple[np.ndarray, int]:
    """Coordinate descent over the codes of every row of `ternary` (outputs, features), values in {-1, 0, +1}.

    Each row o minimizes its output error on the calibration inputs, up to a constant,

        f(t, a) = a^2 t^T H t - 2 a t^T b_o,     b_o = target[o] = H w*_o (w*: the float least-squares fit),

    i.e. ||X (w*_o - a t)||^2: the same objective as GPTQ's error feedback, but where error feedback decides
    each code once, in one order, descent revisits every code (QuantEase, Behdin et al. 2023, for ternary
    levels). A sweep re-solves a = t^T b / t^T H t (>= 0) per row, then for each feature j in turn moves t_j
    to whichever of -1, 0, +1 lowers f most at that a; f never rises, so it stops when a sweep changes
    nothing, or after `sweeps`. Vectorized over rows; the gradient H(a t) - b is updated for changed rows
    only. `hessian` may also be one (features, features) matrix a row, (outputs, features, features): a
    depthwise conv, whose channels see different inputs. Returns the new int8 codes and the sweeps run.
    """
    t = np.asarray(ternary, dtype=np.float64).copy()
    h = np.asarray(hessian, dtype=np.float64)
    b = np.asarray(target, dtype=np.float64)
    per_row = h.ndim == 3  # one H a row (a depthwise conv's channels)
    diag = np.diagonal(h, axis1=-2, axis2=-1)
    levels = np.array([-1.0, 0.0, 1.0])
    run = 0
    for run in range(1, sweeps + 1):
        ht = np.einsum("on,onm->om", t, h) if per_row else t @ h
        tht = np.sum(ht * t, axis=1)
        alpha = np.maximum(np.where(tht > 0, np.sum(t * b, axis=1) / np.where(tht > 0, tht, 1.0), 0.0), 0.0)
        grad = alpha[:, None] * ht - b
        changed = 0
        for j in range(t.shape[1]):
            step = levels[None, :] - t[:, j:j + 1]  # (outputs, 3): the move to each level
            hjj = diag[:, j:j + 1] if per_row else diag[j]
            gain = alpha[:, None] * step * (2 * grad[:, j:j + 1] + alpha[:, None] * step * hjj)
            best = np.argmin(gain, axis=1)
            rows = np.nonzero(gain[np.arange(len(t)), best] < -1e-12 * np.maximum(tht * alpha**2, 1e-30))[0]
            if len(rows):
                delta = step[rows, best[rows]]
                t[rows, j] += delta
                grad[rows] += (alpha[rows] * delta)[:, None] * (h[rows, j] if per_row else h[j][None, :])
                changed += len(rows)
        if not changed:
            break
    return t.astype(np.int8), run


class Equations:
    """Normal equations of one layer: X^T X, X^T Y (float64 sums) and sum(Y^2), X's ones column appended."""

    def __init__(self) -> None:
        self.xtx: np.ndarray | None = None
        self.xty: np.ndarray | None = None
        self.yy = 0.0
        self.rows = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.concatenate([np.asarray(x, np.float32), np.ones((len(x), 1), np.float32)], axis=1)
        y = np.asarray(y, np.float32)
        xtx, xty = (x.T @ x).astype(np.float64), (x.T @ y).astype(np.float64)
        if self.xtx is None:
            self.xtx, self.xty = xtx, xty
        else:
            self.xtx += xtx
            self.xty += xty
        self.yy += float(np.sum(np.square(y, dtype=np.float64)))
        self.rows += len(x)

    def error(self, theta: np.ndarray) -> float:
        """||X theta - Y||^2 / ||Y||^2 from the accumulated sums."""
        sse = float(np.sum(theta * (self.xtx @ theta)) - 2 * np.sum(theta * self.xty)) + self.yy
        return max(sse, 0.0) / max(self.yy, 1e-30)


class ChannelEquations:
    """The normal equations of a depthwise conv: one system a channel, as each output channel sees only its own
    input channel. xtx (channels, k+1, k+1), xty (channels, k+1), yy (channels,); k taps, a ones column."""

    def __init__(self) -> None:
        self.xtx: np.ndarray | None = None
        self.xty: np.ndarray | None = None
        self.yy: np.ndarray | float = 0.0
        self.rows = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """x (rows, channels, k), y (rows, channels)."""
        rows, channels, _ = x.shape
        x = np.concatenate([np.asarray(x, np.float32), np.ones((rows, channels, 1), np.float32)], axis=2)
        xc = np.ascontiguousarray(x.transpose(1, 0, 2))  # (channels, rows, k+1)
        y = np.asarray(y, np.float32)
        xtx = np.matmul(xc.transpose(0, 2, 1), xc).astype(np.float64)
        xty = np.matmul(xc.transpose(0, 2, 1), np.ascontiguousarray(y.T)[:, :, None])[..., 0].astype(np.float64)
        if self.xtx is None:
            self.xtx, self.xty = xtx, xty
        else:
            self.xtx += xtx
            self.xty += xty
        self.yy = self.yy + np.sum(np.square(y, dtype=np.float64), axis=0)
        self.rows += rows

    def error(self, theta: np.ndarray) -> float:
        """||X theta - Y||^2 / ||Y||^2 over all channels, theta (channels, k+1)."""
        sse = np.einsum("ck,ckl,cl->c", theta, self.xtx, theta) - 2 * np.sum(theta * self.xty, axis=1) + self.yy
        return max(float(np.sum(sse)), 0.0) / max(float(np.sum(self.yy)), 1e-30)


class WeightedEquations:
    """One weighted least-squares system an output channel: X^T W_o X (channels, f+1, f+1), X^T W_o y_o
    (channels, f+1), sum w y^2 (channels,); the same layout as `ChannelEquations`, so solved the same way."""

    def __init__(self) -> None:
        self.xtx: np.ndarray | None = None
        self.xty: np.ndarray | None = None
        self.yy: np.ndarray | float = 0.0
        self.rows = 0

    def add(self, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        """x (rows, features), y (rows, channels), w (rows, channels) row weights."""
        x = np.concatenate([np.asarray(x, np.float32), np.ones((len(x), 1), np.float32)], axis=1)
        y, w = np.asarray(y, np.float32), np.asarray(w, np.float32)
        xtx = np.stack([((x * w[:, c:c + 1]).T @ x) for c in range(y.shape[1])]).astype(np.float64)
        xty = ((x.T @ (w * y)).T).astype(np.float64)
        if self.xtx is None:
            self.xtx, self.xty = xtx, xty
        else:
            self.xtx += xtx
            self.xty += xty
        self.yy = self.yy + np.sum(w.astype(np.float64) * np.square(y, dtype=np.float64), axis=0)
        self.rows += len(x)

    error = ChannelEquations.error


def logit_weights(y: np.ndarray) -> np.ndarray:
    """Row weights of a sparse detection logit's fit: sigmoid(LOGIT_SHARPNESS y) + LOGIT_FLOOR."""
    return 1.0 / (1.0 + np.exp(-np.clip(LOGIT_SHARPNESS * np.asarray(y, np.float64), -60, 60))) + LOGIT_FLOOR


def logit_target(y: np.ndarray) -> np.ndarray:
    """A sparse logit's fitting target: the original's output clipped below at -LOGIT_CLIP."""
    return np.maximum(y, -LOGIT_CLIP)


def sparse_logit_channels(positive: np.ndarray, count: int) -> np.ndarray:
    """The channels of a dense output head fitted with logit weights: positive on some positions, at most
    SPARSE_POSITIVE of them (`positive`: per-channel count of positive original outputs over `count` rows)."""
    return np.nonzero((positive > 0) & (positive <= SPARSE_POSITIVE * count))[0]


def output_heads(graph: gs.Graph) -> set[int]:
    """ids of the weighted layers whose output reaches a graph output through shape ops only (SHAPE_OPS),
    and nowhere else."""
    outputs = {t.name for t in graph.outputs}

    def reaches(tensor: gs.Tensor) -> bool:
        if not tensor.outputs:
            return tensor.name in outputs
        return all(c.op in SHAPE_OPS and all(reaches(o) for o in c.outputs) for c in tensor.outputs)

    found = set()
    for node in graph.nodes:
        layer = layer_of(node)
        if layer is None or not node.outputs:
            continue
        add = layer.bias_add(graph)
        if reaches(add[0].outputs[0] if add is not None else node.outputs[0]):
            found.add(id(node))
    return found


@dataclass
class Fit:
    """One layer to re-fit: its input tensor in the current model, its output tensor in the reference."""

    layer: Layer
    x: str  # input tensor of the current model
    y: str  # the same layer's output tensor in the reference model
    out_kept: np.ndarray | None  # reference output channels kept here
    bias: str  # "own": has a bias (or MatMul's bias Add); "new": add one; "drop": a BN follows; "none"
    conv: dict | None = None  # a Conv's explicit kernel_shape, strides, pads (begins + ends), dilations
    ternary: np.ndarray | None = None  # the new T of a ternary op, (outputs, features)
    alpha: np.ndarray | None = None  # and its new alpha
    error_feedback: bool = False  # ternary ops: choose T by error feedback on the real inputs
    descent: int = 0  # ternary ops: then at most this many sweeps of coordinate descent over T (0: none)
    sweeps: int = 0  # coordinate-descent sweeps the ternary fit ran
    depthwise: bool = False  # a depthwise conv: one least-squares system a channel (ChannelEquations)
    head: bool = False  # a float dense output head: its sparse logit channels re-fitted with row weights
    channels: np.ndarray | None = None  # a head's channels re-fitted (chosen on the data)
    plain: bool = False  # a head: also the plain re-fit of every channel first (its input channels were pruned)

    def equations(self) -> Equations | ChannelEquations | WeightedEquations:
        if self.head:
            return WeightedEquations()
        return ChannelEquations() if self.depthwise else Equations()

    @property
    def node(self) -> gs.Node:
        return self.layer.node

    def rows(self, x: np.ndarray, y: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """This batch's rows of X (im2col for a Conv) and of Y (output channels mapped to the kept ones)."""
        if self.conv is not None:
            cols, y = self._im2col(np.asarray(x, np.float32), np.asarray(y), batch)
        else:
            cols = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
            axis = 1 if self.layer.output_axis == 1 else y.ndim - 1
            y = np.moveaxis(y, axis, -1).reshape(-1, y.shape[axis])
        if self.out_kept is not None:
            y = y[:, self.out_kept]
        return cols, np.asarray(y, np.float32)

    def _im2col(self, x: np.ndarray, y: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
        _, _, kh, kw = self.layer.weight_shape
        b, channels = x.shape[:2]
        oh, ow = y.shape[2:]
        sh, sw = self.conv["strides"]
        dh, dw = self.conv["dilations"]
        top, left, bottom, right = self.conv["pads"]
        positions = b * oh * ow
        if positions > ROWS_PER_BATCH:  # deterministic subsample: the same rows on every run
            chosen = np.sort(np.random.default_rng(batch).choice(positions, ROWS_PER_BATCH, replace=False))
        else:
            chosen = np.arange(positions)
        bi, hi, wi = np.unravel_index(chosen, (b, oh, ow))
        padded = np.pad(x[np.unique(bi)], ((0, 0), (0, 0), (top, bottom), (left, right)))
        bi_local = np.searchsorted(np.unique(bi), bi)
        cols = np.empty((len(chosen), channels, kh, kw), np.float32)
        for i in range(kh):
            for j in range(kw):
                cols[:, :, i, j] = padded[bi_local, :, hi * sh + i * dh, wi * sw + j * dw]
        cols = cols.reshape(len(chosen), channels, -1) if self.depthwise else cols.reshape(len(chosen), -1)
        return cols, y[bi, :, hi, wi]

    def current(self, graph: gs.Graph) -> tuple[np.ndarray, np.ndarray]:
        """The layer's effective weights as (features, outputs) and its effective bias."""
        return self.layer.rows().T, self.layer.bias(graph)

    def solve(self, graph: gs.Graph, eq: Equations | ChannelEquations | WeightedEquations, report: Report) -> None:
        if self.head or self.depthwise:
            self._solve_channels(graph, eq, report)
            return
        node = self.node
        weight, bias = self.current(graph)
        features, outputs = weight.shape
        if eq.xty.shape[1] != outputs:
            report.skip(node.name, node.op, f"{outputs} outputs here, {eq.xty.shape[1]} mapped from the reference")
            return
        before = eq.error(np.vstack([weight, bias[None]]))
        lam = RIDGE * max(float(np.mean(np.diag(eq.xtx)[:features])), 1e-12)
        reg = np.full(features + 1, lam)
        reg[-1] = 0.0  # the bias is not regularized
        intercept = self.bias != "none"  # without a bias to fit, the ones column is dropped
        a = eq.xtx + np.diag(reg)
        rhs = eq.xty + reg[:, None] * np.vstack([weight, np.zeros((1, outputs))])
        keep = slice(None) if intercept else slice(0, features)
        try:
            theta = np.linalg.solve(a[keep, keep], rhs[keep])
        except np.linalg.LinAlgError:
            theta = np.linalg.lstsq(a[keep, keep], rhs[keep], rcond=None)[0]
        if not intercept:
            theta = np.vstack([theta, np.zeros((1, outputs))])
        if self.layer.ternary:
            theta = self._ternary_theta(theta[:features], eq, intercept)
        after = eq.error(theta)
        if after > before + 1e-9:  # (a float fit cannot be worse; an exact fit can round either way)
            report.skip(node.name, node.op, f"not reconstructed: the re-fit would not lower the error "
                        f"({before:.3g} -> {after:.3g})")
            return
        self._store(graph, theta[:features], theta[features], bias)
        report.change(node.name, node.op, f"{features} in", f"{features} in", 0, 0,
                      note=f"reconstructed on {eq.rows} rows: relative error {before:.3g} -> {after:.3g}")
        report.details.setdefault("reconstructed", {})[node.name] = {
            "rows": eq.rows, "error_before": before, "error_after": after, "lambda": lam}
        if self.layer.ternary:
            report.details["reconstructed"][node.name]["descent_sweeps"] = self.sweeps

    def _solve_channels(self, graph: gs.Graph, eq: ChannelEquations, report: Report) -> None:
        """`solve` for a depthwise conv: the same ridge fit and ternary re-solve, one channel at a time (batched);
        for an output head, the chosen channels' weighted systems, the other channels unchanged."""
        node = self.node
        full_weight, full_bias = self.layer.rows(), self.layer.bias(graph)  # (channels, k), (channels,)
        chosen = self.channels if self.head else np.arange(len(full_weight))
        weight, bias = full_weight[chosen], full_bias[chosen]
        if self.head and self.layer.bias_add(graph) is not None:
            bias = np.zeros(len(chosen))  # the reference's Y is the MatMul's, before its bias Add
        channels, k = weight.shape
        if eq.xty.shape[0] != channels:
            report.skip(node.name, node.op, f"{channels} outputs here, {eq.xty.shape[0]} mapped from the reference")
            return
        before = eq.error(np.concatenate([weight, bias[:, None]], axis=1))
        lam = RIDGE * np.maximum(np.mean(np.diagonal(eq.xtx, axis1=1, axis2=2)[:, :k], axis=1), 1e-12)
        reg = lam[:, None] * np.concatenate([np.ones(k), [0.0]])[None, :]  # the bias is not regularized
        intercept = self.bias != "none"
        a = eq.xtx + reg[:, :, None] * np.eye(k + 1)[None]
        rhs = eq.xty + reg * np.concatenate([weight, np.zeros((channels, 1))], axis=1)
        m = k + 1 if intercept else k
        try:
            theta = np.linalg.solve(a[:, :m, :m], rhs[:, :m, None])[..., 0]
        except np.linalg.LinAlgError:
            theta = np.einsum("ckl,cl->ck", np.linalg.pinv(a[:, :m, :m]), rhs[:, :m])
        if not intercept:
            theta = np.concatenate([theta, np.zeros((channels, 1))], axis=1)
        if self.layer.ternary:
            theta = self._ternary_channels(theta[:, :k], eq, intercept)
        after = eq.error(theta)
        if after > before + 1e-9:
            report.skip(node.name, node.op, f"not reconstructed: the re-fit would not lower the error "
                        f"({before:.3g} -> {after:.3g})")
            return
        if self.head:
            new_weight, new_bias = full_weight.astype(np.float64), full_bias.astype(np.float64)
            if self.layer.bias_add(graph) is not None:
                new_bias = np.zeros(len(full_bias))
            new_weight[chosen], new_bias[chosen] = theta[:, :k], theta[:, k]
            self._store(graph, new_weight.T, new_bias, full_bias)
        else:
            self._store(graph, theta[:, :k].T, theta[:, k], bias)
        how = (f"{channels} sparse logit channels of an output head re-fitted, rows weighted by the original's "
               "score" if self.head else "reconstructed channel by channel")
        report.change(node.name, node.op, f"{k} in", f"{k} in", 0, 0,
                      note=f"{how} on {eq.rows} rows: relative error {before:.3g} -> {after:.3g}")
        details = {"rows": eq.rows, "error_before": before, "error_after": after, "lambda": float(lam.mean()),
                   "head" if self.head else "depthwise": True}
        if self.head:
            details["channels"] = [int(c) for c in chosen]
        if self.layer.ternary:
            details["descent_sweeps"] = self.sweeps
        report.details.setdefault("reconstructed", {})[node.name] = details

    def _ternary_channels(self, fitted: np.ndarray, eq: ChannelEquations, intercept: bool) -> np.ndarray:
        """`_ternary_theta` for a depthwise conv, `fitted` (channels, k): each channel's T from rounding its row,
        improved by coordinate descent on its own inputs' H; then its exact alpha and bias."""
        k = fitted.shape[1]
        xx, x1, n = eq.xtx[:, :k, :k], eq.xtx[:, :k, k], eq.xtx[:, k, k]
        ternary, _ = ternarize_optimal(fitted)
        self.sweeps = 0
        if self.descent:
            hessian = xx - x1[:, :, None] * x1[:, None, :] / np.maximum(n, 1e-30)[:, None, None] if intercept else xx
            ternary, self.sweeps = descend_codes(ternary, hessian, np.einsum("ckl,cl->ck", hessian, fitted),
                                                 self.descent)
        t = ternary.astype(np.float64)
        zz = np.einsum("ck,ckl,cl->c", t, xx, t)
        zy = np.sum(t * eq.xty[:, :k], axis=1)
        z1 = np.sum(t * x1, axis=1)
        y1 = eq.xty[:, k]
        alpha, bias = np.zeros(len(t)), np.zeros(len(t))
        if intercept:
            det = zz * n - z1**2
            ok = det > 1e-12 * np.maximum(zz * n, 1e-30)
            alpha[ok] = (zy[ok] * n[ok] - z1[ok] * y1[ok]) / det[ok]
            bias = np.where(ok, (y1 - alpha * z1) / np.maximum(n, 1e-30), y1 / np.maximum(n, 1e-30))
        else:
            ok = zz > 1e-30
            alpha[ok] = zy[ok] / zz[ok]
        self.ternary, self.alpha = ternary, alpha
        return np.concatenate([t * alpha[:, None], bias[:, None]], axis=1)

    def _ternary_theta(self, fitted: np.ndarray, eq: Equations, intercept: bool) -> np.ndarray:
        """Ternarize the float fit (features, outputs), then the exact alpha and bias of each channel for that T.

        With `error_feedback`, T minimizes the output error on the layer's real inputs (GPTQ-style error
        feedback through H = X^T X, centred when the bias is re-solved too: ocomp/gptq.py); otherwise each
        row is ternarized on its own (the least-squares ternarization of the weights). With `descent`, that T
        is then improved by coordinate descent on the same output error (`descend_codes`). Error feedback
        needs at least FEEDBACK_MIN_ROWS rows per feature (with fewer it fits the calibration inputs' noise)."""
        features = fitted.shape[0]
        xx, x1, n = eq.xtx[:features, :features], eq.xtx[:features, features], eq.xtx[features, features]
        enough = eq.rows >= FEEDBACK_MIN_ROWS * features
        hessian = xx - np.outer(x1, x1) / max(n, 1e-30) if intercept else xx
        if self.error_feedback and enough:
            ternary = ternarize_error_feedback(fitted.T, hessian, damp=FEEDBACK_DAMP).ternary
        else:
            ternary, _ = ternarize_optimal(fitted.T)
        self.sweeps = 0
        if self.descent:
            ternary, self.sweeps = descend_codes(ternary, hessian, (hessian @ fitted).T, self.descent)
        t = ternary.astype(np.float64)  # (outputs, features)
        zz = np.sum((t @ xx) * t, axis=1)  # ||X t_o||^2 (one BLAS product: einsum's three-operand loop is slow)
        zy = np.sum(t * eq.xty[:features].T, axis=1)  # (X t_o) . y_o
        z1 = t @ x1  # sum of X t_o
        y1 = eq.xty[features]  # sum of y_o
        alpha, bias = np.zeros(len(t)), np.zeros(len(t))
        if intercept:
            det = zz * n - z1**2
            ok = det > 1e-12 * np.maximum(zz * n, 1e-30)
            alpha[ok] = (zy[ok] * n - z1[ok] * y1[ok]) / det[ok]
            bias = np.where(ok, (y1 - alpha * z1) / max(n, 1e-30), y1 / max(n, 1e-30))
        else:
            ok = zz > 1e-30
            alpha[ok] = zy[ok] / zz[ok]
        self.ternary, self.alpha = ternary, alpha
        return np.vstack([t.T * alpha[None, :], bias[None, :]])

    def _store(self, graph: gs.Graph, weight: np.ndarray, bias: np.ndarray, old_bias: np.ndarray) -> None:
        layer = self.layer
        if layer.ternary:
            layer.set_ternary(graph, self.ternary, self.alpha)
        else:
            layer.set_rows(graph, weight.T)
        if layer.bias_add(graph) is not None and not layer.ternary:
            layer.set_bias(graph, old_bias + bias)  # the reference's Y is the MatMul's, before its bias Add
        elif self.bias in ("own", "new"):
            layer.set_bias(graph, bias)


def _feeds_bn(tensor: gs.Tensor) -> bool:
    return bool(tensor.outputs) and all(c.op == "BatchNormalization" for c in tensor.outputs)


def _dense(tensor: gs.Tensor, layer: Layer) -> bool:
    """Whether a layer's output has more than one position a sample (a Conv's spatial map, a MatMul over a
    sequence), from its shape; not a classifier's one row a sample, where every row is a decision."""
    shape = tensor.shape
    if shape is None or len(shape) <= 2:
        return False
    axis = 1 if layer.output_axis == 1 else len(shape) - 1
    rest = [d for i, d in enumerate(shape) if i not in (0, axis)]
    return any(not isinstance(d, int) or d > 1 for d in rest)


def _reference_layer(ref_nodes: dict[str, gs.Node], node: gs.Node) -> gs.Node | None:
    """The float layer of the reference model that computes `node`'s output (through a MatMul's bias Add)."""
    ref = ref_nodes.get(node.outputs[0].name)
    if ref is not None and ref.op == "Add" and node.op == "TernaryMatMul":
        for tensor in ref.inputs:
            made_by = tensor.inputs[0] if tensor.inputs else None
            if made_by is not None and made_by.op == "MatMul" and constant_value(input_at(made_by, 1)) is not None:
                return made_by
    return ref


def _blocker(graph: gs.Graph, layer: Layer, ref: Layer | None) -> str:
    node = layer.node
    if ref is None:
        return (f"no {layer.kind.float_op} with a constant weight makes tensor '{node.outputs[0].name}' in the "
                "original model")
    if layer.kind.float_op == "Conv":
        if layer.groups != 1 and not layer.depthwise:
            return "grouped Conv (not depthwise)"
        if len(layer.weight_shape) != 4:
            return "only 2-D Conv"
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "Gemm with transA"
    if layer.features > MAX_FEATURES:
        return f"{layer.features} input features per output (more than {MAX_FEATURES})"
    if node.op == "MatMul" and len(layer.weight_shape) != 2:
        return "MatMul weight is not 2-D"
    owner = layer.bias_owner(graph)
    if owner is not None and input_at(*owner) is not None and constant_value(input_at(*owner)) is None:
        return "bias is not a constant"
    return ""


def fits(graph: gs.Graph, ref_graph: gs.Graph, kept_channels: dict, report: Report,
         error_feedback: bool = False, descent: int = 0, heads: bool = False) -> list[Fit]:
    """Layers whose input channels were pruned (fewer input features than in the reference model), and every
    ternary op, in topological order; with `heads`, also the float output heads (`output_heads`; whether one
    is dense and which channels are logits is decided on the data)."""
    ref_nodes = {n.outputs[0].name: n for n in ref_graph.nodes if n.outputs}
    head_ids = output_heads(graph) if heads else set()
    found = []
    for node in sorted_nodes(graph):
        layer = layer_of(node)
        if layer is None or layer.kind.float_op not in FITTED_OPS or not node.inputs:
            continue
        ref_node = _reference_layer(ref_nodes, node)
        ref = layer_of(ref_node) if ref_node is not None else None
        usable = ref is not None and not ref.ternary and ref.op == layer.kind.float_op and is_standard(ref.node)
        pruned = node.inputs[0].name in kept_channels
        if usable:
            pruned = pruned or layer.in_channels < ref.in_channels
        head = (not layer.ternary and id(node) in head_ids and not layer.depthwise
                and _dense(node.outputs[0], layer))
        if not (pruned or layer.ternary or head):
            continue
        why = ("input channels pruned" if pruned else "output head" if head else "ternary op")
        reason = _blocker(graph, layer, ref if usable else None)
        if reason:
            report.skip(node.name, node.op, f"{why}, not reconstructed: {reason}")
            continue
        fit = Fit(layer, node.inputs[0].name, node.outputs[0].name, None, "own", error_feedback=error_feedback,
                  descent=descent, depthwise=layer.depthwise, head=head, plain=pruned)
        if layer.kind.float_op == "Conv":
            try:
                fit.conv = layer.conv_attrs()
            except Unsupported as unsupported:
                report.skip(node.name, node.op, f"{why}, not reconstructed: {unsupported}")
                continue
        kept = kept_channels.get(node.outputs[0].name)
        if kept is not None:
            fit.out_kept = np.asarray(kept)
        if (len(fit.out_kept) if fit.out_kept is not None else ref.out_channels) != layer.out_channels:
            report.skip(node.name, node.op, f"{why}, not reconstructed: output channels do not map to the reference")
            continue
        out = node.outputs[0]
        if layer.kind.bias_index is None:
            if layer.bias_add(graph) is None:
                fit.bias = "drop" if _feeds_bn(out) else "none"
        elif not layer.has_bias(graph):
            fit.bias = "drop" if _feeds_bn(out) else "new"
        found.append(fit)
    return found
