"""Pass `w2a8`: 8-bit activations for the ternary ops (W2A8), calibrated on the compressed model's real inputs.

The runtime's ternary ops (runtime/w2a8.h) quantize their float input to uint8 with one per-tensor scale s
and zero point z (attributes act_scale / act_zero_point) and sum the codes under the ternary weights in
int32; act_quant="dynamic" takes s and z from each run's min/max instead. This pass chooses s and z for
every ternary op from the calibration data:

* One `ocomp.sweep.Sweep` walks the compressed graph in topological order; each ternary op's input is taken
  as the model computes it with every earlier op already quantized (so later ops are calibrated on the
  activations they will really get).
* Candidate ranges per tensor, from a fine histogram of its values: min/max, percentiles, and the range
  minimizing the quantization MSE of the input itself (a grid over the upper bound, and over the lower bound
  too when the input has negative values; the zero point makes any range asymmetric, and a non-negative
  input gets z = 0).
* `--w2a8-method auto` (the default) runs the op on the calibration inputs once per candidate and keeps the
  one with the least mean squared error of the op's *output* (after its fused activation) against the same
  op with float activations; the other methods take one candidate kind as is.
* Bias correction (on by default): once an op's range is set, its bias is corrected so that each output
  channel's mean before the fused activation equals the float-activation model's at the same tensor (a
  second sweep runs the model as it was before this pass); this removes the mean shift that clipping and
  the quantization of earlier ops leave (PP-OCR cls: 0.50 pt -> 0.25 pt cost, benchmarks/W2A8.md).
* A following Relu (or a Clip with constant bounds) is fused into the op (`activation` attribute), so the
  output error is measured where it matters and the model saves a pass over memory.
* int8 chaining (`--w2a8-chain`, last): a TernaryConv read by another static group-1 TernaryConv writes that
  reader's uint8 codes (its act_scale / act_zero_point) in the pixel-major, channel-padded layout the reader
  sums over ("nhwc_c4", output 1 uint8 [N, OH, OW, round4(K)]), so the reader neither quantizes nor
  reorders; bit-exact. By default only where nothing else reads the float output and the producer has no
  residual input (ResNet-20: each block's conv1 -> conv2; 0.95-0.96x the unchained latency for
  ternary+bnrecal and prune multiple 8, about 1.0x at prune multiple 1); 'all' also keeps the float output
  for other readers (measured no faster).

Without calibration data every ternary op gets act_quant="dynamic" (scale and zero point from each run's
input min/max; slower and usually less accurate than calibrated static ranges), and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ocomp.graph import CUSTOM_DOMAIN, constant_value, input_at, is_graph_output, is_standard, sorted_nodes
from ocomp.layers import TERNARY_OPS, layer_of
from ocomp.pipeline import Context, Option, Pass, Report, mebibytes, positive_int, register
from ocomp.sweep import DEFAULT_BUDGET, Calibration, Sweep

from .bnstats import ChannelStats, Target, correct

ACT_ATTRS = ("act_quant", "act_scale", "act_zero_point")
FUSED_ATTRS = ("activation", "clip_min", "clip_max")
BINS = 4096  # histogram bins over [min, max] of a tensor
GRID = 128  # candidate upper (and lower) bounds of the MSE search
METHODS = ("auto", "mse", "percentile", "minmax")
CHAIN_MODES = ("on", "all", "off")


def percent(value) -> float:
    """Option type: a percentile in (50, 100]."""
    number = float(value)
    if not 50 < number <= 100:
        raise ValueError(f"expected a percentile in (50, 100], got {value!r}")
    return number


percent.__name__ = "percentile"


@dataclass(frozen=True)
class Candidate:
    """One way to quantize a tensor: uint8 code = clamp(round(x / scale) + zero_point, 0, 255)."""

    method: str
    scale: float
    zero_point: int

    @property
    def range(self) -> tuple[float, float]:
        return (-self.zero_point * self.scale, (255 - self.zero_point) * self.scale)


def quant_params(lo: float, hi: float) -> tuple[float, int]:
    """(float32 scale, zero point) of the uint8 range covering [min(lo, 0), max(hi, 0)] (zero exactly
    representable); a range of width 0 gets scale 1."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = float(np.float32((hi - lo) / 255.0))
    if not scale > 0 or not math.isfinite(scale):
        return 1.0, 0
    zero_point = int(np.clip(np.rint(-lo / scale), 0, 255))
    return scale, zero_point


