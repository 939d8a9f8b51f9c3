"""Mixed precision under a budget (`compress --max-drop D` / `--target-size S`).

Every weighted layer (ocomp/layers.py) gets one of three forms: `ternary` (ocomp's 2-bit ops, made by the
`ternary` pass), `int8` (per-channel int8 weights and uint8 activations as standard QuantizeLinear /
DequantizeLinear pairs, made by onnxruntime's own `quantize_static`, run by onnxruntime's int8 kernels) or
`float` (left as it is). The plan is chosen from a measured sensitivity of each layer and checked on the
real pipeline result:

1. sensitivity: for each layer that can be ternary, the noise-to-signal ratio of the model's first output
   on calibration data when only that layer's weights are replaced by their ternary approximation;
2. layers are ordered by sensitivity per extra byte an int8 layer costs over a ternary one (the knapsack
   order: most accuracy bought per byte first); layers the ternary pass cannot rewrite are int8 always;
3. a plan is "the first k layers of that order int8, the rest ternary"; each candidate is the whole
   pipeline (int8 QDQ inserted by onnxruntime's quantizer on the float model, then the user's passes from
   `ternary` on, with the ternary pass told to leave the int8 and float layers alone, so bnrecal repairs
   the mix), measured on the whole calibration set, while the passes and the int8 calibration see only its
   first 80% (the accuracy guard's split, ocomp.guard.hold_back);
4. `--max-drop D`: the smallest k whose measured drop is at most D points (top-1 accuracy with labels,
   top-1 agreement with the original without), by bisection; when even all-int8 is not enough, layers go
   back to float, most int8-sensitive first, by the same bisection. `--target-size`: the largest k whose
   file fits the size; the accuracy it reached is reported.

BatchNormalization is folded into the layers that stay float or become int8 (as onnxruntime's int8 tools
do; int8 weights are no longer constants that bnrecal could rescale), and kept after ternary layers, where
bnrecal re-estimates it (PP-OCR's direction classifier, ternary + bnrecal: 89.9% with BN kept, 86.9%
folded first). Re-estimating the BN of a layer left float would move it too (PP-OCR, no layer changed:
97.5% -> 92.5% top-1 on 40 held-back samples). The int8 step runs on the float model before the ternary
pass (onnxruntime's calibration session cannot load ocomp's custom ops).
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from .errors import OcompError, UsageError
from .layers import Unsupported, weighted_layers
from .model import add_provenance, to_graph, to_model

FORMS = ("ternary", "int8", "float")
INT8_OPS = frozenset({"Conv", "Gemm", "MatMul"})  # what onnxruntime's QDQ quantizer makes int8 per channel
QDQ_OPSET = 13  # per-channel DequantizeLinear (its axis attribute) needs opset 13
SENSITIVITY_SAMPLES = 128  # calibration samples the per-layer sensitivity is measured on


# ---------------------------------------------------------------- the budget


@dataclass(frozen=True)
class Budget:
    """One budget: `max_drop` in points (top-1 accuracy with labels, else top-1 agreement with the
    original), or `target_size` as text: a ratio to the original file ("8x") or a size ("120KB", "0.5MB",
    "90000" bytes)."""

    max_drop: float | None = None
    target_size: str | None = None

    def __post_init__(self) -> None:
        if (self.max_drop is None) == (self.target_size is None):
            raise UsageError("give one budget: --max-drop or --target-size, not both" if self.max_drop is not None
                             else "no budget given: --max-drop or --target-size")
        if self.max_drop is not None:
            if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float)) \
                    or not math.isfinite(self.max_drop) or not 0 <= self.max_drop <= 100:
                raise UsageError(f"--max-drop: expected points in [0, 100], got {self.max_drop!r}")
        else:
            parse_size(self.target_size, 1)  # the text is checked now, before any work

    def options(self) -> dict[str, Any]:
        return {"max_drop": self.max_drop} if self.max_drop is not None else {"target_size": self.target_size}

    def describe(self) -> str:
        return f"--max-drop {self.max_drop:g}" if self.max_drop is not None else f"--target-size {self.target_size}"


_UNITS = {"": 1, "b": 1, "kb": 1000, "k": 1000, "mb": 1000**2, "m": 1000**2, "kib": 1024, "mib": 1024**2}


def parse_size(text: Any, original_bytes: int) -> int:
    """Bytes from "8x" (the original's size / 8), "120KB", "1.5MB", "120KiB" or a plain byte count."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise UsageError(f"--target-size: expected a ratio like 8x or a size like 120KB, got {text!r}")
    spelled = str(text).strip().lower().replace(" ", "")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)(x|[a-z]*)", spelled)
    if not match or (match.group(2) not in _UNITS and match.group(2) != "x"):
        raise UsageError(f"--target-size: expected a ratio like 8x or a size like 120KB (units B, KB, MB, KiB, "
                         f"MiB), got {text!r}")
    number = float(match.group(1))
    if not math.isfinite(number) or number <= 0:
        raise UsageError(f"--target-size: must be positive, got {text!r}")
    if match.group(2) == "x":
        if number < 1:
            raise UsageError(f"--target-size: a ratio must be at least 1x (smaller than the original), got {text!r}")
        return int(original_bytes / number)
    return int(number * _UNITS[match.group(2)])


