"""Pass `prune`: remove whole output channels of Conv/Gemm/MatMul layers and rewire every consumer.

Channel groups come from passes/channels.py (what must change together); this
module decides what to remove (importance criterion, ratios, rounding) and
rewrites the graph: weights, biases, BatchNorm parameters, per-channel
constants, Reshape/Resize targets and tensor shapes. The saved model is
physically smaller and runs in plain onnxruntime.

Channels whose output is exactly constant (all-zero weights, any bias) are
removed first and their constant contribution is folded into the bias of the
consuming Conv/Gemm/MatMul (exact; a non-zero constant is only folded into a
Conv without padding, since zero padding makes it non-constant at the borders).

Programmatic use (the stable API; `--prune-ratio auto` and bnrecal build on it)::

    analysis = channels.analyze(graph)                         # groups, by id
    result = prune_graph(graph, {"layer1.0.conv1": 0.5}, criterion="l1", multiple=8)
    result.kept["layer1.0.conv1"]                              # kept channel indices

`state["kept_channels"][tensor]` records, for every tensor whose channel axis
shrank, the kept indices relative to the original model (composed over runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ocomp.errors import UsageError
from ocomp.model import with_outputs
from ocomp.pipeline import Context, Option, Pass, Report, fraction, key_value, register

from . import channels as ch
from .autoprune import DEFAULT_RATIOS, METRICS, budget_fraction, ratio_list
from .channels import ChannelAnalysis, ChannelGroup, Consumer, analyze, attr, constant_value, input_at

CRITERIA = ("l1", "l2", "bn", "activation")


# ---------------------------------------------------------------- option types


def ratio_or_auto(value: Any) -> float | str:
    """A fraction in [0, 1), or the string "auto" (kept as "auto")."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return fraction(value)


ratio_or_auto.__name__ = "fraction|auto"