class Histogram:
    """Counts of a tensor's values in BINS equal bins over [min, max], filled batch by batch."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = float(lo), float(hi)
        if not self.hi > self.lo:
            self.hi = self.lo + 1e-12
        self.counts = np.zeros(BINS, np.float64)

    def add(self, values: np.ndarray) -> None:
        self.counts += np.histogram(values, bins=BINS, range=(self.lo, self.hi))[0]

    @property
    def centers(self) -> np.ndarray:
        edges = np.linspace(self.lo, self.hi, BINS + 1)
        return (edges[:-1] + edges[1:]) / 2

    def percentile(self, p: float) -> float:
        """Upper edge of the bin where the cumulative count reaches p percent."""
        cumulative = np.cumsum(self.counts)
        index = int(np.searchsorted(cumulative, cumulative[-1] * p / 100.0))
        return float(np.linspace(self.lo, self.hi, BINS + 1)[min(index + 1, BINS)])

    def mse(self, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
        """Quantization MSE of the counted values for each (scale, zero point) pair (values at bin centres)."""
        x = self.centers[None, :]
        s, z = scale[:, None], zero_point[:, None]
        q = np.clip(np.rint(x / s) + z, 0, 255)
        err = ((q - z) * s - x) ** 2
        return (err * self.counts[None, :]).sum(axis=1) / max(self.counts.sum(), 1.0)


def candidates(hist: Histogram, method: str, pct: float) -> list[Candidate]:
    """The candidate quantizations of one tensor for `method` (auto: all kinds)."""
    found: list[Candidate] = []
    if method in ("auto", "minmax"):
        found.append(Candidate("minmax", *quant_params(hist.lo, hist.hi)))
    if method in ("auto", "percentile"):
        for p in ((99.9, 99.99, 99.999) if method == "auto" else (pct,)):
            hi = hist.percentile(p) if hist.hi > 0 else 0.0
            lo = hist.percentile(100.0 - p) if hist.lo < 0 else 0.0
            found.append(Candidate(f"percentile {p:g}", *quant_params(min(lo, 0.0), max(hi, 0.0))))
    if method in ("auto", "mse"):
        found.append(mse_candidate(hist))
    unique: dict[tuple[float, int], Candidate] = {}
    for c in found:
        unique.setdefault((c.scale, c.zero_point), c)
    return list(unique.values())


def mse_candidate(hist: Histogram) -> Candidate:
    """The range minimizing the input's quantization MSE: a grid of GRID fractions of the upper bound, and of
    the lower bound as well when the tensor has negative values."""
    fractions = np.linspace(1.0 / GRID, 1.0, GRID)
    his = fractions * max(hist.hi, 0.0)
    los = fractions * min(hist.lo, 0.0) if hist.lo < 0 else np.zeros(1)
    pairs = [(lo, hi) for lo in los for hi in his if hi - lo > 0]
    if not pairs:
        return Candidate("mse", 1.0, 0)
    params = [quant_params(lo, hi) for lo, hi in pairs]
    scale = np.array([p[0] for p in params], np.float64)
    zero = np.array([p[1] for p in params], np.float64)
    errors = hist.mse(scale, zero)
    best = int(np.argmin(errors))
    return Candidate("mse", float(scale[best]), int(zero[best]))


@register
class W2A8(Pass):
    """8-bit activations for the ternary ops (W2A8): per-tensor input scale/zero point from calibration data
    (else dynamic)."""

    name = "w2a8"
    options = (
        Option("samples", positive_int, 256, "calibration samples used (the first N of --calib)"),
        Option("method", str, "auto", "how each ternary op's input range is chosen: 'auto' (per tensor, the "
               "candidate - min/max, percentiles 99.9/99.99/99.999, input-MSE-optimal - whose op output is "
               "closest to the float-activation op's on the calibration data), 'mse' (least input "
               "quantization MSE), 'percentile' (--w2a8-percentile), 'minmax'", choices=METHODS),
        Option("percentile", percent, 99.99, "the percentile of --w2a8-method percentile"),
        Option("dynamic", bool, False, "no calibration: act_quant=dynamic (the range of each run's input) even "
               "when --calib is given"),
        Option("bias_correction", bool, True, "after choosing an op's range, correct its bias so that each "
               "output channel's mean (before the fused activation) equals the float-activation model's at the same "
               "tensor (the quantization and clipping errors of this op and of the ops before it; one more sweep, of "
               "the model as it was before this pass)"),
        Option("fuse", bool, True, "fuse a Relu, or a Clip with constant bounds, that is the only reader of a "
               "ternary op's output into the op (its activation attribute); and a residual Add that is the only "
               "reader of a TernaryConv's output, adding a float tensor of the same shape, with the Relu/Clip "
               "after it (the op's residual input; exact)"),
        Option("chain", str, "on", "int8 chaining: a TernaryConv read by another (static, group 1) TernaryConv "
               "hands it its output as uint8 codes, quantized with the reader's act_scale / act_zero_point in the "
               "pixel-major layout the reader sums over (output_layout / input_layout \"nhwc_c4\"), so the "
               "reader neither quantizes nor reorders (exact: the same codes). 'on': where the reader is the "
               "output's only reader and the producer has no residual input (measured faster); 'all': also where "
               "the float output has other readers (written as well) or the producer adds a residual (measured "
               "no faster: the producer's extra work cancels the reader's saving); 'off'",
               choices=CHAIN_MODES),
        Option("memory", mebibytes, DEFAULT_BUDGET / 2**20, "MiB of calibration-set activations held in memory by "
               "the sweep; the rest is spilled to temporary files"),
    )

    def run(self, graph: gs.Graph, ctx: Context) -> Report:
        opts = ctx.options
        report = Report(self.name)
        nodes = [n for n in sorted_nodes(graph) if n.domain == CUSTOM_DOMAIN and n.op in TERNARY_OPS]
        if not nodes:
            report.skip("*", "-", "no ternary ops in the model (run the ternary pass before w2a8): nothing "
                        "to quantize")
            report.details["mode"] = "none"
            return report
        for node in nodes:
            for name in ACT_ATTRS:
                node.attrs.pop(name, None)
        reference = graph.copy() if ctx.calibration is not None and opts["bias_correction"] else None
        original = {id(n): n.outputs[0].name for n in nodes}  # the pre-activation tensor, named as in `reference`
        fused = fuse_activations(graph, nodes) if opts["fuse"] else {}
        report.details["fused_activations"] = len(fused)
        if ctx.calibration is None or opts["dynamic"]:
            why = "--w2a8-dynamic" if opts["dynamic"] else "no calibration data (--calib)"
            for node in nodes:
                node.attrs["act_quant"] = "dynamic"
                report.change(node.name, node.op, "float activations", "u8 dynamic", _params(node),
                              _params(node), note=_fused_note(fused, node))
            report.skip("*", "-", f"{why}: act_quant=dynamic (each run quantizes with its own input range)")
            report.details["mode"] = "dynamic"
        else:
            self._calibrate(graph, nodes, ctx, fused, reference, original, report)
        # After calibration: the fusion is exact, so it changes no range or bias the sweeps chose.
        report.details["fused_residuals"] = fuse_residuals(graph, nodes) if opts["fuse"] else 0
        pairs = chain_codes(graph, nodes, every=opts["chain"] == "all") if opts["chain"] != "off" else []
        for producer, consumer in pairs:
            report.change(producer.name, producer.op, "float NCHW output", f"u8 {CODES_LAYOUT} codes",
                          _params(producer), _params(producer),
                          note=f"chained into {consumer.name} (quantized with its s={consumer.attrs['act_scale']:.4g} "
                               f"z={consumer.attrs.get('act_zero_point', 0)})")
        report.details["chained"] = len(pairs)
        return report

    def _calibrate(self, graph: gs.Graph, nodes: list[gs.Node], ctx: Context, fused: dict[int, str],
                   reference: gs.Graph | None, original: dict[int, str], report: Report) -> None:
        opts = ctx.options
        calibration = Calibration.read(ctx.calibration, opts["samples"])
        graph.toposort()
        opsets = list(ctx.template.opset_import) if ctx.template is not None else []
        budget = int(max(opts["memory"], 0) * 2**20)
        sweep = Sweep(graph, calibration, ctx.session, budget, opsets)
        ref_sweep = None
        if reference is not None:
            reference.toposort()
            ref_sweep = Sweep(reference, calibration, ctx.session, budget, opsets)
        chosen: dict[str, int] = {}
        layers = {}
        try:
            for node in nodes:
                name = node.inputs[0].name
                x = sweep.get([name])[name]
                hist = _histogram(x, calibration)
                found = candidates(hist, opts["method"], opts["percentile"])
                if len(found) > 1:
                    errors = output_errors(sweep, node, found)
                else:
                    errors = [float("nan")]
                best = int(np.nanargmin(errors)) if len(found) > 1 else 0
                pick = found[best]
                node.attrs["act_scale"] = float(np.float32(pick.scale))
                node.attrs["act_zero_point"] = int(pick.zero_point)
                chosen[pick.method] = chosen.get(pick.method, 0) + 1
                lo, hi = pick.range
                layers[node.name] = {
                    "method": pick.method, "scale": pick.scale, "zero_point": pick.zero_point,
                    "range": [lo, hi], "input_range": [hist.lo, hist.hi],
                    "clipped": float(_clipped(hist, lo, hi)),
                    "output_mse": {c.method: e for c, e in zip(found, errors)} if len(found) > 1 else None,
                }
                note = f"{pick.method}, range [{lo:.4g}, {hi:.4g}] of [{hist.lo:.4g}, {hist.hi:.4g}]"
                extra = _fused_note(fused, node)
                report.change(node.name, node.op, "float activations",
                              f"u8 s={pick.scale:.4g} z={pick.zero_point}", _params(node), _params(node),
                              note=f"{note}; {extra}" if extra else note)
                if ref_sweep is not None:
                    correct_bias(graph, node, sweep, ref_sweep, original[id(node)], report)
        finally:
            sweep.close()
            if ref_sweep is not None:
                ref_sweep.close()
        report.details.update(mode="static", samples=calibration.samples, methods=chosen, layers=layers)


def output_errors(sweep: Sweep, node: gs.Node, found: list[Candidate]) -> list[float]:
    """Mean squared error of `node`'s output (fused activation included) with each candidate's static
    quantization against the same op with float activations, on the held calibration inputs."""
    out = node.outputs[0].name
    saved = {k: node.attrs[k] for k in ACT_ATTRS if k in node.attrs}
    runs = []
    try:
        for k in saved:
            node.attrs.pop(k)
        reference = sweep.run_nodes([node], [out])
        first_ref = next(reference)  # the session is built on the first step, with the attributes as now
        for c in found:
            node.attrs["act_scale"] = float(np.float32(c.scale))
            node.attrs["act_zero_point"] = int(c.zero_point)
            gen = sweep.run_nodes([node], [out])
            runs.append((gen, next(gen)))
    finally:
        for k in ACT_ATTRS:
            node.attrs.pop(k, None)
        node.attrs.update(saved)
    sums = np.zeros(len(found), np.float64)
    count = 0
    streams = [_chain(first_ref, reference)] + [_chain(first, gen) for gen, first in runs]
    for (_, ref_values), *values in zip(*streams):
        ref = ref_values[0].astype(np.float64)
        count += ref.size
        for i, (_, got) in enumerate(values):
            sums[i] += float(((got[0].astype(np.float64) - ref) ** 2).sum())
    return list(sums / max(count, 1))


def correct_bias(graph: gs.Graph, node: gs.Node, sweep: Sweep, ref_sweep: Sweep, ref_name: str,
                 report: Report) -> None:
    """Bias correction (passes/bnstats.py) of a quantized op against the float-activation model: its output
    before the fused activation, per channel, on the calibration inputs it really gets."""
    layer = layer_of(node)
    if layer is None:
        report.skip(node.name, node.op, "bias not corrected: alpha or packed weights are not constants")
        return
    axis = 1 if layer.output_axis == 1 else -1
    saved = {k: node.attrs.pop(k) for k in FUSED_ATTRS if k in node.attrs}
    try:
        outputs = [values[0] for _, values in sweep.run_nodes([node], [node.outputs[0].name])]
    finally:
        node.attrs.update(saved)
    current = ChannelStats.of(outputs, axis)
    ref = ChannelStats.of([ref_sweep.get([ref_name])[ref_name]], axis)
    correct(graph, Target(layer, node.outputs[0].name, axis, [node]), current, ref, {}, False, report)


def _chain(first, rest):
    yield first
    yield from rest


def _histogram(x, calibration: Calibration) -> Histogram:
    lo, hi = math.inf, -math.inf
    for a, b in calibration.bounds:
        part = np.asarray(x[a:b])
        finite = part[np.isfinite(part)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    if not math.isfinite(lo):
        lo = hi = 0.0
    hist = Histogram(lo, hi)
    for a, b in calibration.bounds:
        part = np.asarray(x[a:b])
        hist.add(part[np.isfinite(part)])
    return hist


def _clipped(hist: Histogram, lo: float, hi: float) -> float:
    """Fraction of the counted values outside [lo, hi]."""
    centers = hist.centers
    total = hist.counts.sum()
    return float(hist.counts[(centers < lo) | (centers > hi)].sum() / total) if total else 0.0


def _params(node: gs.Node) -> int:
    return int(np.prod(node.attrs.get("weight_shape", [0])))


def _fused_note(fused: dict[int, str], node: gs.Node) -> str:
    return f"{fused[id(node)]} fused" if id(node) in fused else ""


def fuse_activations(graph: gs.Graph, nodes: list[gs.Node]) -> dict[int, str]:
    """Fold a Relu (or a Clip with constant bounds) that is the only reader of a ternary op's output into the
    op's `activation` attribute; returns {id(op): 'Relu' | 'Clip'}."""
    fused: dict[int, str] = {}
    for node in nodes:
        if any(k in node.attrs for k in FUSED_ATTRS):
            continue
        out = node.outputs[0]
        if len(out.outputs) != 1 or is_graph_output(graph, out):
            continue
        act = out.outputs[0]
        if not is_standard(act) or len(act.outputs) != 1:
            continue
        if act.op == "Relu":
            node.attrs["activation"] = "Relu"
        elif act.op == "Clip":
            bounds = _clip_bounds(act)
            if bounds is None:
                continue
            node.attrs["activation"] = "Clip"
            node.attrs["clip_min"], node.attrs["clip_max"] = bounds
        else:
            continue
        fused[id(node)] = act.op
        result = act.outputs[0]
        act.outputs.clear()
        act.inputs.clear()
        node.outputs[0] = result
    if fused:
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
    return fused