# ---------------------------------------------------------------- layers and their forms


@dataclass
class LayerPlan:
    """One weighted layer: what it can be, what was measured, what was chosen and why."""

    name: str
    op: str
    params: int
    channels: int
    ternary_reason: str | None  # why it cannot be ternary (None: it can)
    int8: bool  # onnxruntime's quantizer makes this op int8
    sensitivity: float | None = None  # output noise/signal with only this layer ternary
    int8_sensitivity: float | None = None  # the same with only this layer's weights int8 (float fallback only)
    choice: str = "float"
    why: str = ""

    def nbytes(self, form: str) -> int:
        """Stored weight bytes in `form` (biases are float in every form and not counted)."""
        if form == "ternary":
            return -(-self.params // 4) + 4 * self.channels  # 2-bit codes + float alpha
        if form == "int8":
            return self.params + 5 * self.channels  # int8 weights + float scale and int8 zero point a channel
        return 4 * self.params


def describe_layers(model: onnx.ModelProto) -> list[LayerPlan]:
    """The float weighted layers of `model` in topological order, each with what it can become."""
    graph = to_graph(model)
    plans = []
    for layer in weighted_layers(graph, ternary=False):
        weight = layer.weight()
        reason = None
        if not np.issubdtype(weight.dtype, np.floating):
            reason = f"weight dtype {weight.dtype} is not floating point"
        else:
            try:
                layer.kind.ternary_form(layer, graph)
            except Unsupported as why:
                reason = f"no ternary form: {why}"
        int8 = layer.op in INT8_OPS and np.issubdtype(weight.dtype, np.floating)
        plans.append(LayerPlan(layer.name, layer.op, int(weight.size), int(layer.out_channels), reason, int8))
    return plans


# ---------------------------------------------------------------- sensitivity


def _first_output(session, dataset, names) -> list[np.ndarray]:
    from .guard import quiet_run_options

    quiet = quiet_run_options()
    return [session.run(names[:1], feeds, quiet)[0] for feeds, _ in dataset.batches()]


def sensitivities(model: onnx.ModelProto, plans: Sequence[LayerPlan], dataset, form: str,
                  threads: int | None = None) -> dict[str, float]:
    """For each layer of `plans`: the noise-to-signal ratio of the first output on `dataset` when only that
    layer's weights are replaced by their `form` ("ternary": the exact per-channel least-squares ternary
    approximation; "int8": symmetric per-channel int8) and everything else stays float."""
    from onnx import numpy_helper

    from .metrics import OutputMetrics
    from .session import make_session

    from .passes.ternary import ternarize_optimal

    names = [o.name for o in model.graph.output]
    reference = _first_output(make_session(model, threads=threads), dataset, names)
    graph = to_graph(model)
    layers = {la.name: la for la in weighted_layers(graph, ternary=False)}
    inits = {i.name: n for n, i in enumerate(model.graph.initializer)}
    result = {}
    for plan in plans:
        layer = layers[plan.name]
        rows = layer.rows()
        if form == "ternary":
            codes, alpha = ternarize_optimal(rows)
            approx = alpha[:, None] * codes
        else:
            scale = np.abs(rows).max(axis=1, keepdims=True) / 127.0
            scale[scale == 0] = 1.0
            approx = np.clip(np.round(rows / scale), -127, 127) * scale
        weight_name = layer.node.inputs[1].name
        if weight_name in inits and layer.node.op != "Gemm":  # the stored weight is the initializer itself
            probe = onnx.ModelProto()
            probe.CopyFrom(model)
            stored = layer.kind.stored(layer.node, approx).astype(layer.weight().dtype)
            probe.graph.initializer[inits[weight_name]].CopyFrom(numpy_helper.from_array(stored, weight_name))
        else:  # a weight reached through a Constant/Identity/Reshape chain, or Gemm's alpha: rewrite the graph
            copy = to_graph(model)
            target = next(la for la in weighted_layers(copy, ternary=False) if la.name == plan.name)
            target.set_rows(copy, approx)
            probe = to_model(copy, model)
        outputs = _first_output(make_session(probe, threads=threads), dataset, names)
        metrics = OutputMetrics()
        for a, b in zip(reference, outputs):
            metrics.add(a, b)
        snr = metrics.result()["snr_db"]
        result[plan.name] = 0.0 if snr == float("inf") else (float("inf") if not math.isfinite(snr)
                                                              else 10.0 ** (-snr / 10.0))
    return result


# ---------------------------------------------------------------- applying a plan


def fold_bn_into(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """The model with every BatchNormalization that follows one of the `names` layers folded into it."""
    from .layers import layer_of
    from .passes.foldbn import fold_bn, foldable_reason, sole_bn_consumer

    graph = to_graph(model)
    changed = False
    for node in list(graph.nodes):
        layer = layer_of(node)
        if layer is None or layer.name not in names:
            continue
        bn = sole_bn_consumer(graph, node)
        if bn is not None and foldable_reason(graph, node, bn) is None:
            fold_bn(graph, node, bn)
            changed = True
    return to_model(graph, model) if changed else model


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every weighted layer's node named as ocomp names the layer (its node name, else its output), so
    onnxruntime's quantizer can be told which nodes to quantize."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {n.name for n in out.graph.node if n.name}
    for node in out.graph.node:
        if not node.name and node.output and node.output[0] not in taken:
            node.name = node.output[0]
            taken.add(node.name)
    return out


def quantize_int8(model: onnx.ModelProto, names: Sequence[str], dataset) -> onnx.ModelProto:
    """The `names` layers of a float model made int8 by onnxruntime's quantize_static: QDQ format, weights
    QInt8 per channel, activations QUInt8 (U8S8), MinMax calibration on `dataset`. Everything else is
    untouched. The model is converted to opset 13 first when it is older (per-channel QDQ needs it)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    if not names:
        return model
    model = name_nodes(fold_bn_into(model, set(names)))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), QDQ_OPSET)
    if opset < QDQ_OPSET:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, QDQ_OPSET)
        except Exception as exc:  # noqa: BLE001 - the converter raises many kinds
            raise OcompError(f"int8 layers need opset {QDQ_OPSET}; converting the model from opset {opset} "
                             f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = (feeds for feeds, _ in dataset.batches())

        def get_next(self):
            return next(self.batches, None)

    reader = Reader()
    with tempfile.TemporaryDirectory(prefix="ocomp-int8-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(src))
        try:
            logging.disable(logging.WARNING)  # its "consider pre-processing" advice is not the user's business
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=list(names), calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"CalibTensorRangeSymmetric": False})
        except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer raises many kinds
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OcompError(f"onnxruntime's int8 quantizer failed: {text}") from None
        finally:
            logging.disable(logging.NOTSET)
        quantized = onnx.load(str(dst))
    from .model import infer_shapes

    return infer_shapes(short_names(quantized, model), "the int8 model")


def short_names(quantized: onnx.ModelProto, before: onnx.ModelProto) -> onnx.ModelProto:
    """The quantized model with the nodes and tensors onnxruntime's quantizer added renamed `q0`, `q1`, ...
    Its names ("conv11_se_1_weights_quantized_zero_point", repeated at every use) are a quarter of a small
    model's file (PP-OCR's direction classifier all int8: 297 KB, of which node protos 76 KB); the graph's
    inputs, outputs and every name the float model had are kept."""
    kept = {i.name for i in before.graph.initializer} | {v.name for v in before.graph.input}
    kept |= {v.name for v in before.graph.output} | {n.name for n in before.graph.node}
    kept |= {t for n in before.graph.node for t in list(n.input) + list(n.output)}
    graph = quantized.graph
    taken = kept | {n.name for n in graph.node} | {t for n in graph.node for t in list(n.input) + list(n.output)}
    taken |= {i.name for i in graph.initializer}
    renamed: dict[str, str] = {}
    counter = 0

    def short(name: str) -> str:
        nonlocal counter
        if not name or name in kept:
            return name
        if name not in renamed:
            while f"q{counter}" in taken:
                counter += 1
            renamed[name] = f"q{counter}"
            taken.add(renamed[name])
        return renamed[name]

    for node in graph.node:
        node.name = short(node.name)
        node.input[:] = [short(t) for t in node.input]
        node.output[:] = [short(t) for t in node.output]
    for init in graph.initializer:
        init.name = short(init.name)
    for value in graph.value_info:
        value.name = short(value.name)
    return quantized


def int8_layers(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes whose weight is a DequantizeLinear of an int8 constant (the int8 layers)."""
    inits = {i.name: i for i in model.graph.initializer}
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
          and inits[n.input[0]].data_type == onnx.TensorProto.INT8}
    return {n.name for n in model.graph.node if n.op_type in INT8_OPS and len(n.input) > 1 and n.input[1] in dq}


