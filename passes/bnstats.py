"""Per-channel statistics on calibration data, and the two repairs built on them.

- Adaptive BN (EagleEye, ECCV 2020): every BatchNormalization gets the mean and population variance of
  its input, measured on the current, already rewritten model.
- Bias correction (Nagel et al., Data-Free Quantization, ICCV 2019) for layers not followed by a BN
  (every layer of a BN-folded model, the classifier otherwise): the bias is set so that each output
  channel's mean equals the original model's at the same tensor; with `match_std` each channel is also
  scaled to the original's std (weights, or a ternary op's alpha), the folded-model equivalent of adaptive
  BN. Mean-only correction cannot undo the variance change of ternary or pruned BN-folded layers (on the
  BN-folded ResNet-20: 9.85% top-1 mean-only, 90.30% with std matching). After pruning, kept channels are
  mapped back to the original's with the kept-channel record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ocomp.graph import constant_value, input_at, is_standard, set_constant, sorted_nodes
from ocomp.layers import Layer, layer_of
from ocomp.pipeline import Report


CHUNK_BYTES = 32 * 2**20  # float32 bytes of samples summed at a time
MAX_STD_SCALE = 16.0  # std matching rescales a channel by at most this factor (either way)


@dataclass
class ChannelStats:
    count: int
    total: np.ndarray  # per-channel sum
    squares: np.ndarray  # per-channel sum of squares

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.count

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.squares / self.count - self.mean**2, 0.0)

    @classmethod
    def of(cls, values, axis: int, absolute: bool = False) -> "ChannelStats":
        """Statistics over every axis but `axis` of the arrays in `values` (float64 sums; with `absolute`,
        `total` sums |x|).

        Arrays may be whole-calibration-set tensors (possibly spilled to disk): they are read CHUNK_BYTES of
        samples at a time, so no float64 (or transposed) copy of a whole tensor is ever made."""
        stats = None
        for value in values:
            value = value if hasattr(value, "ndim") else np.asarray(value)  # (a sweep's DiskArray: read by slices)
            ax = axis if axis >= 0 else value.ndim + axis
            per_sample = max(value[:1].nbytes, 1)
            step = max(1, CHUNK_BYTES // per_sample) if ax != 0 and value.ndim > 1 else len(value)
            for lo in range(0, max(len(value), 1), step):
                chunk = np.asarray(value[lo:lo + step])
                moved = np.moveaxis(chunk, ax, 0).reshape(chunk.shape[ax], -1).astype(np.float64)
                total = np.abs(moved).sum(axis=1) if absolute else moved.sum(axis=1)
                part = cls(moved.shape[1], total, np.einsum("ij,ij->i", moved, moved))
                stats = part if stats is None else stats.merge(part)
        return stats

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """These statistics and `other`'s, of more values of the same channels, summed in place."""
        self.count += other.count
        self.total += other.total
        self.squares += other.squares
        return self


# ---------------------------------------------------------------- adaptive BN


def usable_bns(graph: gs.Graph, report: Report) -> list[gs.Node]:
    usable = []
    for bn in sorted_nodes(graph):
        if bn.op != "BatchNormalization" or not is_standard(bn):
            continue
        if any(constant_value(input_at(bn, i)) is None for i in range(1, 5)):
            report.skip(bn.name, bn.op, "scale, bias, mean or variance is not a constant")
        elif bn.attrs.get("training_mode", 0):
            report.skip(bn.name, bn.op, "training_mode BatchNormalization")
        else:
            usable.append(bn)
    return usable


def set_bn(graph: gs.Graph, bn: gs.Node, measured: ChannelStats, report: Report,
           reference: ChannelStats | None = None) -> None:
    """Recalibrate a BatchNorm to the statistics `measured` at its input on the calibration data.

    With `reference` (the original model's statistics at the same tensor on the same data, mapped to the
    kept channels), the BN's own statistics (from training, on far more data than a calibration set) are
    kept and moved by what compression changed: mean + (measured - reference mean), var x measured /
    reference var (the ratio bounded by MAX_STD_SCALE^2). A BN whose input did not change keeps its
    statistics exactly; absolute statistics from a few hundred samples cost PP-OCR cls 5 pt top-1 there.
    Without it, the measured statistics replace them (adaptive BN)."""
    old_mean = constant_value(bn.inputs[3]).astype(np.float64)
    old_var = constant_value(bn.inputs[4]).astype(np.float64)
    name = bn.name or bn.outputs[0].name
    if reference is not None:
        mean = old_mean + (measured.mean - reference.mean)
        ratio = np.clip(measured.var / np.maximum(reference.var, 1e-12), MAX_STD_SCALE**-2, MAX_STD_SCALE**2)
        var = old_var * np.where(reference.var > 1e-12, ratio, 1.0)
        how = "shifted by the change against the original"
    else:
        mean, var = measured.mean, measured.var
        how = "measured"
    set_constant(graph, bn, 3, mean.astype(np.float32), f"{name}.running_mean")
    set_constant(graph, bn, 4, var.astype(np.float32), f"{name}.running_var")
    shift = float(np.max(np.abs(mean - old_mean) / np.sqrt(old_var + 1e-5)))
    ratio = var / np.maximum(old_var, 1e-12)
    report.change(bn.name, bn.op, f"{len(old_mean)} ch", f"{len(old_mean)} ch", 0, 0,
                  note=f"statistics {how}: max mean shift {shift:.3g} std; var ratio {ratio.min():.3g}..{ratio.max():.3g}")