def positive_int(value: Any) -> int:
    number = int(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected a whole number, got {value!r}")
    if number < 1:
        raise ValueError(f"expected a whole number >= 1, got {value!r}")
    return number


positive_int.__name__ = "int"


# ---------------------------------------------------------------- results


@dataclass
class GroupResult:
    """What happened to one group."""

    id: str
    size: int
    kept_count: int
    ratio: float
    criterion: str
    dead_removed: int = 0
    note: str = ""


@dataclass
class PruneResult:
    """The outcome of `prune_graph`.

    kept: kept channel indices (sorted) of every group that shrank, by group id;
    groups: one GroupResult per group given a ratio; layers: per-node rows as in
    the report; dead_removed: constant channels removed (and folded);
    analysis: the channel analysis the rewrite used (stale after the rewrite).
    """

    kept: dict[str, np.ndarray] = field(default_factory=dict)
    groups: list[GroupResult] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    dead_removed: int = 0
    analysis: ChannelAnalysis | None = None


# ---------------------------------------------------------------- the pass


@register
class Prune(Pass):
    """Remove whole output channels of Conv/Gemm layers and rewire their consumers (structured pruning)."""

    name = "prune"
    options = (
        Option("ratio", ratio_or_auto, 0.3, "fraction of channels removed per channel group, or 'auto': a per-group "
               "ratio from a sensitivity scan on --calib data (Kneedle on each group's quality curve)"),
        Option("criterion", str, "l1", "channel importance: l1, l2 (weight norms), bn (|gamma| of the following "
               "BatchNorm), activation (mean |activation| on --calib data)", choices=CRITERIA),
        Option("layer", key_value(fraction), (), "ratio for the group of one layer, NAME=R (repeatable)",
               multiple=True),
        Option("skip", str, (), "leave the group of this layer unchanged (repeatable)", multiple=True),
        Option("min_channels", positive_int, 1, "never keep fewer channels than this in a group"),
        Option("multiple", positive_int, 1, "round kept channel counts up to a multiple of this (PE width)"),
        Option("dead", bool, True, "remove channels with exactly constant output first, folding them into "
               "the consumer's bias"),
        Option("target_macs", budget_fraction, None, "--prune-ratio auto: keep at most this fraction of the MACs "
               "of the model entering the pass, e.g. 0.5 (0: no target)"),
        Option("target_params", budget_fraction, None, "--prune-ratio auto: keep at most this fraction of the "
               "params (0: no target); without any target the knee ratios are used as they are"),
        Option("auto_ratios", ratio_list, DEFAULT_RATIOS, "--prune-ratio auto: candidate ratios scanned per group "
               "(comma-separated)"),
        Option("auto_samples", positive_int, 256, "--prune-ratio auto: calibration samples used by the scan"),
        Option("auto_metric", str, "cosine", "--prune-ratio auto: quality measured by the scan: cosine (of the "
               "logits vs the unpruned model), snr (dB, same), top1 (accuracy, needs labels)", choices=METRICS),
        Option("jobs", positive_int, 1, "--prune-ratio auto: processes for the sensitivity scan (one thread each)"),
        Option("plot", str, None, "--prune-ratio auto: write one PNG a group's quality curve (knee marked) into "
               "this folder (needs matplotlib: pip install ocomp[plot])"),
    )
    needs = frozenset()

    def run(self, graph: gs.Graph, ctx: Context) -> Report:
        opts = ctx.options
        report = Report(self.name)
        if opts["criterion"] == "activation" and ctx.calibration is None:
            raise UsageError("--prune-criterion activation needs calibration data: give --calib")
        if opts["ratio"] == "auto":
            from .autoprune import run_auto

            return run_auto(graph, ctx, report, lambda g: self.group_ratios(analyze(g), opts, report))
        for key in ("target_macs", "target_params", "plot"):
            if opts[key]:
                raise UsageError(f"--prune-{key.replace('_', '-')} needs --prune-ratio auto")
        analysis = analyze(graph)
        ratios = self.group_ratios(analysis, opts, report)
        prune_graph(graph, ratios, criterion=opts["criterion"], multiple=opts["multiple"],
                    min_channels=opts["min_channels"], calibration=ctx.calibration,
                    session_factory=_ctx_session_factory(ctx), state=ctx.state, report=report,
                    prune_dead=opts["dead"], export=ctx.export,
                    analysis=None if opts["criterion"] == "activation" else analysis)
        return report

    def group_ratios(self, analysis: ChannelAnalysis, opts: Mapping[str, Any],
                     report: Report) -> dict[str, float | None]:
        """Ratio per prunable group id from the options (--prune-ratio, --prune-layer, --prune-skip)."""
        skipped = {g.id for name in opts["skip"] for g in [_group_named(analysis, name, "--prune-skip")]}
        overrides: dict[str, tuple[str, float]] = {}
        for name, value in opts["layer"]:
            g = _group_named(analysis, name, "--prune-layer")
            if g.id in overrides and overrides[g.id][1] != value:
                other = overrides[g.id][0]
                raise UsageError(f"--prune-layer: '{name}' and '{other}' share one channel group ('{g.id}', they "
                                 f"must keep the same channels); give one ratio for it")
            overrides[g.id] = (name, value)
        ratios: dict[str, float] = {}
        for g in analysis.groups:
            if g.id in skipped:
                report.skip(g.id, "group", f"group '{g.id}' ({g.size} channels) skipped by --prune-skip")
                continue
            if g.pinned:
                continue
            # auto: None marks the groups to scan (--prune-layer overrides are kept as given)
            ratios[g.id] = overrides[g.id][1] if g.id in overrides else (
                None if opts["ratio"] == "auto" else float(opts["ratio"]))
        return ratios


def _group_named(analysis: ChannelAnalysis, name: str, flag: str) -> ChannelGroup:
    try:
        return analysis.group(name)
    except KeyError:
        pass
    group = analysis.group_of_node(name)
    if group is None:
        known = [g.id for g in analysis.groups]
        sample = ", ".join(known[:6]) + (", ..." if len(known) > 6 else "")
        raise UsageError(f"{flag}: no Conv/Gemm/MatMul layer or channel group named '{name}' (groups: {sample})")
    return group


def _ctx_session_factory(ctx: Context) -> Callable[[onnx.ModelProto], Any]:
    def factory(model: onnx.ModelProto):
        try:
            return ctx.session(model)
        except (ImportError, AttributeError):  # the custom-op runtime is not built: plain onnxruntime suffices
            return _plain_session(model)

    return factory


def _plain_session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _default_export(graph: gs.Graph) -> onnx.ModelProto:
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    return onnx.shape_inference.infer_shapes(model)


# ---------------------------------------------------------------- prune_graph


def prune_graph(graph: gs.Graph, ratios: Mapping[str, float], criterion: str = "l1", multiple: int = 1,
                min_channels: int = 1, calibration: Any = None,
                session_factory: Callable[[onnx.ModelProto], Any] | None = None,
                state: dict | None = None, report: Report | None = None, prune_dead: bool = True,
                export: Callable[[gs.Graph], onnx.ModelProto] | None = None,
                analysis: ChannelAnalysis | None = None) -> PruneResult:
    """Prune the groups named in `ratios` (group id -> fraction of channels removed) in place.

    criterion: "l1" | "l2" | "bn" | "activation" (needs `calibration`: an
    ocomp.data.Dataset, or an iterable of feed dicts; run with
    `session_factory(model)`, default plain onnxruntime, on `export(graph)`).
    The kept count of a group is C - round(ratio * C) (at least C - dead channels
    when `prune_dead`), rounded up to a multiple of `multiple` (capped at C), and
    at least `min_channels`. Pinned groups and groups absent from `ratios` are
    left unchanged. The graph must carry inferred shapes. `state` gets
    "kept_channels"; `report` (an ocomp Report) gets per-layer rows, pinned
    groups and details. `analysis` may be passed when freshly computed on `graph`.
    """
    if criterion not in CRITERIA:
        raise UsageError(f"unknown prune criterion '{criterion}'; valid: {', '.join(CRITERIA)}")
    if multiple < 1 or min_channels < 1:
        raise UsageError("--prune-multiple and --prune-min-channels must be >= 1")
    activations = None
    if criterion == "activation":
        if calibration is None:
            raise UsageError("--prune-criterion activation needs calibration data: give --calib")
        model = (export or _default_export)(graph)
        analysis = analyze(graph)
        activations = _activation_scores(model, analysis, ratios, calibration, session_factory or _plain_session)
    elif analysis is None:
        analysis = analyze(graph)
    for gid, ratio in ratios.items():
        try:
            analysis.group(gid)
        except KeyError:
            raise UsageError(f"prune: no channel group '{gid}'") from None
        if not 0.0 <= float(ratio) < 1.0:
            raise UsageError(f"prune: ratio {ratio} for group '{gid}' is not a fraction in [0, 1)")

    result = PruneResult(analysis=analysis)
    values = _constant_channels(graph, analysis) if prune_dead else {}
    folds: list[tuple[ChannelGroup, np.ndarray]] = []
    for group in analysis.groups:
        if group.id not in ratios:
            continue
        ratio = float(ratios[group.id])
        if group.pinned:
            result.groups.append(GroupResult(group.id, group.size, group.size, ratio, "none (group pinned)",
                                             note=f"pinned: {group.pinned}"))
            continue
        dead = _dead_channels(group, analysis, values) if values else np.zeros(group.size, dtype=bool)
        scores, used, note = _scores(group, analysis, criterion, activations)
        kept = select_channels(scores, dead, ratio, multiple, min_channels)
        removed_dead = np.setdiff1d(np.flatnonzero(dead), kept)
        result.groups.append(GroupResult(group.id, group.size, len(kept), ratio, used, len(removed_dead), note))
        if len(kept) < group.size:
            result.kept[group.id] = kept
        if len(removed_dead):
            folds.append((group, removed_dead))
            result.dead_removed += len(removed_dead)

    rewriter = _Rewriter(graph, analysis)
    before = rewriter.snapshot()
    for group, removed in folds:
        rewriter.fold_constant_channels(group, removed, values)
    indices = rewriter.apply(result.kept)
    result.layers = rewriter.layer_rows(before, result, criterion)

    if state is not None and indices:
        kept_channels = state.setdefault("kept_channels", {})
        for name, idx in indices.items():
            previous = kept_channels.get(name)
            kept_channels[name] = np.asarray(previous)[idx] if previous is not None else idx
    if report is not None:
        _fill_report(report, analysis, result, criterion)
    return result


def select_channels(scores: np.ndarray, dead: np.ndarray, ratio: float, multiple: int = 1,
                    min_channels: int = 1) -> np.ndarray:
    """Sorted indices of the channels to keep: dead ones go first, then the lowest scores."""
    size = len(scores)
    remove = int(math.floor(ratio * size + 0.5))
    keep = size - max(remove, int(dead.sum()))
    if multiple > 1:
        keep = min(size, int(math.ceil(keep / multiple)) * multiple)
    keep = min(size, max(keep, min_channels))
    # lexsort: last key first -> dead (False sorts first) then ascending score then index
    order = np.lexsort((np.arange(size), np.asarray(scores, dtype=np.float64), ~dead))
    return np.sort(order[size - keep:])


# ---------------------------------------------------------------- importance


def _normalized(score: np.ndarray) -> np.ndarray:
    score = np.asarray(score, dtype=np.float64)
    mean = score.mean() if score.size else 0.0
    return score / mean if mean > 0 else score


def _weight_scores(consumer: Consumer, p: int) -> np.ndarray:
    node = consumer.node
    w = np.abs(np.asarray(constant_value(input_at(node, 1)), dtype=np.float64))
    if consumer.kind == ch.CONV_OUT:
        w = w.reshape(w.shape[0], -1)
    elif consumer.kind == ch.GEMM_OUT:
        w = w if attr(node, "transB", 0) else w.T
    else:  # MATMUL_OUT
        w = w.T
    return w.sum(axis=1) if p == 1 else np.sqrt((w ** 2).sum(axis=1))


def _scores(group: ChannelGroup, analysis: ChannelAnalysis, criterion: str,
            activations: dict[str, np.ndarray] | None) -> tuple[np.ndarray, str, str]:
    """Importance of each channel of `group` (the sum over its members of their normalized
    scores), the criterion actually used and a note saying why it differs from `criterion`."""
    producers = [c for c in group.consumers if c.kind in ch.PRODUCER_KINDS]
    total = np.zeros(group.size)
    note = ""
    if criterion == "bn":
        norms = [c for c in group.consumers if c.kind == ch.NORM and c.node.op == "BatchNormalization"]
        for c in norms:
            gamma = np.abs(np.asarray(constant_value(input_at(c.node, 1)), dtype=np.float64))
            total += _normalized(gamma[analysis.position_matrix(c.tensor, group.id)].mean(axis=1))
        if norms:
            return total, criterion, note
        criterion, note = "l1", "no BatchNormalization in the group: l1 used"
    if criterion == "activation":
        for c in producers:
            total += _normalized(activations[c.tensor])
        return total, criterion, note
    for c in producers:
        total += _normalized(_weight_scores(c, 1 if criterion == "l1" else 2))
    return total, criterion, note


def _iter_feeds(calibration: Any) -> Iterable[dict[str, np.ndarray]]:
    if isinstance(calibration, Mapping):
        yield dict(calibration)
        return
    batches = calibration.batches() if hasattr(calibration, "batches") else calibration
    for item in batches:
        yield item[0] if isinstance(item, tuple) else item


def _activation_scores(model: onnx.ModelProto, analysis: ChannelAnalysis, ratios: Mapping[str, float],
                       calibration: Any, session_factory: Callable) -> dict[str, np.ndarray]:
    """Mean |activation| per channel of every producer output of the groups to prune, on the calibration data."""
    wanted = {}
    for gid in ratios:
        group = analysis.group(gid)
        if group.pinned:
            continue
        for c in group.consumers:
            if c.kind in ch.PRODUCER_KINDS:
                wanted[c.tensor] = analysis.layouts[c.tensor].axis
    session = session_factory(with_outputs(model, wanted))
    input_names = {i.name for i in session.get_inputs()}
    names = list(wanted)
    sums = {n: None for n in names}
    count = 0
    for feeds in _iter_feeds(calibration):
        outs = session.run(names, {k: v for k, v in feeds.items() if k in input_names})
        for n, out in zip(names, outs):
            axis = wanted[n]
            reduce = tuple(i for i in range(out.ndim) if i != axis)
            part = np.abs(out.astype(np.float64)).mean(axis=reduce) * out.shape[0]
            sums[n] = part if sums[n] is None else sums[n] + part
        count += next(iter(outs)).shape[0] if outs else 0
    if count == 0:
        raise UsageError("--prune-criterion activation: the calibration data is empty")
    return {n: s / count for n, s in sums.items()}


# ---------------------------------------------------------------- constant (dead) channels


def _vec(values: dict, analysis: ChannelAnalysis, tensor: gs.Tensor) -> np.ndarray:
    v = values.get(tensor.name)
    if v is None:
        v = np.full(analysis.layouts[tensor.name].total, np.nan, dtype=np.float32)
    return v


def _channel_vector(value: np.ndarray, axis: int, total: int) -> np.ndarray:
    """A constant broadcast against a tracked tensor as a per-channel vector (NaN if it varies elsewhere)."""
    value = np.asarray(value, dtype=np.float32)
    if value.size == 1:
        return np.full(total, value.reshape(-1)[0], dtype=np.float32)
    if axis < 0 or any(d != 1 for i, d in enumerate(value.shape) if i != axis) or value.shape[axis] != total:
        return np.full(total, np.nan, dtype=np.float32)
    return value.reshape(-1)


def _has_padding(node: gs.Node) -> bool:
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return True
    return any(int(p) != 0 for p in attr(node, "pads", []) or [])


def _unary(node: gs.Node, x: np.ndarray, cache: dict) -> np.ndarray | None:
    op = node.op
    with np.errstate(all="ignore"):
        if op in ("Identity", "Dropout"):
            return x
        if op == "Relu":
            return np.maximum(x, np.float32(0))
        if op == "LeakyRelu":
            return np.where(x >= 0, x, np.float32(attr(node, "alpha", 0.01)) * x)
        if op == "Clip":
            lo_t, hi_t = input_at(node, 1), input_at(node, 2)
            lo = constant_value(lo_t, cache) if lo_t is not None else attr(node, "min", -np.inf)
            hi = constant_value(hi_t, cache) if hi_t is not None else attr(node, "max", np.inf)
            return np.minimum(np.maximum(x, np.float32(lo)), np.float32(hi))
        if op == "Sigmoid":
            return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)
        if op == "HardSigmoid":
            a, b = np.float32(attr(node, "alpha", 0.2)), np.float32(attr(node, "beta", 0.5))
            return np.clip(a * x + b, 0, 1).astype(np.float32)
        if op == "HardSwish":
            return (x * np.clip(x / np.float32(6) + np.float32(0.5), 0, 1)).astype(np.float32)
        if op == "Tanh":
            return np.tanh(x)
        if op == "Abs":
            return np.abs(x)
        if op == "Neg":
            return -x
    return None


