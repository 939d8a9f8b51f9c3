"""Checks of ocomp's custom nodes (domain `ocomp`): the same checks the runtime makes when it creates a
kernel (runtime/ternary_conv.cc, runtime/ternary_gemm.cc, runtime/common.cc), made in Python before a
model is inspected, run or compressed, so a malformed node is one clear error line instead of nonsense
figures or an onnxruntime error. The op signatures are in README.md, "Op signatures".
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, numpy_helper

from .errors import OcompError
from .graph import CUSTOM_DOMAIN
from .layers import TERNARY_OPS

W2A8_ATTRS = {"act_quant", "act_scale", "act_zero_point", "activation", "clip_min", "clip_max"}  # all three ops
CHAIN_ATTRS = {"input_layout", "output_layout", "output_scale", "output_zero_point"}  # TernaryConv (int8 chaining)
CODES_LAYOUT = "nhwc_c4"  # uint8 [N, H, W, round4(C)] (runtime/w2a8_ops.h)
MAX_WEIGHT_DIM = 1 << 24  # weight_shape values, as in the runtime
MAX_ATTR = 1 << 16  # kernel, stride, dilation and pad values, as in the runtime
_INT32_MAX = 2**31 - 1
_CODE_INVALID = 0b11


def check_nodes(model: onnx.ModelProto, what: str = "model") -> None:
    """Raise OcompError naming the model, the node and the problem for the first malformed ocomp node, or
    standard weighted layer whose constant weight has the wrong rank (ONNX's checker does not look at
    shapes, and shape inference is lenient on models with custom ops)."""
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == AttributeProto.TENSOR:
                    constants[node.output[0]] = attr.t
    shapes = _known_shapes(model)
    writers = {out: node for node in model.graph.node for out in node.output if out}
    for index, node in enumerate(model.graph.node):
        name = node.name or next((o for o in node.output if o), f"#{index}")
        try:
            if node.domain == CUSTOM_DOMAIN:
                _check_node(node, constants, shapes)
                _check_chained_input(node, writers)
            elif node.domain in ("", "ai.onnx") and node.op_type in _WEIGHT_RANKS:
                _check_weight_rank(node, constants)
        except _Bad as exc:
            raise OcompError(f"{what}: node '{name}' ({node.op_type}): {exc}") from None

# standard weighted ops: (input index of the weight, allowed ranks of a constant weight)
_WEIGHT_RANKS = {"Conv": (1, range(3, 9)), "ConvTranspose": (1, range(3, 9)), "Gemm": (1, (2,)),
                 "MatMul": (1, range(1, 9))}


def _check_weight_rank(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> None:
    slot, ranks = _WEIGHT_RANKS[node.op_type]
    if len(node.input) <= slot or node.input[slot] not in constants:
        return
    dims = list(constants[node.input[slot]].dims)
    if len(dims) not in ranks:
        allowed = "2" if tuple(ranks) == (2,) else f"{min(ranks)} or more"
        raise _Bad(f"weight '{node.input[slot]}' has shape {_text(dims)}; {node.op_type} needs a weight of rank "
                   f"{allowed}")


class _Bad(Exception):
    pass


def _check_node(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto], shapes: dict[str, list]) -> None:
    if node.op_type not in TERNARY_OPS:
        raise _Bad(f"unknown op in domain '{CUSTOM_DOMAIN}' (known: {', '.join(TERNARY_OPS)})")
    conv = node.op_type == "TernaryConv"
    if conv and len(node.input) == 5:  # input 4: the fused residual Add's float tensor, of the output's shape
        _check_residual(node, shapes)
    elif not 3 <= len(node.input) <= 4:
        extra = ", an optional bias and an optional residual" if conv else " and an optional bias"
        raise _Bad(f"expects inputs X, packed, alpha{extra}, has {len(node.input)} input(s)")
    if any(not name for name in node.input[:3]):
        raise _Bad("expects inputs X, packed, alpha and an optional bias, has an empty one of the first three")
    attrs = {a.name: a for a in node.attribute}
    rank = 4 if conv else 2
    layout = "(K, C/group, kH, kW)" if conv else "(N, Kin)"
    if "weight_shape" not in attrs:
        raise _Bad(f"attribute weight_shape {layout} is required")
    weight_shape = _ints(attrs["weight_shape"], "weight_shape")
    if len(weight_shape) != rank:
        raise _Bad(f"weight_shape must have {rank} values {layout}, got {_text(weight_shape)}")
    if any(not 1 <= v <= MAX_WEIGHT_DIM for v in weight_shape):
        raise _Bad(f"weight_shape values must be in [1, 2^24], got {_text(weight_shape)}")
    outputs = weight_shape[0]
    rows = int(np.prod(weight_shape[1:], dtype=np.int64))
    if rows > _INT32_MAX:
        raise _Bad(f"weight_shape {_text(weight_shape)} is too large")
    _check_w2a8_attrs(attrs)
    if conv:
        _check_chain_attrs(node, attrs, weight_shape)
    if conv and "output_layout" in attrs:
        if len(node.output) != 2 or not node.output[1]:
            raise _Bad(f"output_layout writes output 1 (uint8 codes), which the node lacks (outputs "
                       f"{list(node.output)})")
    elif len(node.output) != 1 or not node.output[0]:
        raise _Bad(f"has outputs {list(node.output)}, expects one (Y; output 1 only with output_layout)")
    if conv:
        _check_conv_attrs({k: v for k, v in attrs.items() if k not in W2A8_ATTRS | CHAIN_ATTRS}, weight_shape)
    elif set(attrs) - {"weight_shape"} - W2A8_ATTRS:
        raise _Bad(f"unknown attribute(s) {', '.join(sorted(set(attrs) - {'weight_shape'} - W2A8_ATTRS))}")
    count = outputs * rows
    packed = constants.get(node.input[1])
    if packed is not None:
        if packed.data_type != onnx.TensorProto.UINT8:
            raise _Bad(f"packed weights must be uint8, got {onnx.TensorProto.DataType.Name(packed.data_type)}")
        codes = _array(packed, "packed weights").reshape(-1)
        if codes.size != (count + 3) // 4:
            raise _Bad(f"packed weights have {codes.size} bytes, expected {(count + 3) // 4} "
                       f"(ceil({count} weights / 4)) for weight_shape {_text(weight_shape)}")
        pairs = np.stack([(codes >> shift) & 0b11 for shift in (0, 2, 4, 6)], axis=1).reshape(-1)
        bad = np.flatnonzero(pairs == _CODE_INVALID)
        if bad.size:
            where = (f"at weight index {int(bad[0])} (byte {int(bad[0]) // 4})" if bad[0] < count
                     else "in the padding of the last packed byte")
            raise _Bad(f"invalid 2-bit code 0b11 in packed weights {where}")
    for slot, name in ((2, "alpha"), (3, "bias")):
        if slot >= len(node.input) or not node.input[slot] or node.input[slot] not in constants:
            continue
        tensor = constants[node.input[slot]]
        if tensor.data_type != onnx.TensorProto.FLOAT:
            raise _Bad(f"{name} must be float32, got {onnx.TensorProto.DataType.Name(tensor.data_type)}")
        if list(tensor.dims) != [outputs]:
            raise _Bad(f"{name} must have shape [{outputs}], got {_text(list(tensor.dims))}")
        _array(tensor, name)
    x_shape = shapes.get(node.input[0])
    if x_shape is not None and conv and "input_layout" in attrs:
        padded = (weight_shape[1] * _int_attr(attrs, "group", 1) + 3) // 4 * 4
        if len(x_shape) != 4 or (isinstance(x_shape[3], int) and x_shape[3] != padded):
            raise _Bad(f"X (input_layout {CODES_LAYOUT}) must be 4-D [N,H,W,{padded}], got shape {_text(x_shape)}")
    elif x_shape is not None:
        if conv and len(x_shape) != 4:
            raise _Bad(f"X must be 4-D [N,C,H,W], got shape {_text(x_shape)}")
        if node.op_type == "TernaryGemm" and len(x_shape) != 2:
            raise _Bad(f"X must be 2-D [M, Kin], got shape {_text(x_shape)}")
        if node.op_type == "TernaryMatMul" and len(x_shape) < 1:
            raise _Bad("X must have rank >= 1, got a scalar")
        if conv:
            group = _int_attr(attrs, "group", 1)
            if isinstance(x_shape[1], int) and x_shape[1] != weight_shape[1] * group:
                raise _Bad(f"X has {x_shape[1]} channels, but weight_shape[1] * group = {weight_shape[1]} * {group}"
                           f" = {weight_shape[1] * group}")
        elif isinstance(x_shape[-1], int) and x_shape[-1] != weight_shape[1]:
            raise _Bad(f"X has {x_shape[-1]} features in its last dimension, but weight_shape[1] (Kin) is "
                       f"{weight_shape[1]}")


def _check_chain_attrs(node: onnx.NodeProto, attrs: dict[str, AttributeProto], weight_shape: list[int]) -> None:
    """int8 chaining attributes, as runtime/w2a8.cc (read_chain_attrs) and ternary_conv.cc read them."""
    layouts = {}
    for name in ("input_layout", "output_layout"):
        value = _string_attr(attrs, name)
        if value:
            if value != CODES_LAYOUT:
                raise _Bad(f"{name} must be \"{CODES_LAYOUT}\", got \"{value}\"")
            layouts[name] = value
    scale = _float_attr(attrs, "output_scale")
    zero_point = _int_attr(attrs, "output_zero_point", 0) if "output_zero_point" in attrs else None
    if "output_layout" not in layouts:
        if scale is not None or zero_point is not None:
            raise _Bad("output_scale / output_zero_point need output_layout")
    else:
        if scale is None:
            raise _Bad("output_layout needs output_scale")
        if not (np.isfinite(scale) and scale > 0):
            raise _Bad(f"output_scale must be a finite number > 0, got {scale}")
        if zero_point is not None and not 0 <= zero_point <= 255:
            raise _Bad(f"output_zero_point must be in [0, 255] (uint8), got {zero_point}")
    if not layouts:
        return
    mode = _string_attr(attrs, "act_quant") or ("static" if "act_scale" in attrs else None)
    if mode is None or weight_shape[1] == 1:
        raise _Bad("input_layout / output_layout need int8 activations (act_quant) and C/group > 1")
    if "input_layout" in layouts and (mode != "static" or _int_attr(attrs, "group", 1) != 1):
        raise _Bad("input_layout needs act_quant=static (the codes' scale and zero point) and group 1")


def _check_chained_input(node: onnx.NodeProto, writers: dict[str, onnx.NodeProto]) -> None:
    """A TernaryConv reading codes (input_layout) from a TernaryConv writing them (output_layout): the codes
    must be quantized as the reader's act_scale / act_zero_point say (the runtime cannot see the writer)."""
    attrs = {a.name: a for a in node.attribute}
    writer = writers.get(node.input[0]) if node.input else None
    if "input_layout" not in attrs or writer is None or writer.domain != CUSTOM_DOMAIN:
        return
    wattrs = {a.name: a for a in writer.attribute}
    if "output_layout" not in wattrs:
        raise _Bad(f"input_layout reads '{node.input[0]}', which {writer.op_type} '{writer.name}' does not write as "
                   f"codes (no output_layout)")
    ours = (_float_attr(attrs, "act_scale"), _int_attr(attrs, "act_zero_point", 0))
    theirs = (_float_attr(wattrs, "output_scale"), _int_attr(wattrs, "output_zero_point", 0))
    if ours != theirs:
        raise _Bad(f"input_layout codes from '{writer.name}' are quantized with output_scale={theirs[0]} "
                   f"output_zero_point={theirs[1]}, but this node's act_scale={ours[0]} act_zero_point={ours[1]}")