def fuse_residuals(graph: gs.Graph, nodes: list[gs.Node]) -> int:
    """Fold a residual Add into a TernaryConv (input 4, `residual`): the Add must be the only reader of the
    op's output (the op has no fused activation), and its other input a float32 tensor computed by the graph
    with exactly the op's output shape (no broadcasting). A Relu, or a Clip with constant bounds, that is the
    only reader of the Add's output becomes the op's activation (applied after the residual). Exact: the
    runtime adds the residual to the op's float output and then clamps, as the Add and Relu/Clip did.
    Returns the number of Adds folded."""
    count = 0
    for node in nodes:
        if node.op != "TernaryConv" or any(k in node.attrs for k in FUSED_ATTRS) or len(node.inputs) > 4:
            continue
        out = node.outputs[0]
        if len(out.outputs) != 1 or is_graph_output(graph, out):
            continue
        add = out.outputs[0]
        if not is_standard(add) or add.op != "Add" or len(add.inputs) != 2 or len(add.outputs) != 1:
            continue
        if add.inputs[0] is out and add.inputs[1] is out:
            continue
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        if not isinstance(other, gs.Variable) or other.dtype != np.float32 or not _same_shape(other.shape, out.shape):
            continue
        result = add.outputs[0]
        act, bounds = None, None
        if len(result.outputs) == 1 and not is_graph_output(graph, result):
            follower = result.outputs[0]
            if is_standard(follower) and len(follower.outputs) == 1 and follower.op in ("Relu", "Clip"):
                bounds = _clip_bounds(follower) if follower.op == "Clip" else None
                if follower.op == "Relu" or bounds is not None:
                    act = follower
        while len(node.inputs) < 4:
            node.inputs.append(gs.Variable.empty())
        node.inputs.append(other)
        add.inputs.clear()
        add.outputs.clear()
        node.outputs[0] = result
        if act is not None:
            node.attrs["activation"] = act.op
            if bounds is not None:
                node.attrs["clip_min"], node.attrs["clip_max"] = bounds
            final = act.outputs[0]
            act.inputs.clear()
            act.outputs.clear()
            node.outputs[0] = final
        count += 1
    if count:
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
    return count