def _propagate(node: gs.Node, analysis: ChannelAnalysis, values: dict, cache: dict) -> np.ndarray | None:
    """Per-channel constant value of `node`'s output (NaN where not exactly constant), or None if unknown."""
    y = node.outputs[0]
    total = analysis.layouts[y.name].total
    op = node.op
    first = node.inputs[0] if node.inputs else None
    x = _vec(values, analysis, first) if first is not None and first.name in analysis.layouts else None
    if op in ("Conv", "Gemm", "MatMul"):
        w = np.asarray(constant_value(input_at(node, 1), cache), dtype=np.float32)
        if op == "Conv" and int(attr(node, "group", 1)) > 1:
            if x is None or w.shape[1] != 1:
                return None
            b = input_at(node, 2)
            bias = np.asarray(constant_value(b, cache), dtype=np.float32) if b is not None else np.zeros(total, np.float32)
            out = x * w.reshape(total, -1).sum(axis=1) + bias
            return np.where(x == 0, bias, np.nan).astype(np.float32) if _has_padding(node) else out
        if op == "Conv":
            zero = ~w.reshape(w.shape[0], -1).any(axis=1)
            b = input_at(node, 2)
            bias = np.asarray(constant_value(b, cache), dtype=np.float32) if b is not None else np.zeros(total, np.float32)
        elif op == "Gemm":
            zero = ~(w if attr(node, "transB", 0) else w.T).any(axis=1)
            c = input_at(node, 2)
            beta = np.float32(attr(node, "beta", 1.0))
            bias = (beta * np.broadcast_to(np.asarray(constant_value(c, cache), dtype=np.float32).reshape(-1), (total,))
                    if c is not None else np.zeros(total, np.float32))
        else:
            zero = ~w.T.any(axis=1)
            bias = np.zeros(total, np.float32)
        return np.where(zero, bias, np.nan).astype(np.float32)
    if x is None:
        return None
    if op == "BatchNormalization":
        gamma, beta, mean, var = (np.asarray(constant_value(input_at(node, i), cache), dtype=np.float32)
                                  for i in range(1, 5))
        eps = np.float32(attr(node, "epsilon", 1e-5))
        return ((x - mean) / np.sqrt(var + eps) * gamma + beta).astype(np.float32)
    if op == "InstanceNormalization":
        return np.where(np.isfinite(x), np.asarray(constant_value(input_at(node, 2), cache), np.float32), np.nan)
    if op in ch.UNARY_OPS:
        return _unary(node, x, cache)
    if op in ch.BINARY_OPS:
        lay = analysis.layouts[y.name]
        ry = len(y.shape) if y.shape is not None else None
        vecs = []
        for t in node.inputs:
            if t.name in analysis.layouts:
                vecs.append(_vec(values, analysis, t))
                continue
            value = constant_value(t, cache)
            if value is None or ry is None:
                vecs.append(np.full(total, np.nan, np.float32))
            else:
                vecs.append(_channel_vector(value, lay.axis - (ry - value.ndim), total))
        with np.errstate(all="ignore"):
            if op == "Add" or op == "Sum":
                out = np.sum(vecs, axis=0, dtype=np.float32) if op == "Sum" else vecs[0] + vecs[1]
            elif op == "Sub":
                out = vecs[0] - vecs[1]
            elif op == "Mul":
                out = vecs[0] * vecs[1]
                out = np.where((vecs[0] == 0) | (vecs[1] == 0), np.float32(0), out)
            elif op == "Div":
                out = vecs[0] / vecs[1]
            elif op == "Max":
                out = np.max(vecs, axis=0)
            elif op == "Min":
                out = np.min(vecs, axis=0)
            elif op == "PRelu":
                out = np.where(vecs[0] >= 0, vecs[0], vecs[0] * vecs[1])
            else:
                return None
        return out.astype(np.float32)
    if op in ("MaxPool", "GlobalMaxPool", "GlobalAveragePool", "ReduceMean", "ReduceMax", "ReduceMin",
              "Transpose", "Squeeze", "Unsqueeze", "Slice", "Resize", "Upsample"):
        return x
    if op == "AveragePool":
        if attr(node, "count_include_pad", 0) and _has_padding(node):
            return np.where(x == 0, x, np.nan)
        return x
    if op == "Pad":
        mode = attr(node, "mode", "constant")
        if mode != "constant":
            return x
        pad_t = input_at(node, 2)
        pad_value = constant_value(pad_t, cache) if pad_t is not None else attr(node, "value", 0.0)
        if pad_value is None:
            return None
        return np.where(x == np.float32(np.asarray(pad_value).reshape(-1)[0]), x, np.nan)
    if op in ("Flatten", "Reshape"):
        in_lay, out_lay = analysis.layouts[first.name], analysis.layouts[y.name]
        block = out_lay.segments[0].block if out_lay.segments else 1
        return np.repeat(x, block) if out_lay.blocked() and not in_lay.blocked() else x
    if op == "Concat":
        lay = analysis.layouts[y.name]
        parts = []
        for t in node.inputs:
            if t.name in analysis.layouts and analysis.layouts[t.name].axis == lay.axis:
                parts.append(_vec(values, analysis, t))
            else:
                size = t.shape[lay.axis] if t.shape is not None else 0
                parts.append(np.full(int(size), np.nan, np.float32))
        out = np.concatenate(parts)
        if len(out) != total:  # concatenated along another axis: constant only where every input agrees
            vecs = [_vec(values, analysis, t) for t in node.inputs]
            return np.where(np.all([v == vecs[0] for v in vecs], axis=0), vecs[0], np.nan)
        return out
    return None