def _check_residual(node: onnx.NodeProto, shapes: dict[str, list]) -> None:
    """TernaryConv's input 4 (a fused residual Add): the runtime requires exactly the output's shape."""
    residual, output = shapes.get(node.input[4]), shapes.get(node.output[0]) if node.output else None
    if residual is not None and output is not None and len(residual) == len(output):
        if any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(residual, output)):
            raise _Bad(f"residual '{node.input[4]}' has shape {_text(residual)}, but the output has shape "
                       f"{_text(output)} (the residual must have the output's shape)")
    elif residual is not None and output is not None:
        raise _Bad(f"residual '{node.input[4]}' has rank {len(residual)}, the output rank {len(output)}")


def _check_w2a8_attrs(attrs: dict[str, AttributeProto]) -> None:
    """The int8-activation and fused-activation attributes, as runtime/w2a8.cc reads them."""
    mode = _string_attr(attrs, "act_quant")
    scale = _float_attr(attrs, "act_scale")
    zero_point = _int_attr(attrs, "act_zero_point", 0) if "act_zero_point" in attrs else None
    if mode == "dynamic":
        if scale is not None or zero_point is not None:
            raise _Bad("act_quant=dynamic takes no act_scale / act_zero_point")
    elif mode == "static" or (mode is None and scale is not None):
        if scale is None:
            raise _Bad("act_quant=static needs act_scale")
        if not (np.isfinite(scale) and scale > 0):
            raise _Bad(f"act_scale must be a finite number > 0, got {scale}")
        if zero_point is not None and not 0 <= zero_point <= 255:
            raise _Bad(f"act_zero_point must be in [0, 255] (uint8), got {zero_point}")
    elif mode:
        raise _Bad(f"act_quant must be \"static\" or \"dynamic\", got \"{mode}\"")
    elif zero_point is not None:
        raise _Bad("act_zero_point given without act_scale")
    activation = _string_attr(attrs, "activation")
    if activation not in (None, "", "Relu", "Clip"):
        raise _Bad(f"activation must be \"Relu\" or \"Clip\", got \"{activation}\"")
    low, high = _float_attr(attrs, "clip_min"), _float_attr(attrs, "clip_max")
    if activation == "Clip" and low is not None and high is not None and not low <= high:
        raise _Bad("clip_min must be <= clip_max")