# ---------------------------------------------------------------- the search


@dataclass(eq=False)  # candidates are compared by identity (their models are large protos)
class Candidate:
    """One plan built by the real pipeline and measured on the calibration data."""

    label: str
    forms: dict[str, str]  # layer name -> form
    model: onnx.ModelProto
    reports: list
    size: int  # bytes of the serialized model
    figures: dict  # ocomp.guard.measure's figures
    drop: float  # points lost (top-1 with labels, else the fidelity measure)
    seconds: float

    def counts(self) -> str:
        return ", ".join(f"{sum(1 for f in self.forms.values() if f == form)} {form}" for form in FORMS)


@dataclass
class MixedResult:
    model: onnx.ModelProto
    reports: list  # the "mixed" report first, then the chosen candidate's pass reports
    chosen: Candidate
    tried: list[Candidate]
    reached: bool  # the budget was met
    message: str = ""  # what was reached, when it was not


def drop_points(figures: dict) -> tuple[float, str]:
    """(points lost, what they measure): top-1 accuracy points with labels; else points of top-1 agreement
    (classifier output), of thresholded-map IoU (score map) or 100 x (1 - cosine) of the first output."""
    if "top1" in figures:
        return 100.0 * (figures["top1"]["original"] - figures["top1"]["compressed"]), "top-1 accuracy"
    first = next(iter(figures["outputs"].values()))
    if first.get("non_finite"):
        return float("inf"), "fidelity (NaN/Inf outputs)"
    for key, what in (("agreement", "top-1 agreement with the original"),
                      ("map_iou", "thresholded-map IoU with the original"), ("cosine", "100 x cosine to the original")):
        if key in first:
            return 100.0 * (1.0 - float(first[key])), what
    return float("inf"), "fidelity"