def _constant_channels(graph: gs.Graph, analysis: ChannelAnalysis) -> dict[str, np.ndarray]:
    """Per tracked tensor: the exact constant value of each channel (NaN where not constant).

    Empty when no producer has an all-zero output channel (the only source of constant channels).
    """
    cache: dict = {}
    sources = False
    for action in analysis.actions:
        if action.kind in ch.PRODUCER_KINDS:
            w = constant_value(input_at(action.node, 1), cache)
            if action.kind == ch.CONV_OUT:
                rows = w.reshape(w.shape[0], -1)
            elif action.kind == ch.GEMM_OUT:
                rows = w if attr(action.node, "transB", 0) else w.T
            else:
                rows = w.T
            if not rows.any(axis=1).all():
                sources = True
                break
    if not sources:
        return {}
    values: dict[str, np.ndarray] = {}
    for node in graph.nodes:  # analyze() sorted them
        if not node.outputs or node.outputs[0].name not in analysis.layouts:
            continue
        try:
            value = _propagate(node, analysis, values, cache)
        except (ValueError, TypeError, IndexError):
            value = None
        total = analysis.layouts[node.outputs[0].name].total
        if value is None or np.shape(value) != (total,):
            value = np.full(total, np.nan, np.float32)
        values[node.outputs[0].name] = value
    return values


