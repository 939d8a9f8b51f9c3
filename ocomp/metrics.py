"""Model statistics (params, MACs, weight bits, file size) and the one streaming metrics accumulator
(accuracy, agreement, cosine, SNR, errors) used by eval, compare, compress --eval, the accuracy guard,
the pruning scan and the benchmarks.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .layers import layer_of, numel
from .model import graph_inputs, input_dims, with_outputs


@dataclass
class LayerStats:
    name: str
    op: str
    weight_shape: list[int]
    output_shape: list[int | str | None]
    params: int
    macs: int
    weight_dtype: str
    weight_bits: float  # stored bits per weight, as in the file


@dataclass
class ModelStats:
    ops: dict[str, int]
    layers: list[LayerStats]
    params: int
    macs: int
    weight_bytes: int
    file_size: int | None = None
    inputs: dict[str, list] = field(default_factory=dict)
    # layers whose output shape is unknown even after running the model once: their MACs are not counted
    unknown_macs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    shapes = {}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            shapes[v.name] = input_dims(v)
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _is_shape_constant(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and len(tensor.dims) <= 1


def _known(dims) -> bool:
    """A shape known apart from its first (batch) axis."""
    return bool(dims) and all(isinstance(d, int) and d > 0 for d in list(dims)[1:])


def _measured_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, list[int]]:
    """Shapes of `names` from one onnxruntime run at batch 1 on zeros (ocomp custom ops when the runtime is
    built), for tensors static shape inference cannot size: e.g. a Reshape whose target shape is computed
    by Shape/Slice/Concat. Empty when an input has unknown non-batch dims or the run fails."""
    feeds = {}
    for value in graph_inputs(model):
        dims = input_dims(value)
        if not _known(dims):
            return {}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = np.zeros([1] + [int(d) for d in dims[1:]], dtype=dtype)
    probe = with_outputs(model, names)
    try:
        from .session import make_session

        runner = make_session(probe)
        values = runner.run(names, feeds)
    except Exception:  # noqa: BLE001 - a model ORT cannot run keeps its unknown shapes
        return {}
    return {name: [1] + list(value.shape[1:]) for name, value in zip(names, values)}


CODES_LAYOUT = "nhwc_c4"  # a chained TernaryConv's uint8 codes: [N, H, W, round4(C)] (runtime/w2a8_ops.h)


def _output(node: gs.Node) -> gs.Variable:
    """The tensor a layer writes: a chained TernaryConv (output_layout) writes output 1, its uint8 codes."""
    if node.attrs.get("output_layout") == CODES_LAYOUT and len(node.outputs) > 1:
        return node.outputs[1]
    return node.outputs[0]


def _nchw(shape: list, node: gs.Node, attr: str, axis: int) -> list:
    """A chained tensor's [N, H, W, padded C] shape as the [N, C, H, W] it stands for (C: weight_shape[0] of
    the writer, weight_shape[1] * group of the reader); other shapes as they are."""
    if node.attrs.get(attr) != CODES_LAYOUT or len(shape) != 4:
        return shape
    weight_shape = node.attrs["weight_shape"]
    channels = weight_shape[0] if axis == 0 else weight_shape[1] * node.attrs.get("group", 1)
    return [shape[0], int(channels), shape[1], shape[2]]


def model_stats(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> ModelStats:
    """Params, MACs (batch 1) and storage of every weighted layer (the layer table, ocomp/layers.py); the
    model must have inferred shapes.

    Layer outputs that static shape inference leaves unsized are measured by one onnxruntime run at batch 1
    (when every input is sized apart from the batch); layers still unsized are listed in `unknown_macs`."""
    shapes = _shapes(model)
    inits = constant_tensors(model)
    graph = gs.import_onnx(model)
    visible = dict(inits)
    stored = _dequantized_weights(graph, visible)  # int8 QDQ weights: counted as the layers they are
    layers_found = [(node, layer) for node in graph.nodes
                    for layer in [layer_of(node)] if layer is not None and node.inputs[1].name in visible]
    unsized = [_output(node).name for node, _ in layers_found if not _known(shapes.get(_output(node).name, []))]
    if unsized:
        shapes.update(_measured_shapes(model, unsized))
    layers: list[LayerStats] = []
    counted: set[str] = set()
    for node, layer in layers_found:
        weight = stored[node.inputs[1].name][0] if node.inputs[1].name in stored else visible[node.inputs[1].name]
        out_shape = _nchw(shapes.get(_output(node).name, []), node, "output_layout", 0)
        in_shape = _nchw(shapes.get(node.inputs[0].name, []), node, "input_layout", 1)
        nbytes = _tensor_nbytes(weight)
        wshape = list(layer.weight_shape)
        params = numel(wshape)
        bias_params = 0
        for extra in (t.name for t in node.inputs[2:]):
            if extra in visible and extra not in counted:
                bias_params += numel(visible[extra].dims)
        counted.update(t.name for t in node.inputs[1:])
        for t in node.inputs[1:]:
            if t.name in stored:  # the quantized tensor, its scale and zero point belong to the layer
                counted.update(stored[t.name][1])
        macs = layer.macs(in_shape, out_shape) if out_shape else 0
        dtype = "ternary" if layer.ternary else onnx.helper.tensor_dtype_to_np_dtype(weight.data_type).name
        layers.append(LayerStats(node.name or _output(node).name, node.op, wshape, out_shape,
                                 params + bias_params, macs, dtype, round(8.0 * nbytes / max(params, 1), 3)))
    params = sum(layer.params for layer in layers)
    for name, init in inits.items():
        if name not in counted and not _is_shape_constant(init):
            params += numel(init.dims)
    weight_bytes = sum(_tensor_nbytes(i) for i in inits.values())
    size = os.path.getsize(path) if path is not None and os.path.exists(path) else None
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node)
    inputs = {v.name: input_dims(v) for v in graph_inputs(model)}
    unknown = [la.name for la in layers if not _known(la.output_shape)]
    return ModelStats(dict(sorted(ops.items())), layers, params, sum(la.macs for la in layers), weight_bytes, size,
                      inputs, unknown)


def _dequantized_weights(graph: gs.Graph, inits: dict[str, onnx.TensorProto]
                         ) -> dict[str, tuple[onnx.TensorProto, list[str]]]:
    """Weights stored quantized (DequantizeLinear of constants, as onnxruntime's QDQ format has them): the
    DequantizeLinear output becomes a float constant in `graph` (so the layer table sees the layer) and in
    `inits`; returns {weight name: (the stored (int8) tensor, the DequantizeLinear's input names)} for the
    size and dtype figures and for counting the quantizer's tensors with the layer."""
    stored = {}
    for node in graph.nodes:
        if node.op != "DequantizeLinear" or not node.outputs or node.inputs[0].name not in inits:
            continue
        values = [numpy_helper.to_array(inits[t.name]) if t.name in inits else None for t in node.inputs[:3]]
        if values[1] is None or (len(node.inputs) > 2 and node.inputs[2].name and values[2] is None):
            continue
        q, scale = values[0].astype(np.float64), values[1].astype(np.float64)
        zero = values[2].astype(np.float64) if len(values) > 2 and values[2] is not None else np.zeros_like(scale)
        if scale.ndim == 1 and q.ndim > 1:
            axis = int(node.attrs.get("axis", 1)) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        out = node.outputs[0]
        weight = ((q - zero) * scale).astype(np.float32)
        inits[out.name] = numpy_helper.from_array(weight, out.name)
        stored[out.name] = (inits[node.inputs[0].name], [t.name for t in node.inputs if t.name])
        for reader in list(out.outputs):
            reader.inputs[reader.inputs.index(out)] = gs.Constant(out.name, weight)
    return stored


def constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node tensors (some exporters store weights as Constant nodes), by name."""
    tensors = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tensors[node.output[0]] = attr.t
    return tensors


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.raw_data:
        return len(tensor.raw_data)
    return int(numpy_helper.to_array(tensor).nbytes)


# ---------------------------------------------------------------- output metrics


class OutputMetrics:
    """Streaming comparison of one output with a reference output, batch by batch (float64 sums, no outputs
    kept): max abs / rel error, cosine, SNR in dB (the reference as the signal), top-1 agreement of class
    scores ((N, C) outputs with C > 1) and, for score maps (other outputs whose reference values all lie in
    [0, 1]), the IoU of the maps thresholded at `map_threshold`. Non-finite values are counted, and make
    cosine and SNR NaN: they are never reported as a match."""

    def __init__(self, map_threshold: float = 0.5) -> None:
        self.map_threshold = map_threshold
        self.dot = self.norm_a = self.norm_b = self.noise = 0.0
        self.max_abs = self.max_ref = 0.0
        self.agree = self.rows = 0
        self.low, self.high = math.inf, -math.inf
        self.intersection = self.union = 0
        self.non_finite = 0
        self.values = 0

    def add(self, reference: np.ndarray, output: np.ndarray) -> None:
        reference, output = np.asarray(reference), np.asarray(output)
        if reference.shape != output.shape:
            raise ValueError(f"output shapes differ: reference {reference.shape}, output {output.shape}")
        a = reference.astype(np.float64).reshape(-1)
        b = output.astype(np.float64).reshape(-1)
        self.values += a.size
        finite = np.isfinite(a) & np.isfinite(b)
        if not finite.all():
            self.non_finite += int(a.size - finite.sum())
            return
        self.dot += float(a @ b)
        self.norm_a += float(a @ a)
        self.norm_b += float(b @ b)
        diff = a - b
        self.noise += float(diff @ diff)
        if a.size:
            self.max_abs = max(self.max_abs, float(np.abs(diff).max()))
            self.max_ref = max(self.max_ref, float(np.abs(a).max()))
            self.low, self.high = min(self.low, float(a.min())), max(self.high, float(a.max()))
        if reference.ndim == 2 and reference.shape[1] > 1:
            self.agree += int(np.sum(reference.argmax(1) == output.argmax(1)))
            self.rows += reference.shape[0]
        pa, pb = a >= self.map_threshold, b >= self.map_threshold
        self.intersection += int(np.sum(pa & pb))
        self.union += int(np.sum(pa | pb))

    @property
    def classifier(self) -> bool:
        return self.rows > 0

    def result(self) -> dict[str, Any]:
        if self.non_finite:
            return {"max_abs": float("nan"), "max_rel": float("nan"), "cosine": float("nan"),
                    "snr_db": float("nan"), "non_finite": self.non_finite}
        denom = math.sqrt(self.norm_a * self.norm_b)
        out: dict[str, Any] = {
            "max_abs": self.max_abs,
            "max_rel": self.max_abs / self.max_ref if self.max_ref > 0 else self.max_abs,
            "cosine": self.dot / denom if denom > 0 else float(self.norm_a == self.norm_b),
            "snr_db": 10 * math.log10(self.norm_a / self.noise) if self.noise > 0 else float("inf"),
        }
        if self.classifier:
            out["agreement"] = self.agree / self.rows
        elif self.values and 0.0 <= self.low and self.high <= 1.0:
            out["map_iou"] = self.intersection / self.union if self.union else 1.0
        return out


def compare_outputs(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """OutputMetrics of `b` against the reference `a`, for whole arrays."""
    metrics = OutputMetrics()
    metrics.add(a, b)
    return metrics.result()


class Accuracy:
    """Streaming top-1 / top-5 accuracy of class scores against integer labels."""

    def __init__(self) -> None:
        self.top1 = self.top5 = self.samples = 0

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        n = len(labels)
        scores = np.asarray(scores).reshape(n, -1)
        k = min(5, scores.shape[1])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        hits = top == np.asarray(labels).reshape(-1, 1)
        self.top1 += int(hits[:, 0].sum())
        self.top5 += int(hits.any(axis=1).sum())
        self.samples += n

    def result(self) -> dict[str, float]:
        n = max(self.samples, 1)
        return {"top1": self.top1 / n, "top5": self.top5 / n}


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Top-1 (k=1) or top-5 (k=5) accuracy of whole arrays."""
    if k not in (1, 5):
        raise ValueError("k must be 1 or 5")
    accuracy = Accuracy()
    accuracy.add(logits, labels)
    return accuracy.result()[f"top{k}"]