def reference_stats(ref: ChannelStats, kept: np.ndarray | None, channels: int) -> tuple[ChannelStats | None, str]:
    """The original's statistics restricted to the kept channels (of `channels` here), or None and why they
    do not map."""
    if kept is not None:
        kept = np.asarray(kept)
        if kept.max(initial=-1) >= len(ref.total):
            return None, "kept channels do not match the reference"
        ref = ChannelStats(ref.count, ref.total[kept], ref.squares[kept])
    if len(ref.total) != channels:
        return None, f"{channels} channels here, {len(ref.total)} in the reference"
    return ref, ""


# ---------------------------------------------------------------- bias correction


@dataclass
class Target:
    """A layer whose bias is corrected, the tensor compared with the reference, its channel axis, and the
    nodes that compute that tensor from the layer's input (the layer, and a MatMul's bias Add)."""

    layer: Layer
    tensor: str
    axis: int
    nodes: list[gs.Node]

    @property
    def node(self) -> gs.Node:
        return self.layer.node


def _feeds_bn(tensor: gs.Tensor) -> bool:
    return bool(tensor.outputs) and all(c.op == "BatchNormalization" for c in tensor.outputs)


def targets(graph: gs.Graph, reference_names: set[str], report: Report) -> list[Target]:
    found = []
    for node in sorted_nodes(graph):
        layer = layer_of(node)
        if layer is None:
            continue
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            report.skip(node.name, node.op, "Gemm with transA is not bias-corrected")
            continue
        out = node.outputs[0]
        target = Target(layer, out.name, 1 if layer.output_axis == 1 else -1, [node])
        if layer.kind.bias_index is None:
            add = layer.bias_add(graph)
            if add is None:
                report.skip(node.name, node.op, "MatMul without a constant bias Add")
                continue
            target.nodes.append(add[0])
            out = add[0].outputs[0]
            target.tensor = out.name
        if _feeds_bn(out):
            continue  # the BatchNorm after it is recalibrated
        if target.tensor not in reference_names:
            report.skip(node.name, node.op, f"tensor '{target.tensor}' does not exist in the original model")
            continue
        found.append(target)
    return found


def correct(graph: gs.Graph, target: Target, current: ChannelStats, ref: ChannelStats, kept_channels: dict,
            match_std: bool, report: Report) -> None:
    """Set the target's bias (and with `match_std` its per-channel scale) so its output statistics match
    the reference's."""
    node, layer = target.node, target.layer
    mapped, why = reference_stats(ref, kept_channels.get(target.tensor), len(current.mean))
    if mapped is None:
        report.skip(node.name, node.op, why)
        return
    ref_mean, ref_std = mapped.mean, np.sqrt(mapped.var)
    channels = len(ref_mean)
    bias = layer.bias(graph)
    scale = np.ones(channels)
    if match_std:
        std = np.sqrt(current.var)
        ratio = ref_std / np.maximum(std, 1e-12)
        # A channel whose spread changed by more than MAX_STD_SCALE (e.g. one that became almost constant
        # after pruning: a ReLU nearly always off) is not miscalibrated but changed; rescaling it would
        # blow up its noise (measured: scales of 1e10 on BlazeFace), so only its mean is corrected.
        usable = (std > 1e-12) & (ratio <= MAX_STD_SCALE) & (ratio >= 1 / MAX_STD_SCALE)
        scale = np.where(usable, ratio, 1.0)
        unscaled = int(np.sum(~usable))
        layer.scale_outputs(graph, scale)
    # y' = scale * (y - bias) + new_bias must have mean ref_mean
    new_bias = ref_mean - scale * (current.mean - bias)
    layer.set_bias(graph, new_bias)
    report.change(node.name, node.op, f"{channels} ch", f"{channels} ch", 0, 0,
                  note=f"bias corrected: max |shift| {float(np.max(np.abs(new_bias - bias))):.3g}"
                  + ("; std matched" if match_std else "")
                  + (f" ({unscaled} channels off by more than {MAX_STD_SCALE:g}x left unscaled)"
                     if match_std and unscaled else ""))