def _matmul_bias_add(node: gs.Node) -> tuple[gs.Node, int] | None:
    """The Add right after a MatMul whose other operand is a constant bias over the last axis."""
    y = node.outputs[0]
    if len(y.outputs) != 1 or y.outputs[0].op != "Add":
        return None
    add = y.outputs[0]
    for i, t in enumerate(add.inputs):
        if t is not y:
            value = constant_value(t)
            n = constant_value(input_at(node, 1)).shape[1]
            if value is not None and value.size == n and value.shape[-1] == n:
                return add, i
    return None


def _dead_channels(group: ChannelGroup, analysis: ChannelAnalysis, values: dict) -> np.ndarray:
    """Channels of `group` that are exactly constant wherever they are summed away, and can be folded there."""
    exits = [c for c in group.consumers if c.kind in ch.EXIT_KINDS]
    if not exits:
        return np.zeros(group.size, dtype=bool)
    dead = np.ones(group.size, dtype=bool)
    for c in exits:
        vals = values[c.tensor][analysis.position_matrix(c.tensor, group.id)]
        ok = np.isfinite(vals).all(axis=1)
        zero = (vals == 0).all(axis=1)
        if c.kind == ch.CONV_IN and _has_padding(c.node):
            ok &= zero
        elif c.kind == ch.GEMM_IN:
            beta = float(attr(c.node, "beta", 1.0))
            if input_at(c.node, 2) is not None and beta == 0:
                ok &= zero
        elif c.kind == ch.MATMUL_IN and _matmul_bias_add(c.node) is None:
            ok &= zero
        dead &= ok
    return dead