CODES_LAYOUT = "nhwc_c4"  # uint8 [N, H, W, round4(C)], as runtime/w2a8_ops.h reads and writes it
CHAIN_ATTRS = ("input_layout", "output_layout", "output_scale", "output_zero_point")


def _chainable(node: gs.Node) -> bool:
    """A TernaryConv the runtime can chain: W2A8 (act_quant set), not on the depthwise path (C/group > 1)."""
    shape = node.attrs.get("weight_shape", [])
    return (node.op == "TernaryConv" and len(shape) == 4 and shape[1] > 1
            and ("act_scale" in node.attrs or node.attrs.get("act_quant") in ("static", "dynamic")))


def chain_codes(graph: gs.Graph, nodes: list[gs.Node], every: bool = False) -> list[tuple[gs.Node, gs.Node]]:
    """int8 chaining: where a TernaryConv's output (after its fused residual and activation) is read as X by
    a static, group-1 TernaryConv, the producer also writes that reader's uint8 codes: output 1, uint8
    [N, OH, OW, round4(K)], with output_layout="nhwc_c4" and output_scale / output_zero_point = the reader's
    act_scale / act_zero_point; the reader reads them (input_layout="nhwc_c4"). Output 0, the float NCHW
    tensor, stays only when something else reads it (a residual branch, another op, a graph output); else it
    is left empty. Exact: the producer quantizes its float output by the reader's own rule. One reader per
    producer (the first, in topological order). every=False (the default mode, the one measured faster):
    only producers without a residual input whose output nothing else reads. Returns the (producer, reader)
    pairs."""
    pairs = []
    for node in nodes:
        if not _chainable(node) or len(node.outputs) != 1 or any(k in node.attrs for k in CHAIN_ATTRS[1:]):
            continue
        out = node.outputs[0]
        if out.shape is None or len(out.shape) != 4:
            continue
        reader = next((r for r in out.outputs if _chain_reader(r, out)), None)
        if reader is None:
            continue
        alone = len(out.outputs) == 1 and not is_graph_output(graph, out)
        if not every and (not alone or (len(node.inputs) > 4 and node.inputs[4].name)):
            continue
        n, _, oh, ow = out.shape
        k = int(node.attrs["weight_shape"][0])
        codes = gs.Variable(f"{out.name}_u8", dtype=np.uint8, shape=[n, oh, ow, (k + 3) // 4 * 4])
        reader.inputs[0] = codes
        if out.outputs or is_graph_output(graph, out):
            node.outputs.append(codes)
        else:
            node.outputs[0] = gs.Variable.empty()
            node.outputs.append(codes)
        node.attrs["output_layout"] = CODES_LAYOUT
        node.attrs["output_scale"] = float(reader.attrs["act_scale"])
        node.attrs["output_zero_point"] = int(reader.attrs.get("act_zero_point", 0))
        reader.attrs["input_layout"] = CODES_LAYOUT
        pairs.append((node, reader))
    if pairs:
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
    return pairs


def _chain_reader(reader: gs.Node, tensor: gs.Variable) -> bool:
    """`reader` can read `tensor` as codes: a static, group-1 W2A8 TernaryConv whose X (only) it is."""
    return (reader.domain == CUSTOM_DOMAIN and _chainable(reader) and "act_scale" in reader.attrs
            and reader.attrs.get("act_quant", "static") == "static" and reader.attrs.get("group", 1) == 1
            and "input_layout" not in reader.attrs and reader.inputs[0] is tensor
            and not any(t is tensor for t in reader.inputs[1:]))


def _same_shape(a, b) -> bool:
    """Both shapes fully known (integers or named dimensions) and equal."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(x is not None and x == y and (isinstance(x, int) or (isinstance(x, str) and x)) for x, y in zip(a, b))


def _clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """(min, max) of a Clip whose bounds are constants (attributes before opset 11, inputs after)."""
    if "min" in node.attrs or "max" in node.attrs:
        lo, hi = node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)
    else:
        values = []
        for index in (1, 2):
            tensor = input_at(node, index)
            if tensor is None:
                values.append(None)
                continue
            value = constant_value(tensor)
            if value is None or np.size(value) != 1:
                return None
            values.append(float(np.asarray(value).reshape(())))
        lo = values[0] if values[0] is not None else -np.inf
        hi = values[1] if values[1] is not None else np.inf
    lo, hi = float(np.float32(lo)), float(np.float32(hi))
    if not lo <= hi:
        return None
    return lo, hi