def _string_attr(attrs: dict[str, AttributeProto], name: str) -> str | None:
    if name not in attrs:
        return None
    if attrs[name].type != AttributeProto.STRING:
        raise _Bad(f"attribute {name} must be a string, it is {AttributeProto.AttributeType.Name(attrs[name].type)}")
    return attrs[name].s.decode("utf-8", "replace")


def _float_attr(attrs: dict[str, AttributeProto], name: str) -> float | None:
    if name not in attrs:
        return None
    if attrs[name].type != AttributeProto.FLOAT:
        raise _Bad(f"attribute {name} must be a float, it is {AttributeProto.AttributeType.Name(attrs[name].type)}")
    return float(attrs[name].f)


def _check_conv_attrs(attrs: dict[str, AttributeProto], weight_shape: list[int]) -> None:
    known = {"weight_shape", "kernel_shape", "strides", "pads", "dilations", "group", "auto_pad"}
    unknown = set(attrs) - known
    if unknown:
        raise _Bad(f"unknown attribute(s) {', '.join(sorted(unknown))}")
    k, _, kh, kw = weight_shape
    if kh > MAX_ATTR or kw > MAX_ATTR:
        raise _Bad(f"kernel too large in weight_shape {_text(weight_shape)}")
    group = _int_attr(attrs, "group", 1)
    if group < 1:
        raise _Bad(f"group must be >= 1, got {group}")
    if k % group:
        raise _Bad(f"K={k} (weight_shape[0]) is not divisible by group={group}")
    if "kernel_shape" in attrs:
        kernel = _ints(attrs["kernel_shape"], "kernel_shape")
        if kernel != [kh, kw]:
            raise _Bad(f"kernel_shape {_text(kernel)} does not match weight_shape {_text(weight_shape)}")
    for name in ("strides", "dilations"):
        if name in attrs:
            values = _ints(attrs[name], name)
            if len(values) != 2 or any(not 1 <= v <= MAX_ATTR for v in values):
                raise _Bad(f"{name} must be 2 values in [1, 65536], got {_text(values)}")
    if "pads" in attrs:
        pads = _ints(attrs["pads"], "pads")
        if len(pads) != 4 or any(not 0 <= p <= MAX_ATTR for p in pads):
            raise _Bad(f"pads must be 4 values in [0, 65536] (x1_begin, x2_begin, x1_end, x2_end), got {_text(pads)}")
    if "auto_pad" in attrs:
        attr = attrs["auto_pad"]
        if attr.type != AttributeProto.STRING:
            raise _Bad("auto_pad must be a string")
        value = attr.s.decode("utf-8", "replace")
        if value not in ("", "NOTSET"):
            raise _Bad(f"auto_pad={value} is not supported; write explicit pads")


def _ints(attr: AttributeProto, name: str) -> list[int]:
    if attr.type != AttributeProto.INTS:
        kind = AttributeProto.AttributeType.Name(attr.type)
        raise _Bad(f"attribute {name} must be a list of integers, it is {kind}")
    return [int(v) for v in attr.ints]


def _int_attr(attrs: dict[str, AttributeProto], name: str, default: int) -> int:
    if name not in attrs:
        return default
    attr = attrs[name]
    if attr.type != AttributeProto.INT:
        kind = AttributeProto.AttributeType.Name(attr.type)
        raise _Bad(f"attribute {name} must be an integer, it is {kind}")
    return int(attr.i)


def _array(tensor: onnx.TensorProto, name: str) -> np.ndarray:
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError) as exc:
        raise _Bad(f"{name} cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _known_shapes(model: onnx.ModelProto) -> dict[str, list]:
    shapes: dict[str, list] = {}
    for value in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        tensor_type = value.type.tensor_type
        if value.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            shapes[value.name] = [int(d.dim_value) if d.HasField("dim_value") else d.dim_param or None
                                  for d in tensor_type.shape.dim]
    return shapes


def _text(values) -> str:
    return "(" + ", ".join(str(v) for v in values) + ")"