# ---------------------------------------------------------------- rewriting


class _Rewriter:
    def __init__(self, graph: gs.Graph, analysis: ChannelAnalysis):
        self.graph = graph
        self.analysis = analysis
        self.names = set(analysis.tensors)
        self.touched: dict[int, gs.Node] = {}
        self.out_shapes: dict[str, list] = {}

    # constants
    def _set(self, node: gs.Node, index: int, value: np.ndarray) -> None:
        tensor = node.inputs[index]
        value = np.ascontiguousarray(value)
        if isinstance(tensor, gs.Constant) and len(tensor.outputs) == 1:
            tensor.values = value
            return
        base = f"{tensor.name}.pruned" if tensor.name else f"{node.name}.param{index}"
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        node.inputs[index] = gs.Constant(name, value)

    def _value(self, node: gs.Node, index: int) -> np.ndarray:
        return np.asarray(constant_value(input_at(node, index)))

    def _take(self, node: gs.Node, index: int, idx: np.ndarray, axis: int) -> None:
        if input_at(node, index) is None:
            return
        value = self._value(node, index)
        if value.ndim == 0 or value.shape[axis] == 1:
            return  # broadcast along the channel axis (only shrinking axes of >= 2 channels get here)
        self._set(node, index, np.take(value, idx, axis=axis))

    def _add_bias(self, node: gs.Node, index: int, delta: np.ndarray, dtype) -> None:
        current = input_at(node, index)
        if current is None:
            if len(node.inputs) != index:
                raise ValueError(f"cannot add a bias to {node.op} '{node.name}'")
            base = f"{node.name or node.outputs[0].name}.bias"
            name, i = base, 1
            while name in self.names:
                name, i = f"{base}_{i}", i + 1
            self.names.add(name)
            node.inputs.append(gs.Constant(name, delta.astype(dtype)))
            return
        value = self._value(node, index)
        shape = value.shape
        full = np.broadcast_to(value.reshape(-1) if value.size > 1 else value.reshape(()), delta.shape)
        new = (full.astype(np.float64) + delta).astype(value.dtype)
        self._set(node, index, new.reshape(shape) if value.size == delta.size else new)

    def fold_constant_channels(self, group: ChannelGroup, removed: np.ndarray, values: dict) -> None:
        """Add the constant contribution of removed dead channels to each consumer's bias."""
        for c in group.consumers:
            if c.kind not in ch.EXIT_KINDS:
                continue
            pos = self.analysis.position_matrix(c.tensor, group.id, removed).ravel()
            vals = values[c.tensor][pos].astype(np.float64)
            if not vals.any():
                continue
            node = c.node
            w = self._value(node, 1).astype(np.float64)
            self.touched[id(node)] = node
            if c.kind == ch.CONV_IN:
                delta = np.einsum("ocs,c->o", w[:, pos].reshape(w.shape[0], len(pos), -1), vals)
                self._add_bias(node, 2, delta, w.dtype if w.dtype != np.float64 else np.float32)
            elif c.kind == ch.GEMM_IN:
                rows = w[:, pos].T if attr(node, "transB", 0) else w[pos, :]
                delta = float(attr(node, "alpha", 1.0)) * (vals @ rows)
                if input_at(node, 2) is None:
                    node.attrs["beta"] = 1.0
                else:
                    delta = delta / float(attr(node, "beta", 1.0))
                self._add_bias(node, 2, delta, np.float32)
            else:
                add, index = _matmul_bias_add(node)
                self.touched[id(add)] = add
                self._add_bias(add, index, vals @ w[pos, :], np.float32)

    def apply(self, kept: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Slice every action by the kept indices of its tensor; returns those indices by tensor name."""
        if not kept:
            return {}
        indices: dict[str, np.ndarray] = {}
        for name in self.analysis.layouts:
            idx = self.analysis.kept_indices(name, kept)
            if idx is not None:
                indices[name] = idx
        for c in self.analysis.actions:
            idx = indices.get(c.tensor)
            if idx is None:
                continue
            node = c.node
            self.touched[id(node)] = node
            if c.kind == ch.CONV_OUT:
                self._take(node, 1, idx, 0)
                self._take(node, 2, idx, 0)
            elif c.kind == ch.GEMM_OUT:
                self._take(node, 1, idx, 0 if attr(node, "transB", 0) else 1)
                self._take(node, 2, idx, -1)
            elif c.kind == ch.MATMUL_OUT:
                self._take(node, 1, idx, 1)
            elif c.kind == ch.CONV_IN:
                self._take(node, 1, idx, 1)
            elif c.kind == ch.GEMM_IN:
                self._take(node, 1, idx, 1 if attr(node, "transB", 0) else 0)
            elif c.kind == ch.MATMUL_IN:
                self._take(node, 1, idx, 0)
            elif c.kind == ch.DEPTHWISE:
                self._take(node, 1, idx, 0)
                self._take(node, 2, idx, 0)
                node.attrs["group"] = int(len(idx))
            elif c.kind == ch.NORM:
                for i in range(1, len(node.inputs)):
                    self._take(node, i, idx, 0)
            elif c.kind == ch.CONST:
                self._take(node, c.index, idx, c.axis)
            elif c.kind in (ch.RESHAPE, ch.RESIZE):
                value = self._value(node, c.index).copy()
                value[c.axis] = len(idx)
                self._set(node, c.index, value)
        for name, idx in indices.items():
            tensor = self.analysis.tensors.get(name)
            if isinstance(tensor, gs.Variable) and tensor.shape is not None:
                shape = list(tensor.shape)
                shape[self.analysis.layouts[name].axis] = int(len(idx))
                tensor.shape = shape
        return indices

    # report
    def snapshot(self) -> dict[int, tuple]:
        """Weight shapes, params and MACs of every node an action may touch (before the rewrite)."""
        nodes = {id(c.node): c.node for c in self.analysis.actions}
        for c in self.analysis.actions:
            if c.kind == ch.MATMUL_IN:
                found = _matmul_bias_add(c.node)
                if found:
                    nodes[id(found[0])] = found[0]
        return {key: _node_stats(node) for key, node in nodes.items()}

    def layer_rows(self, before: dict[int, tuple], result: PruneResult, criterion: str) -> list[dict]:
        rows = []
        group_of_out: dict[int, str] = {}
        for producers_first in (True, False):
            for g in self.analysis.groups:
                for c in g.consumers:
                    if (c.kind in ch.PRODUCER_KINDS) == producers_first:
                        group_of_out.setdefault(id(c.node), g.id)
        for key, node in self.touched.items():
            if key not in before:
                continue
            b, a = before[key], _node_stats(node)
            if b == a:
                continue
            rows.append(dict(name=node.name or node.outputs[0].name, op=node.op, before=b[0], after=a[0],
                             out_before=b[1], out_after=a[1], in_before=b[2], in_after=a[2],
                             params_before=b[3], params_after=a[3], macs_before=b[4], macs_after=a[4],
                             group=group_of_out.get(key, ""), criterion=criterion))
        return rows


def _numel(dims: Iterable) -> int:
    return int(np.prod([d if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in dims], dtype=np.int64))


def _node_stats(node: gs.Node) -> tuple:
    """(weight shape, out channels, in channels, params, MACs at batch 1) of a node."""
    consts = [v for v in (constant_value(input_at(node, i)) for i in range(1, len(node.inputs)))
              if v is not None and np.issubdtype(v.dtype, np.floating)]
    params = sum(int(v.size) for v in consts)
    out = node.outputs[0].shape or []
    macs = 0
    w = input_at(node, 1)
    if node.op in ("Conv", "Gemm", "MatMul") and isinstance(w, gs.Constant):
        shape = list(w.shape)
        if node.op == "Conv":
            macs = _numel(out[1:]) * _numel(shape[1:])
            cout, cin = shape[0], shape[1] * int(attr(node, "group", 1))
        elif node.op == "Gemm":
            trans = attr(node, "transB", 0)
            cout, cin = (shape[0], shape[1]) if trans else (shape[1], shape[0])
            macs = _numel(out[1:]) * cin
        else:
            cout, cin = shape[1], shape[0]
            macs = _numel(out[1:]) * cin
        return shape, cout, cin, params, macs
    size = int(consts[0].shape[0]) if consts and len(consts[0].shape) else 0
    return [size], size, size, params, 0


def _fill_report(report: Report, analysis: ChannelAnalysis, result: PruneResult, criterion: str) -> None:
    used = {g.id: g.criterion for g in result.groups}  # bn falls back to l1 in groups without a BN
    for row in result.layers:
        note = (f"out {row['out_before']}->{row['out_after']}, in {row['in_before']}->{row['in_after']}; "
                f"group {row['group']}; criterion {used.get(row['group'], 'none (group unchanged)')}")
        report.change(row["name"], row["op"], row["before"], row["after"], row["params_before"],
                      row["params_after"], row["macs_before"], row["macs_after"], note)
    pinned = []
    for g in analysis.groups:
        if not g.pinned:
            continue
        pinned.append(dict(group=g.id, size=g.size, reasons=[dict(node=n, op=op, reason=why)
                                                             for n, op, why in g.pinned_by]))
        for name, op, why in g.pinned_by:
            report.skip(name or g.id, op, f"group '{g.id}' ({g.size} channels) left unchanged: {why}")
    report.details.update(
        criterion=criterion,
        dead_channels_removed=result.dead_removed,
        groups=[dict(id=g.id, channels_before=g.size, channels_after=g.kept_count, ratio=g.ratio,
                     dead_removed=g.dead_removed, criterion=g.criterion, note=g.note) for g in result.groups],
        pinned_groups=pinned,
        layers=[{k: v for k, v in row.items()} for row in result.layers],
    )