def split_passes(passes: Sequence[str]) -> tuple[list[str], list[str]]:
    names = list(passes)
    if "ternary" not in names:
        raise UsageError("--max-drop/--target-size choose between ternary, int8 and float per layer: the passes must "
                         f"include ternary (got {','.join(names)})")
    cut = names.index("ternary")
    return names[:cut], names[cut:]


def search(model: onnx.ModelProto, passes: Sequence[str], options: Mapping[str, Mapping[str, Any]],
           budget: Budget, fit, judge, reference: onnx.ModelProto, *, threads: int | None = None,
           progress: bool = False, log: Callable[[str], None] | None = None,
           original_size: int | None = None) -> MixedResult:
    """The smallest plan within `budget` (`--max-drop`), or the most accurate within the size
    (`--target-size`); `fit` is the data the passes and the int8 calibration use, `judge` what the drop is
    measured on (ocomp.api: the whole calibration set, of which `fit` is the first 80%: a drop measured
    on the held-back 20% alone moves in steps of 2.5 points with PP-OCR's 200 calibration samples).
    Raises nothing when the budget cannot be met: `reached` is False and `message` says what the closest
    candidate reached (the caller refuses it unless forced). `original_size`: the bytes a ratio such as
    "8x" divides (default: the serialized reference model).

    Passes before `ternary` (prune) run once on the float model, followed by bnrecal when the pipeline has
    it: a layer made int8 afterwards can no longer be re-fitted, so the pruned float model is repaired
    before the int8 layers are made."""
    from .guard import measure
    from .pipeline import KeptChannels, resolve_options, run_passes

    say = log or (lambda text: None)
    prefix, suffix = split_passes(passes)
    options = {k: dict(v) for k, v in options.items()}
    user_ternary = resolve_options("ternary", options.get("ternary"))
    start = time.perf_counter()
    kept = KeptChannels()
    base = model
    prefix_reports: list = []
    if prefix:
        if "bnrecal" in suffix and "bnrecal" not in prefix:
            prefix = prefix + ["bnrecal"]
        done = run_passes(model, prefix, {k: v for k, v in options.items() if k in prefix}, calibration=fit,
                          reference=reference, progress=progress, kept_channels=kept, threads=threads)
        base, prefix_reports = done.model, done.reports
    plans = describe_layers(base)
    known = {p.name for p in plans}
    unknown = [s for s in user_ternary["skip"] if s not in known]
    if unknown:
        raise UsageError(f"--ternary-skip: no weighted layer with a constant weight is named "
                         f"{', '.join(repr(u) for u in unknown)}")
    skipped = set(user_ternary["skip"])
    for p in plans:
        if p.name in skipped:
            p.ternary_reason = "in --ternary-skip"
    eligible = [p for p in plans if p.ternary_reason is None]
    if not eligible:
        raise OcompError("no weighted layer can be made ternary, so there is nothing to trade between ternary, "
                         "int8 and float")
    say(f"mixed precision: measuring the ternary sensitivity of {len(eligible)} layers")
    sample = fit.window(0, min(len(fit), SENSITIVITY_SAMPLES))
    for name, value in sensitivities(base, eligible, sample, "ternary", threads).items():
        next(p for p in plans if p.name == name).sensitivity = value
    saving = {p.name: max(p.nbytes("int8") - p.nbytes("ternary"), 1) for p in eligible}
    order = sorted(eligible, key=lambda p: (-p.sensitivity / saving[p.name], p.name))
    rank = {p.name: i for i, p in enumerate(order)}
    cache: dict[tuple, Candidate] = {}

    def forms_for(k: int, floats: Sequence[str] = ()) -> dict[str, str]:
        forms = {}
        for p in plans:
            if p.name in floats:
                forms[p.name] = "float"
            elif p.ternary_reason is None:
                forms[p.name] = "int8" if rank[p.name] < k else "ternary"
            else:
                forms[p.name] = "int8" if p.int8 else "float"
        return forms

    def build(label: str, forms: dict[str, str]) -> Candidate:
        key = tuple(sorted(forms.items()))
        if key in cache:
            return cache[key]
        t0 = time.perf_counter()
        int8 = [n for n, f in forms.items() if f == "int8"]
        floats = [n for n, f in forms.items() if f == "float"]
        current = quantize_int8(fold_bn_into(base, set(int8) | set(floats)), int8, fit)
        made = int8_layers(current)
        lost = [n for n in int8 if n not in made]
        opts = {k: dict(v) for k, v in options.items() if k in suffix}
        ternary_opts = dict(opts.get("ternary", {}))
        ternary_opts.update(skip=[n for n in floats + lost if n in {p.name for p in eligible}],
                            keep_first=False, keep_last=False, min_params=0)
        opts["ternary"] = ternary_opts
        result = run_passes(current, suffix, opts, calibration=fit, reference=reference, progress=progress,
                            kept_channels=kept.copy(), threads=threads)
        for n in lost:  # onnxruntime left it float (an op form its quantizer does not take)
            forms[n] = "float"
        figures = measure(reference, result.model, judge)
        drop, _ = drop_points(figures)
        reports = prefix_reports + result.reports
        written = onnx.ModelProto()  # the size of the file as ocomp.api writes it, provenance included
        written.CopyFrom(result.model)
        add_provenance(written, [{"name": "mixed", "options": budget.options()}] +
                       [{"name": r.pass_name, "options": r.options} for r in reports])
        candidate = Candidate(label, forms, result.model, reports, written.ByteSize(), figures, drop,
                              time.perf_counter() - t0)
        cache[key] = candidate
        say(f"  {label}: {candidate.counts()}; {candidate.size / 1000:.1f} KB, drop {drop:.2f} pt "
            f"({candidate.seconds:.1f} s)")
        return candidate

    tried: list[Candidate] = []

    def run(label: str, forms: dict[str, str]) -> Candidate:
        candidate = build(label, forms)
        if candidate not in tried:
            tried.append(candidate)
        return candidate

    n = len(order)
    reached, message = True, ""
    notes: dict[str, str] = {}
    if budget.max_drop is not None:
        limit = budget.max_drop + 1e-9
        chosen = run("all ternary", forms_for(0))
        if chosen.drop > limit:
            best = run(f"all {n} int8", forms_for(n))
            if best.drop <= limit:
                # 0 int8 layers fail, n meet the budget
                _bisect(0, n, lambda m: run(f"{m} most sensitive int8", forms_for(m)).drop <= limit)
                chosen = min((c for c in tried if c.drop <= limit), key=lambda c: (c.size, c.drop))
                chosen = _refine(chosen, eligible, limit, run, notes)
            else:
                chosen = _float_fallback(base, plans, forms_for(n), fit, sample, limit, run, threads, say)
                if chosen.drop > limit:
                    reached = False
                    message = (f"--max-drop {budget.max_drop:g}: not reached; the closest candidate ({chosen.label}) "
                               f"loses {chosen.drop:.2f} pt on the calibration data")
    else:
        original_size = original_size or reference.ByteSize()
        target = parse_size(budget.target_size, original_size)
        smallest = run("all ternary", forms_for(0))
        if smallest.size > target:
            chosen, reached = smallest, False
            message = (f"--target-size {budget.target_size} ({target / 1000:.1f} KB): not reached; the smallest plan "
                       f"(every ternary-capable layer ternary, the rest int8) is {smallest.size / 1000:.1f} KB "
                       f"({original_size / smallest.size:.2f}x smaller), drop {smallest.drop:.2f} pt")
        else:
            chosen = smallest
            largest = run(f"all {n} int8", forms_for(n))
            if largest.size > target:
                # 0 int8 layers fit, n do not
                _bisect(0, n, lambda m: run(f"{m} most sensitive int8", forms_for(m)).size > target)
            # bisection assumes more int8 is more accurate; of what was built and fits, the most accurate
            chosen = min((c for c in tried if c.size <= target), key=lambda c: (c.drop, c.size))
    report = _report(plans, chosen, tried, budget, rank, order, time.perf_counter() - start, len(fit), reached,
                     message, notes)
    return MixedResult(chosen.model, [report] + chosen.reports, chosen, tried, reached, message)


