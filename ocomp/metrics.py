"""Model statistics (params, MACs, weight bits, file size) and output-comparison metrics."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .model import graph_inputs, input_dims, with_outputs

TERNARY_OPS = ("TernaryConv", "TernaryGemm", "TernaryMatMul")
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul") + TERNARY_OPS


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


def _numel(dims) -> int:
    """Elements of a shape, symbolic or unknown dims counted as 1 (MACs are reported at batch 1)."""
    return int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in dims], dtype=np.int64))


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
        from .evaluate import make_session  # (evaluate imports this module)

        runner = make_session(probe)
        values = runner.run(names, feeds)
    except Exception:  # noqa: BLE001 - a model ORT cannot run keeps its unknown shapes
        return {}
    return {name: [1] + list(value.shape[1:]) for name, value in zip(names, values)}


def model_stats(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> ModelStats:
    """Params, MACs (batch 1) and storage of every weighted layer; the model must have inferred shapes.

    Layer outputs that static shape inference leaves unsized are measured by one onnxruntime run at batch 1
    (when every input is sized apart from the batch); layers still unsized are listed in `unknown_macs`."""
    shapes = _shapes(model)
    inits = constant_tensors(model)
    unsized = [n.output[0] for n in model.graph.node if n.op_type in WEIGHTED_OPS and len(n.input) > 1
               and n.input[1] in inits and not _known(shapes.get(n.output[0], []))]
    if unsized:
        shapes.update(_measured_shapes(model, unsized))
    layers: list[LayerStats] = []
    counted: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        out_shape = shapes.get(node.output[0], [])
        nbytes = _tensor_nbytes(weight)
        if node.op_type in TERNARY_OPS:
            wshape = [int(d) for d in _attr(node, "weight_shape", [])]
        else:
            wshape = list(weight.dims)
        params = _numel(wshape)
        bias_params = 0
        for extra in node.input[2:]:
            if extra in inits and extra not in counted:
                bias_params += _numel(inits[extra].dims)
        for extra in node.input[1:]:
            counted.add(extra)
        macs = _layer_macs(node.op_type, wshape, out_shape, _attr(node, "group", 1), _attr(node, "transB", 0))
        dtype = "ternary" if node.op_type in TERNARY_OPS else onnx.helper.tensor_dtype_to_np_dtype(weight.data_type).name
        layers.append(LayerStats(node.name or node.output[0], node.op_type, wshape, out_shape,
                                 params + bias_params, macs, dtype, round(8.0 * nbytes / max(params, 1), 3)))
    params = sum(layer.params for layer in layers)
    for name, init in inits.items():
        if name not in counted and not _is_shape_constant(init):
            params += _numel(init.dims)
    weight_bytes = sum(_tensor_nbytes(i) for i in inits.values())
    size = os.path.getsize(path) if path is not None and os.path.exists(path) else None
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node)
    inputs = {v.name: input_dims(v) for v in graph_inputs(model)}
    unknown = [la.name for la in layers if not _known(la.output_shape)]
    return ModelStats(dict(sorted(ops.items())), layers, params, sum(la.macs for la in layers), weight_bytes, size,
                      inputs, unknown)


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


def _layer_macs(op: str, wshape: list[int], out_shape, group: int, trans_b: int) -> int:
    if not wshape or not out_shape:
        return 0
    if op in ("Conv", "TernaryConv"):
        # every output element sums C/group * kH * kW products
        return _numel(out_shape) * _numel(wshape[1:])
    if op == "Gemm":
        k = wshape[1] if trans_b else wshape[0]
        return _numel(out_shape) * k
    if op == "MatMul":
        return _numel(out_shape) * wshape[-2]
    if op in ("TernaryGemm", "TernaryMatMul"):
        return _numel(out_shape) * wshape[1]
    return 0


# ---------------------------------------------------------------- output comparison


def compare_outputs(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Max abs / rel error, cosine similarity, SNR (dB, `a` as reference) and top-1 agreement."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: {a.shape} vs {b.shape}")
    diff = np.abs(a - b)
    scale = np.max(np.abs(a)) if a.size else 0.0
    fa, fb = a.reshape(-1), b.reshape(-1)
    denom = np.linalg.norm(fa) * np.linalg.norm(fb)
    noise = float(np.sum((a - b) ** 2))
    result = {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "max_rel": float(diff.max() / scale) if scale > 0 else float(diff.max() if diff.size else 0.0),
        "cosine": float(fa @ fb / denom) if denom > 0 else float(np.array_equal(fa, fb)),
        "snr_db": float(10 * np.log10(np.sum(a**2) / noise)) if noise > 0 else float("inf"),
    }
    if a.ndim >= 2 and a.shape[-1] > 1:
        result["top1_agreement"] = float(np.mean(a.reshape(-1, a.shape[-1]).argmax(-1) ==
                                                 b.reshape(-1, b.shape[-1]).argmax(-1)))
    return result


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    logits = np.asarray(logits).reshape(len(labels), -1)
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(np.mean((top == np.asarray(labels).reshape(-1, 1)).any(axis=1)))
