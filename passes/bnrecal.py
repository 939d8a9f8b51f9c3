"""Pass `bnrecal`: repair a rewritten model on calibration data, layer by layer, in one forward sweep.

Pruning and ternarization shift every later layer's activations. Without retraining, three repairs on a
few hundred real inputs recover most of the loss; each layer is repaired on the inputs it gets from the
already repaired layers before it:

1. reconstruction (passes/reconstruct.py): every group-1 or depthwise Conv, Gemm, MatMul whose input
   channels were pruned, and every ternary op, is re-fitted by least squares against the original model's output at the
   same tensor (on ResNet-20 / Fashion-MNIST: prune 0.3 + bnrecal 60.1% -> 91.2% top-1);
2. adaptive BN (passes/bnstats.py): every BatchNormalization gets the statistics of its current input;
3. bias correction (passes/bnstats.py) of layers not followed by a BN, against the original model.

The data flows through ocomp/sweep.py: the current model and the original each run forward once over the
calibration set, segment by segment, in topological order; at each layer the sweep hands over its input
(current model) and the original's output, so the cost is one pass of each model: linear in depth.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ocomp.graph import sorted_nodes
from ocomp.pipeline import Context, Option, Pass, Report, mebibytes, non_negative_int, positive_int, register
from ocomp.sweep import DEFAULT_BUDGET, Calibration, Sweep

from .bnstats import ChannelStats, Target, correct, reference_stats, set_bn, targets, usable_bns
from .reconstruct import DESCENT_SWEEPS, Fit, fits, logit_target, logit_weights, sparse_logit_channels




@register
class BNRecal(Pass):
    """Repair pruned/ternary layers on calibration data: least-squares re-fit, BN recalibration, bias correction."""

    name = "bnrecal"
    options = (
        Option("samples", positive_int, 512, "calibration samples used (the first N of --calib)"),
        Option("bias", bool, True, "correct the bias of layers not followed by a BatchNorm against the "
               "original model (bias correction)"),
        Option("match_std", bool, True, "bias correction also scales each channel to the reference std "
               "(off: mean-only bias correction, which cannot undo the variance change of ternary or pruned "
               "BN-folded layers)"),
        Option("reconstruct", bool, True, "re-fit, before the statistics, every group-1 or depthwise Conv, Gemm, "
               "MatMul whose input channels were pruned and every ternary op, by least squares against the original "
               "model's output at the same tensor (feature-map reconstruction; a ternary op is ternarized again and "
               "its alpha/bias solved); needs the original model"),
        Option("error_feedback", bool, True, "when re-fitting a ternary op, choose its codes by GPTQ-style error "
               "feedback on the layer's real inputs (ocomp/gptq.py) instead of rounding each row (off: rounding), "
               "as the start of the coordinate descent (--bnrecal-descent); measured with descent, against "
               "rounding + descent: KL to the original on held-out data ResNet-20 0.0063 -> 0.0056, PP-OCR cls "
               "0.033 -> 0.018"),
        Option("descent", non_negative_int, DESCENT_SWEEPS, "when re-fitting a ternary op, improve its codes by "
               "coordinate descent on the layer's output error on the calibration inputs, at most this many sweeps "
               "over the codes (0: off); measured (ternary+bnrecal, KL to the original on held-out data): ResNet-20 "
               "0.0098 -> 0.0056, PP-OCR cls 0.030 -> 0.018"),
        Option("heads", bool, True, "re-fit the detection-logit channels of float dense output heads (a layer "
               "whose output reaches a graph output through shape ops only, with many positions a sample; a "
               "channel positive on at most 10% of them) by least squares with rows weighted by the original's "
               "score, sigmoid(2 y), after bias correction: the decision rests on each sample's top positions, "
               "which mean matching ignores (BlazeFace ternary+bnrecal, decision / detection agreement on 488 "
               "photos at threshold 0.75: 71.7% / 24.2% off, 96.9% / 96.2% on)"),
        Option("memory", mebibytes, DEFAULT_BUDGET / 2**20, "MiB of calibration-set activations held in "
               "memory by each of the two sweeps (current and original model); the rest is spilled to "
               "temporary files (0: everything)"),
    )
    needs = frozenset({"calibration"})

    def run(self, graph: gs.Graph, ctx: Context) -> Report:
        report = Report(self.name)
        calibration = Calibration.read(ctx.calibration, ctx.options["samples"])
        kept = ctx.kept_channels
        graph.toposort()
        ref_graph = None
        if ctx.reference is not None:
            ref_graph = gs.import_onnx(ctx.reference)
            ref_graph.toposort()
        bns = usable_bns(graph, report)
        found_targets: list[Target] = []
        if ctx.options["bias"]:
            if ref_graph is None:
                report.skip("*", "-", "bias correction needs the reference model (ocomp compress passes it)")
            else:
                found_targets = targets(graph, set(ref_graph.tensors()), report)
        found_fits: list[Fit] = []
        if ctx.options["reconstruct"]:
            if ref_graph is None:
                report.skip("*", "-", "reconstruct needs the reference model (ocomp compress passes it)")
            else:
                found_fits = fits(graph, ref_graph, kept, report, ctx.options.get("error_feedback", True),
                                  ctx.options.get("descent", DESCENT_SWEEPS), ctx.options.get("heads", True))
        steps = _Steps(graph, bns, found_targets, found_fits)
        budget = int(ctx.options.get("memory", DEFAULT_BUDGET / 2**20) * 2**20)
        opsets = list(ctx.template.opset_import) if ctx.template is not None else []
        ref_opsets = list(ctx.reference.opset_import) if ctx.reference is not None else []
        current = Sweep(graph, calibration, ctx.session, budget, opsets)
        original = Sweep(ref_graph, calibration, ctx.session, budget, ref_opsets) if ref_graph is not None else None
        timeline = []
        try:
            for node in _progress(steps.nodes, ctx.progress, calibration.samples):
                start = time.perf_counter()
                fit = steps.fit.get(id(node))
                target = steps.target.get(id(node))
                if fit is not None and fit.head:  # bias correction first; the weighted re-fit starts from it
                    x, y = current.get([fit.x])[fit.x], original.get([fit.y])[fit.y]
                    if fit.plain:  # input channels pruned: first the plain re-fit of every channel
                        _reconstruct(graph, dataclasses.replace(fit, head=False), current, original, report)
                    if target is not None:
                        _correct(graph, target, current, original, kept, ctx.options["match_std"], report)
                    _reconstruct_head(graph, fit, x, y, current.calibration.bounds, report)
                    target = None
                elif fit is not None:
                    _reconstruct(graph, fit, current, original, report)
                if id(node) in steps.bn:
                    _recalibrate_bn(graph, node, current, original, kept, report)
                if target is not None:
                    _correct(graph, target, current, original, kept, ctx.options["match_std"], report)
                timeline.append((node.name, round(time.perf_counter() - start, 4)))
        finally:
            current.close()
            if original is not None:
                original.close()
        report.details["samples"] = calibration.samples
        report.details["sweep"] = {
            "steps": len(steps.nodes),
            "segments": current.stats.segments + (original.stats.segments if original else 0),
            "onnxruntime_seconds": round(current.stats.seconds + (original.stats.seconds if original else 0), 3),
            "peak_bytes": current.stats.peak_bytes + (original.stats.peak_bytes if original else 0),
            "spilled_arrays": current.stats.spilled + (original.stats.spilled if original else 0),
        }
        report.details["step_seconds"] = timeline
        return report


class _Steps:
    """The layers to repair, in topological order, and what to do at each."""

    def __init__(self, graph: gs.Graph, bns: list[gs.Node], found_targets: list[Target], found_fits: list[Fit]):
        self.fit = {id(f.node): f for f in found_fits}
        self.target = {id(t.node): t for t in found_targets}
        self.bn = {id(n) for n in bns} - set(self.target)
        wanted = set(self.fit) | set(self.target) | self.bn
        self.nodes = [n for n in sorted_nodes(graph) if id(n) in wanted]


def _progress(nodes: list[gs.Node], shown: bool, samples: int):
    if not shown:
        return nodes
    from tqdm import tqdm

    return tqdm(nodes, desc=f"bnrecal ({samples} images)", unit="layer", leave=False)


def _recalibrate_bn(graph: gs.Graph, bn: gs.Node, current: Sweep, original: Sweep | None, kept: dict,
                    report: Report) -> None:
    name = bn.inputs[0].name
    measured = ChannelStats.of([current.get([name])[name]], 1)
    reference = None
    if original is not None and name in original.producer:
        reference, _ = reference_stats(ChannelStats.of([original.get([name])[name]], 1), kept.get(name),
                                       len(measured.total))  # (unmapped: adaptive BN, the measured statistics)
    set_bn(graph, bn, measured, report, reference)


def _reconstruct(graph: gs.Graph, fit: Fit, current: Sweep, original: Sweep, report: Report) -> None:
    x = current.get([fit.x])[fit.x]
    y = original.get([fit.y])[fit.y]
    equations = fit.equations()
    for b, (lo, hi) in enumerate(current.calibration.bounds):
        rows, wanted = fit.rows(x[lo:hi], y[lo:hi], b)
        equations.add(rows, wanted)
    fit.solve(graph, equations, report)


def _reconstruct_head(graph: gs.Graph, fit: Fit, x: Any, y: Any, bounds: list, report: Report) -> None:
    """A dense float output head (x: its input in the current model, y: its output in the original, over the
    calibration set): its sparse logit channels re-fitted with rows weighted by the original's score
    (passes/reconstruct.py)."""
    node = fit.node
    channels = y.shape[1 if fit.layer.output_axis == 1 else -1]
    positive, count = np.zeros(channels), 0
    for b, (lo, hi) in enumerate(bounds):
        _, wanted = fit.rows(x[lo:hi], y[lo:hi], b)
        positive += np.sum(wanted > 0, axis=0)
        count += len(wanted)
    fit.channels = sparse_logit_channels(positive, count)
    if not len(fit.channels):
        report.skip(node.name, node.op, "output head without a sparse logit channel: bias-corrected only")
        return
    equations = fit.equations()
    for b, (lo, hi) in enumerate(bounds):
        rows, wanted = fit.rows(x[lo:hi], y[lo:hi], b)
        wanted = wanted[:, fit.channels]
        equations.add(rows, logit_target(wanted), logit_weights(wanted))
    fit.solve(graph, equations, report)


def _correct(graph: gs.Graph, target: Target, current: Sweep, original: Sweep, kept: dict, match_std: bool,
             report: Report) -> None:
    inputs = [t.name for n in target.nodes for t in n.inputs
              if isinstance(t, gs.Variable) and t.name and t.name not in {o.name for m in target.nodes
                                                                          for o in m.outputs}]
    current.get(inputs)
    measured = ChannelStats.of((values[0] for _, values in current.run_nodes(target.nodes, [target.tensor])),
                               target.axis)
    reference = ChannelStats.of([original.get([target.tensor])[target.tensor]], target.axis)
    correct(graph, target, measured, reference, kept, match_std, report)


def recalibrate(model: onnx.ModelProto, calibration: Any, reference: onnx.ModelProto | None = None,
                kept_channels: dict | None = None, samples: int | None = None, bias: bool = True,
                match_std: bool = True, reconstruct: bool = True) -> onnx.ModelProto:
    """Plain-function form of the pass: returns the recalibrated model (the input is not modified)."""
    from ocomp.model import to_graph, to_model
    from ocomp.pipeline import KeptChannels

    graph = to_graph(model)
    ctx = Context(options={"samples": samples or 10**9, "bias": bias, "match_std": match_std,
                           "reconstruct": reconstruct},
                  calibration=calibration, reference=reference, template=model,
                  kept_channels=KeptChannels({k: np.asarray(v) for k, v in (kept_channels or {}).items()}))
    BNRecal().run(graph, ctx)
    return to_model(graph, model)