REFINE_TRIALS = 4  # int8 layers tried back as ternary, one at a time, after the bisection


def _bisect(lo: int, hi: int, like_hi: Callable[[int], bool]) -> None:
    """Bisect a count of int8 layers between `lo` and `hi`, which differ in a property: like_hi(m) builds the
    candidate with m and says whether it has hi's. The candidates built are what the caller keeps."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if like_hi(mid):
            hi = mid
        else:
            lo = mid


def _refine(chosen: Candidate, eligible: Sequence[LayerPlan], limit: float, run, notes: dict[str, str]) -> Candidate:
    """The bisection moves a prefix of the order off ternary; of the int8 layers it moved, the ones that
    would save the most bytes as ternary are tried back one at a time (at most REFINE_TRIALS), each move
    kept when the drop stays within the budget."""
    movable = sorted((p for p in eligible if chosen.forms.get(p.name) == "int8"),
                     key=lambda p: (-(p.nbytes("int8") - p.nbytes("ternary")), p.name))
    for plan in movable[:REFINE_TRIALS]:
        forms = dict(chosen.forms, **{plan.name: "ternary"})
        candidate = run(f"{chosen.label}, {plan.name} back to ternary", forms)
        kept = candidate.drop <= limit and candidate.size < chosen.size
        notes[plan.name] = (f"tried back as ternary: {candidate.size / 1000:.1f} KB, drop {candidate.drop:.2f} pt, "
                            + ("kept" if kept else "over the budget, left int8"))
        if kept:
            chosen = candidate
    return chosen


def _float_fallback(base, plans, forms, fit, sample, limit, run, threads, say) -> Candidate:
    """All-int8 loses too much: layers go back to float, the most int8-sensitive per byte first, by
    bisection on their count."""
    int8 = [p for p in plans if forms[p.name] == "int8"]
    say(f"mixed precision: int8 everywhere is not enough; measuring the int8 sensitivity of {len(int8)} layers")
    for name, value in sensitivities(base, int8, sample, "int8", threads).items():
        next(p for p in plans if p.name == name).int8_sensitivity = value
    order = sorted(int8, key=lambda p: (-p.int8_sensitivity / max(p.nbytes("float") - p.nbytes("int8"), 1), p.name))

    def forms_with(m: int) -> dict[str, str]:
        floats = {p.name for p in order[:m]}
        return {name: ("float" if name in floats else form) for name, form in forms.items()}

    m = len(order)
    top = run(f"all {m} int8 layers float", forms_with(m))
    if top.drop > limit:
        return top
    lo, hi = 0, m
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if run(f"{mid} most int8-sensitive float", forms_with(mid)).drop <= limit:
            hi = mid
        else:
            lo = mid
    return run(f"{hi} most int8-sensitive float", forms_with(hi))


def _report(plans, chosen: Candidate, tried, budget: Budget, rank, order, seconds: float, fitted: int, reached: bool,
            message: str, notes: dict[str, str]):
    from .pipeline import Report

    report = Report("mixed")
    n = len(order)
    for p in plans:
        form = chosen.forms.get(p.name, "float")
        p.choice = form
        if p.ternary_reason is not None:
            why = (f"{p.ternary_reason}; " + ("int8 (the smallest form it has)" if form == "int8"
                                               else "onnxruntime's quantizer does not make it int8"))
        else:
            why = (f"ternary sensitivity {p.sensitivity:.3g} (output noise/signal), rank {rank[p.name] + 1} of {n} "
                   "by sensitivity per byte")
            if p.name in notes:
                why += f"; {notes[p.name]}"
            if p.int8_sensitivity is not None:
                why += f"; int8 sensitivity {p.int8_sensitivity:.3g}"
        p.why = why
        report.change(p.name, p.op, "float", form, p.params, p.params, note=f"{why}; ~{p.nbytes(form)} B weights")
    _, what = drop_points(chosen.figures)
    report.details["budget"] = budget.describe()
    report.details["measured on"] = (f"{chosen.figures['samples']} calibration samples, {what} (the passes fit on "
                                     f"the first {fitted})")
    report.details["chosen"] = (f"{chosen.label}: {chosen.counts()}; {chosen.size / 1000:.1f} KB, drop "
                                f"{chosen.drop:.2f} pt")
    report.details["candidates"] = "; ".join(f"{c.label} ({c.size / 1000:.1f} KB, {c.drop:.2f} pt)" for c in tried)
    if not reached:
        report.details["not reached"] = message
    report.details["plan"] = [dict(name=p.name, op=p.op, params=p.params, form=p.choice,
                                   sensitivity=p.sensitivity, int8_sensitivity=p.int8_sensitivity, why=p.why)
                              for p in plans]
    report.details["tried"] = [dict(label=c.label, size=c.size, drop=c.drop, seconds=round(c.seconds, 2),
                                    forms=c.counts()) for c in tried]
    report.seconds = seconds
    report.options = budget.options()
    return report
