"""W2A8 (int8 activations) in the ocomp runtime: TernaryConv / TernaryGemm / TernaryMatMul with act_scale,
act_zero_point or act_quant="dynamic", and the fused activation attribute.

The integer paths are exact, so outputs are compared for equality:
  * against an independent numpy reference (quantize, integer convolution in int64, the float32 epilogue
    float32(acc - z * wsum) * float32(alpha * s) + bias, clamp), and
  * between every W2A8 path the CPU runs (OCOMP_ISA=scalar, avx2, avxvnni-evex, avx512vnni, ...), each in a
    fresh process because the path is chosen once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import ocomp.runtime as rt
from ocomp.passes.ternary import pack_ternary

from test_runtime import conv_attrs, expect_ort_error, require_library, run_ternary, ternary, ternary_node_model

TESTS = Path(__file__).resolve().parent

# (n, cg, kg, group, h, w, kh, kw, strides, pads, dilations): 3x3 stride 1/2, 1x1, depthwise, grouped,
# dilated; channel counts that are not multiples of 4 (quads) or 16 (panels); widths that are not
# multiples of the 8-pixel run.
CONV_CASES = [
    (1, 16, 32, 1, 9, 11, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (2, 5, 20, 1, 13, 17, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1)),
    (1, 64, 40, 1, 7, 7, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 3, 7, 2, 10, 10, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)),
    (1, 33, 17, 1, 6, 5, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1)),
    (1, 1, 1, 8, 11, 9, 3, 3, (2, 2), (1, 0, 1, 2), (1, 2)),  # depthwise, strided, dilated
    (2, 1, 2, 6, 12, 12, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),  # depthwise multiplier 2
    (1, 6, 9, 1, 12, 19, 5, 3, (1, 2), (2, 1, 2, 1), (2, 1)),
    (1, 1, 16, 1, 28, 28, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),  # a first layer: one input channel
    (1, 32, 24, 1, 5, 37, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),  # 16-channel transposition blocks and a tail
    (1, 48, 20, 1, 9, 40, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1)),  # strided 1x1: rows no output reads
    (1, 1, 1, 4, 61, 38, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),  # depthwise plane summed in several chunks
    (1, 1, 1, 3, 120, 45, 3, 3, (2, 2), (1, 1, 1, 1), (2, 2)),  # depthwise strided, dilated, several chunks
]
# (M, Kin, N)
GEMM_CASES = [(1, 512, 100), (3, 70, 30), (9, 129, 17), (20, 64, 1000)]


def quantize(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """The documented rule: clamp(round_half_even(x * float32(1 / scale)) + z, 0, 255)."""
    inv = np.float32(1.0) / np.float32(scale)
    return np.clip(np.rint(x.astype(np.float32) * inv) + zero_point, 0, 255).astype(np.int64)


def int_conv(q: np.ndarray, t: np.ndarray, z: int, attrs: dict) -> np.ndarray:
    """sum over the window of (q - z) * t in int64 (zero-point padding contributes 0)."""
    n, c, h, w = q.shape
    k, cg, kh, kw = t.shape
    g = attrs["group"]
    sh, sw = attrs["strides"]
    pt, pl, pb, pr = attrs["pads"]
    dh, dw = attrs["dilations"]
    xp = np.zeros((n, c, h + pt + pb, w + pl + pr), np.int64)
    xp[:, :, pt:pt + h, pl:pl + w] = q - z
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, k, oh, ow), np.int64)
    kg = k // g
    for gi in range(g):
        xs = xp[:, gi * cg:(gi + 1) * cg]
        tg = t[gi * kg:(gi + 1) * kg].astype(np.int64)
        for ky in range(kh):
            for kx in range(kw):
                patch = xs[:, :, ky * dh:ky * dh + sh * (oh - 1) + 1:sh, kx * dw:kx * dw + sw * (ow - 1) + 1:sw]
                out[:, gi * kg:(gi + 1) * kg] += np.einsum("nchw,kc->nkhw", patch, tg[:, :, ky, kx])
    return out


def epilogue(acc: np.ndarray, alpha, bias, scale: float, channel_axis: int, lo=-np.inf, hi=np.inf) -> np.ndarray:
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    mul = (np.asarray(alpha, np.float32) * np.float32(scale)).reshape(shape)
    y = acc.astype(np.float32) * mul
    if bias is not None:
        y = y + np.asarray(bias, np.float32).reshape(shape)
    return np.clip(y, np.float32(lo), np.float32(hi)).astype(np.float32)


def conv_case(seed: int, case, scale=0.03, zero_point=117, activation=None, dynamic=False):
    rng = np.random.default_rng(seed)
    n, cg, kg, group, h, w, kh, kw, strides, pads, dilations = case
    c, k = cg * group, kg * group
    t = ternary(rng, (k, cg, kh, kw))
    alpha = rng.uniform(0.5, 1.5, k).astype(np.float32)
    bias = rng.normal(size=k).astype(np.float32)
    attrs = conv_attrs(t.shape, strides, pads, dilations, group)
    x = rng.normal(size=(n, c, h, w)).astype(np.float32) * 2
    act = dict(act_quant="dynamic") if dynamic else dict(act_scale=scale, act_zero_point=zero_point)
    if activation is not None:
        act.update(activation)
    model = ternary_node_model("TernaryConv", pack_ternary(t), alpha, bias, **attrs, **act)
    return model, x, t, alpha, bias, attrs


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv_equals_integer_reference(case):
    require_library()
    scale, z = 0.03, 117
    model, x, t, alpha, bias, attrs = conv_case(1, case, scale, z)
    y = run_ternary(model, {"X": x})
    ref = epilogue(int_conv(quantize(x, scale, z), t, z, attrs), alpha, bias, scale, 1)
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("m,kin,n", GEMM_CASES)
@pytest.mark.parametrize("op", ["TernaryGemm", "TernaryMatMul"])
def test_gemm_equals_integer_reference(m, kin, n, op):
    require_library()
    rng = np.random.default_rng(m * 1000 + kin)
    t = ternary(rng, (n, kin))
    alpha = rng.uniform(0.01, 0.1, n).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    x = rng.normal(size=(m, kin)).astype(np.float32)
    scale, z = 0.02, 128
    model = ternary_node_model(op, pack_ternary(t), alpha, bias, weight_shape=[n, kin], act_scale=scale,
                               act_zero_point=z)
    y = run_ternary(model, {"X": x})
    acc = (quantize(x, scale, z) - z) @ t.astype(np.int64).T
    np.testing.assert_array_equal(y, epilogue(acc, alpha, bias, scale, 1))


def test_symmetric_default_zero_point_and_saturation():
    """act_zero_point defaults to 0 (for non-negative inputs such as ReLU outputs): negatives clamp to code 0,
    values beyond 255 * scale to 255."""
    require_library()
    rng = np.random.default_rng(3)
    t = ternary(rng, (20, 40))
    x = rng.normal(size=(4, 40)).astype(np.float32) * 3
    model = ternary_node_model("TernaryGemm", pack_ternary(t), np.ones(20), None, weight_shape=[20, 40],
                               act_scale=0.01)
    y = run_ternary(model, {"X": x})
    q = np.clip(np.rint(x * np.float32(100.0)), 0, 255).astype(np.int64)
    assert (x * 100 > 255).any() and (x < 0).any()
    np.testing.assert_array_equal(y, epilogue(q @ t.astype(np.int64).T, np.ones(20), None, 0.01, 1))


def dynamic_quant(x: np.ndarray) -> tuple[float, int]:
    """The documented dynamic rule (onnxruntime's DynamicQuantizeLinear): range [min(x, 0), max(x, 0)]."""
    lo, hi = np.float32(min(float(x.min()), 0.0)), np.float32(max(float(x.max()), 0.0))
    scale = np.float32((hi - lo) / np.float32(255.0))
    z = int(np.clip(np.rint(-lo / scale), 0, 255))
    return float(scale), z


def test_dynamic_mode_equals_static_with_the_run_range():
    require_library()
    case = CONV_CASES[1]
    model_dyn, x, t, alpha, bias, attrs = conv_case(5, case, dynamic=True)
    for xs in (x, x * 0.1 + 0.3, np.abs(x)):
        scale, z = dynamic_quant(xs)
        y = run_ternary(model_dyn, {"X": xs})
        ref = epilogue(int_conv(quantize(xs, scale, z), t, z, attrs), alpha, bias, scale, 1)
        np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("activation,lo,hi", [(dict(activation="Relu"), 0.0, np.inf),
                                              (dict(activation="Clip", clip_min=-0.5, clip_max=1.5), -0.5, 1.5)])
def test_fused_activation(activation, lo, hi):
    """activation=Relu/Clip clamps the output, on the W2A8 path and on the float path."""
    require_library()
    case = CONV_CASES[0]
    model, x, t, alpha, bias, attrs = conv_case(7, case, activation=activation)
    y = run_ternary(model, {"X": x})
    ref = epilogue(int_conv(quantize(x, 0.03, 117), t, 117, attrs), alpha, bias, 0.03, 1, lo, hi)
    np.testing.assert_array_equal(y, ref)
    assert (y == np.float32(lo)).any()
    float_model = ternary_node_model("TernaryConv", pack_ternary(t), alpha, bias, **attrs, **activation)
    plain = ternary_node_model("TernaryConv", pack_ternary(t), alpha, bias, **attrs)
    np.testing.assert_array_equal(run_ternary(float_model, {"X": x}),
                                  np.clip(run_ternary(plain, {"X": x}), np.float32(lo), np.float32(hi)))


def residual_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The one-node model with its TernaryConv given input 4, a residual R (a graph input)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    node = model.graph.node[0]
    while len(node.input) < 4:
        node.input.append("")
    node.input.append("R")
    model.graph.input.append(helper.make_tensor_value_info("R", onnx.TensorProto.FLOAT, None))
    return model


# conv cases (index into CONV_CASES) for the fused residual: 3x3, strided with 5 channels, 64 channels,
# depthwise strided/dilated, depthwise multiplier 2; plus a depthwise case with unequal strides.
RESIDUAL_CASES = [CONV_CASES[i] for i in (0, 1, 2, 5, 6, 9)] + [
    (1, 1, 1, 5, 9, 14, 3, 3, (1, 2), (1, 1, 1, 1), (1, 1))]


@pytest.mark.parametrize("act", [None, dict(activation="Relu"),
                                 dict(activation="Clip", clip_min=-0.5, clip_max=1.5)], ids=["none", "relu", "clip"])
@pytest.mark.parametrize("case", RESIDUAL_CASES, ids=[str(i) for i in range(len(RESIDUAL_CASES))])
@pytest.mark.parametrize("w2a8", [True, False], ids=["w2a8", "float"])
def test_fused_residual_equals_add_then_activation(case, act, w2a8):
    """Input 4 (residual) is added after the bias and before the fused activation, bit for bit as the graph
    TernaryConv -> Add(residual) -> Relu/Clip computes it, on the W2A8 path (also against the integer
    reference) and on the float path."""
    require_library()
    rng = np.random.default_rng(17)
    n, cg, kg, group, h, w, kh, kw, strides, pads, dilations = case
    k = kg * group
    t = ternary(rng, (k, cg, kh, kw))
    alpha = rng.uniform(0.5, 1.5, k).astype(np.float32)
    bias = rng.normal(size=k).astype(np.float32)
    attrs = conv_attrs(t.shape, strides, pads, dilations, group)
    x = rng.normal(size=(n, cg * group, h, w)).astype(np.float32) * 2
    quant = dict(act_scale=0.03, act_zero_point=117) if w2a8 else {}
    plain = ternary_node_model("TernaryConv", pack_ternary(t), alpha, bias, **attrs, **quant)
    y_plain = run_ternary(plain, {"X": x})
    r = rng.normal(size=y_plain.shape).astype(np.float32) * 3
    fused = residual_model(ternary_node_model("TernaryConv", pack_ternary(t), alpha, bias, **attrs, **quant,
                                              **(act or {})))
    lo = np.float32(0.0 if act and act["activation"] == "Relu" else act["clip_min"] if act else -np.inf)
    hi = np.float32(act["clip_max"] if act and act["activation"] == "Clip" else np.inf)
    expected = np.clip(y_plain + r, lo, hi)
    for threads in (1, 2):
        y = run_ternary(fused, {"X": x, "R": r}, intra_op_num_threads=threads)
        np.testing.assert_array_equal(y, expected)
    if w2a8:
        ref = epilogue(int_conv(quantize(x, 0.03, 117), t, 117, attrs), alpha, bias, 0.03, 1)
        np.testing.assert_array_equal(y, np.clip(ref + r, lo, hi))
    if act:
        assert (y == lo).any() or (y == hi).any()


def test_residual_of_the_wrong_shape_is_an_ort_error():
    require_library()
    model, x, t, alpha, bias, attrs = conv_case(3, CONV_CASES[0])
    y = run_ternary(model, {"X": x})
    bad = np.zeros((y.shape[0], y.shape[1], y.shape[2], y.shape[3] + 1), np.float32)
    expect_ort_error(residual_model(model), {"X": x, "R": bad}, "residual has shape")
    expect_ort_error(residual_model(model), {"X": x, "R": np.zeros(y.shape[1], np.float32)}, "residual has shape")


def test_runtime_weights_and_threads():
    """Weights fed as graph inputs take the same path (repacked per run); 2 threads give identical results."""
    require_library()
    case = CONV_CASES[2]
    model, x, t, alpha, bias, attrs = conv_case(11, case)
    y1 = run_ternary(model, {"X": x}, intra_op_num_threads=1)
    y2 = run_ternary(model, {"X": x}, intra_op_num_threads=2)
    np.testing.assert_array_equal(y1, y2)
    dyn = ternary_node_model("TernaryConv", None, None, bias, constant=False, **attrs, act_scale=0.03,
                             act_zero_point=117)
    y3 = run_ternary(dyn, {"X": x, "P": pack_ternary(t), "A": alpha, "B": bias})
    np.testing.assert_array_equal(y1, y3)


def _bad(**act):
    rng = np.random.default_rng(0)
    t = ternary(rng, (4, 8))
    return ternary_node_model("TernaryGemm", pack_ternary(t), np.ones(4), None, weight_shape=[4, 8], **act)


@pytest.mark.parametrize("act,match", [
    (dict(act_scale=0.0), "act_scale must be a finite number > 0"),
    (dict(act_scale=-1.0), "act_scale must be a finite number > 0"),
    (dict(act_scale=0.1, act_zero_point=256), "act_zero_point must be in [0, 255]"),
    (dict(act_zero_point=3), "act_zero_point given without act_scale"),
    (dict(act_quant="static"), "act_quant=static needs act_scale"),
    (dict(act_quant="minmax"), "act_quant must be \"static\" or \"dynamic\""),
    (dict(act_quant="dynamic", act_scale=0.1), "act_quant=dynamic takes no act_scale"),
    (dict(act_scale=0.1, activation="Gelu"), "activation must be \"Relu\" or \"Clip\""),
    (dict(activation="Clip", clip_min=2.0, clip_max=1.0), "clip_min must be <= clip_max"),
])
def test_bad_attributes_give_ort_errors(act, match):
    require_library()
    expect_ort_error(_bad(**act), {"X": np.zeros((1, 8), np.float32)}, match)


def test_dynamic_mode_rejects_infinite_input():
    require_library()
    x = np.zeros((1, 8), np.float32)
    x[0, 3] = np.inf
    expect_ort_error(_bad(act_quant="dynamic"), {"X": x}, "infinite values")


def test_float_path_unchanged_without_attributes():
    """Without act_* attributes the op is the float add-only kernel (not quantized)."""
    require_library()
    rng = np.random.default_rng(2)
    t = ternary(rng, (8, 16))
    x = rng.normal(size=(2, 16)).astype(np.float32)
    y = run_ternary(ternary_node_model("TernaryGemm", pack_ternary(t), np.ones(8), None, weight_shape=[8, 16]),
                    {"X": x})
    np.testing.assert_allclose(y, x.astype(np.float64) @ t.T, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- int8 chaining

# (n, c, k1, k2, h, w, (kernel, stride, pad) of conv 1, of conv 2): channel counts that are not multiples
# of 4 (the codes' padding) or 16 (panels), widths that are not multiples of the 8-pixel run, strided and
# 1x1 convs on either side.
CHAIN_CASES = [
    (1, 16, 20, 24, 9, 11, (3, 1, 1), (3, 1, 1)),
    (2, 5, 7, 33, 13, 17, (3, 2, 1), (1, 1, 0)),
    (1, 32, 64, 16, 8, 8, (1, 1, 0), (3, 2, 1)),
    (1, 24, 33, 9, 5, 37, (3, 1, 1), (3, 1, 1)),
    (1, 8, 44, 12, 6, 10, (3, 1, 1), (1, 1, 0)),
]
CHAIN_ACTIVATIONS = [dict(activation="Relu"), dict(activation="Clip", clip_min=0.25, clip_max=2.0), {}]
CHAIN_Q = (0.025, 5)  # conv 2's input quantization (a non-zero zero point: padding and clamping show)


def chain_model(seed: int, case, chained: bool, activation=None, residual: bool = False, first_only: bool = False,
                first_residual: bool = False, both: bool = False):
    """conv 1 (float X, fused activation) -> conv 2 (-> Y): float NCHW between them, or chained (conv 1 writes
    conv 2's codes, output_layout / input_layout). first_only: conv 1 alone, its output (Y1, or the codes Q1)
    the graph's output. residual / first_residual: conv 2 / conv 1 has input 4 (R / R1). both: conv 1's float
    output Y1 is a graph output as well (chained: conv 1 writes both). Returns (model, feeds)."""
    rng = np.random.default_rng(seed)
    n, c, k1, k2, h, w, (ka, sa, pa), (kb, sb, pb) = case
    t1, t2 = ternary(rng, (k1, c, ka, ka)), ternary(rng, (k2, k1, kb, kb))
    s2, z2 = CHAIN_Q
    inits = [numpy_helper.from_array(v, name) for name, v in (
        ("P1", pack_ternary(t1)), ("P2", pack_ternary(t2)),
        ("A1", rng.uniform(0.02, 0.06, k1).astype(np.float32)), ("A2", rng.uniform(0.5, 1.5, k2).astype(np.float32)),
        ("B1", rng.normal(size=k1).astype(np.float32)), ("B2", rng.normal(size=k2).astype(np.float32)))]
    mid = "Q1" if chained else "Y1"
    attrs1 = dict(conv_attrs(t1.shape, (sa, sa), (pa,) * 4), act_scale=0.03, act_zero_point=117,
                  **(dict(activation="Relu") if activation is None else activation))
    if chained:
        attrs1.update(output_layout="nhwc_c4", output_scale=s2, output_zero_point=z2)
    outs1 = (["Y1", "Q1"] if both else ["", "Q1"]) if chained else ["Y1"]
    x = rng.normal(size=(n, c, h, w)).astype(np.float32) * 2
    feeds = {"X": x}
    oh1, ow1 = (h + 2 * pa - ka) // sa + 1, (w + 2 * pa - ka) // sa + 1
    oh2, ow2 = (oh1 + 2 * pb - kb) // sb + 1, (ow1 + 2 * pb - kb) // sb + 1
    inputs = [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, None)]
    if first_residual:
        feeds["R1"] = rng.normal(size=(n, k1, oh1, ow1)).astype(np.float32)
        inputs.append(helper.make_tensor_value_info("R1", onnx.TensorProto.FLOAT, None))
    nodes = [helper.make_node("TernaryConv", ["X", "P1", "A1", "B1"] + (["R1"] if first_residual else []), outs1,
                              domain="ocomp", **attrs1)]
    if first_only:
        out_type = onnx.TensorProto.UINT8 if chained else onnx.TensorProto.FLOAT
        outputs = [helper.make_tensor_value_info(mid, out_type, None)]
    else:
        attrs2 = dict(conv_attrs(t2.shape, (sb, sb), (pb,) * 4), act_scale=s2, act_zero_point=z2)
        if chained:
            attrs2["input_layout"] = "nhwc_c4"
        extra = ["R"] if residual else []
        if residual:
            attrs2["activation"] = "Relu"
            feeds["R"] = rng.normal(size=(n, k2, oh2, ow2)).astype(np.float32)
            inputs.append(helper.make_tensor_value_info("R", onnx.TensorProto.FLOAT, None))
        nodes.append(helper.make_node("TernaryConv", [mid, "P2", "A2", "B2"] + extra, ["Y"], domain="ocomp",
                                      **attrs2))
        outputs = [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)]
        if both:
            outputs.append(helper.make_tensor_value_info("Y1", onnx.TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "chain", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ocomp", 1)])
    return model, feeds


@pytest.mark.parametrize("activation", CHAIN_ACTIVATIONS, ids=["relu", "clip", "none"])
@pytest.mark.parametrize("case", CHAIN_CASES, ids=[str(i) for i in range(len(CHAIN_CASES))])
def test_chained_pair_equals_unchained(case, activation):
    """A chained pair (conv 1 writes conv 2's uint8 codes, conv 2 reads them) gives bit for bit the outputs of
    the unchained pair (float NCHW between them, quantized by conv 2), on one thread and two: with and without
    a residual input on either conv, and with conv 1 writing its float output too (another reader)."""
    require_library()
    for variant in (dict(), dict(residual=True), dict(first_residual=True), dict(both=True),
                    dict(first_residual=True, both=True)):
        plain, feeds = chain_model(11, case, False, activation, **variant)
        chained, _ = chain_model(11, case, True, activation, **variant)
        for threads in (1, 2):
            got = rt.session(chained, intra_op_num_threads=threads).run(None, feeds)
            want = rt.session(plain, intra_op_num_threads=threads).run(None, feeds)
            assert len(got) == len(want) == (2 if variant.get("both") else 1)
            for a, b in zip(got, want):
                assert a.dtype == np.float32 and a.shape == b.shape
                np.testing.assert_array_equal(a, b, err_msg=str(variant))


@pytest.mark.parametrize("case", CHAIN_CASES, ids=[str(i) for i in range(len(CHAIN_CASES))])
def test_chained_codes_are_the_readers_quantization_nhwc(case):
    """output_layout="nhwc_c4": output 1 is uint8 [N, OH, OW, round4(K)], the float output quantized by the
    documented rule with output_scale / output_zero_point, pixel-major, the padding channels the zero point."""
    require_library()
    activation = dict(activation="Clip", clip_min=0.25, clip_max=2.0)  # padding channels must not be clip_min
    plain, feeds = chain_model(12, case, False, activation, first_only=True)
    chained, _ = chain_model(12, case, True, activation, first_only=True)
    y = run_ternary(plain, feeds)
    codes = run_ternary(chained, feeds)
    n, k, oh, ow = y.shape
    s2, z2 = CHAIN_Q
    want = np.full((n, oh, ow, (k + 3) // 4 * 4), z2, np.uint8)
    want[..., :k] = quantize(y, s2, z2).transpose(0, 2, 3, 1)
    assert codes.dtype == np.uint8 and codes.shape == want.shape
    np.testing.assert_array_equal(codes, want)


def _chain_bad(first: dict, second: dict | None = None, outputs=("", "Q1")):
    """chain_model's chained pair (case 0) with attributes of conv 1 / conv 2 replaced (None: removed)."""
    model, feeds = chain_model(13, CHAIN_CASES[0], True)
    for node, change in zip(model.graph.node, (first, second or {})):
        keep = [a for a in node.attribute if a.name not in change]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.extend(helper.make_attribute(k, v) for k, v in change.items() if v is not None)
    del model.graph.node[0].output[:]
    model.graph.node[0].output.extend(outputs)
    if outputs[-1] != "Q1":
        model.graph.node[1].input[0] = outputs[-1]
    return model, feeds


@pytest.mark.parametrize("first,second,outputs,match", [
    (dict(output_layout="nchw"), None, ("", "Q1"), 'output_layout must be "nhwc_c4"'),
    (dict(output_scale=None), None, ("", "Q1"), "output_layout needs output_scale"),
    (dict(output_scale=-1.0), None, ("", "Q1"), "output_scale must be a finite number > 0"),
    (dict(output_zero_point=300), None, ("", "Q1"), "output_zero_point must be in [0, 255]"),
    (dict(output_layout=None), None, ("", "Q1"), "output_scale / output_zero_point need output_layout"),
    (dict(act_scale=None, act_zero_point=None), None, ("", "Q1"), "need int8 activations"),
    ({}, dict(act_scale=None, act_zero_point=None, act_quant="dynamic"), ("", "Q1"), "input_layout needs act_quant=static"),
    ({}, None, ("Q1",), "writes output 1, which the node lacks"),
    (dict(output_layout=None, output_scale=None, output_zero_point=None), None, ("Y1",), "X (input_layout codes) has the wrong element type"),
])
def test_bad_chain_attributes_give_ort_errors(first, second, outputs, match):
    require_library()
    model, feeds = _chain_bad(first, second, outputs)
    expect_ort_error(model, feeds, match)


def test_validate_knows_the_chain_attributes():
    """check_nodes (inspect / compare) accepts a chained pair and refuses what the runtime refuses, plus codes
    quantized with another scale than the reader's (which the runtime cannot see)."""
    from ocomp.errors import OcompError
    from ocomp.validate import check_nodes

    model, _ = chain_model(14, CHAIN_CASES[0], True)
    check_nodes(model)
    for first, second, outputs, match in [
        (dict(output_layout="nchw"), None, ("", "Q1"), 'output_layout must be "nhwc_c4"'),
        (dict(output_scale=None), None, ("", "Q1"), "output_layout needs output_scale"),
        (dict(output_layout=None), None, ("", "Q1"), "need output_layout"),
        ({}, None, ("Q1",), "output_layout writes output 1"),
        (dict(output_layout=None, output_scale=None, output_zero_point=None), None, ("", "Q1"),
         "expects one \\(Y; output 1 only with output_layout\\)"),
        (dict(output_scale=0.5), None, ("", "Q1"), "quantized with output_scale=0.5"),
        ({}, dict(group=2), ("", "Q1"), "input_layout needs act_quant=static"),
    ]:
        broken, _ = _chain_bad(first, second, outputs)
        with pytest.raises(OcompError, match=match):
            check_nodes(broken)


# ---------------------------------------------------------------- every path against the scalar reference

_PATH_SCRIPT = textwrap.dedent(
    """
    import sys, json
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import test_w2a8 as tw
    import ocomp.runtime as rt
    from test_runtime import run_ternary
    try:
        path = rt.w2a8_path()
    except RuntimeError as e:
        print(json.dumps({"error": str(e)}))
        sys.exit(0)
    outs = {}
    for i, case in enumerate(tw.CONV_CASES):
        model, x, *_ = tw.conv_case(100 + i, case)
        outs[f"conv{i}"] = run_ternary(model, {"X": x})
        model, x, *_ = tw.conv_case(200 + i, case, activation=dict(activation="Relu"))
        outs[f"relu{i}"] = run_ternary(model, {"X": x})
    for i, case in enumerate(tw.RESIDUAL_CASES):
        model, x, *_ = tw.conv_case(300 + i, case, activation=dict(activation="Relu"))
        y = run_ternary(model, {"X": x})
        r = np.random.default_rng(i).normal(size=y.shape).astype(np.float32)
        outs[f"residual{i}"] = run_ternary(tw.residual_model(model), {"X": x, "R": r})
    for m, kin, n in tw.GEMM_CASES:
        model, x = tw.gemm_model(m, kin, n)
        outs[f"gemm{m}"] = run_ternary(model, {"X": x}, intra_op_num_threads=2)
    for i, case in enumerate(tw.CHAIN_CASES):
        for j, act in enumerate(tw.CHAIN_ACTIVATIONS):
            model, feeds = tw.chain_model(400 + i, case, True, act, residual=j == 0)
            outs[f"chain{i}_{j}"] = run_ternary(model, feeds)
            model, feeds = tw.chain_model(400 + i, case, True, act, first_residual=True, both=True)
            outs[f"chain_both{i}_{j}"], outs[f"chain_both_y1{i}_{j}"] = rt.session(model).run(None, feeds)
            model, feeds = tw.chain_model(400 + i, case, True, act, first_only=True)
            outs[f"codes{i}_{j}"] = run_ternary(model, feeds)
    np.savez(sys.argv[2], **outs)
    print(json.dumps({"path": path}))
    """
)


def gemm_model(m, kin, n):
    rng = np.random.default_rng(kin)
    t = ternary(rng, (n, kin))
    x = rng.normal(size=(m, kin)).astype(np.float32)
    return ternary_node_model("TernaryGemm", pack_ternary(t), rng.uniform(0.01, 0.1, n), rng.normal(size=n),
                              weight_shape=[n, kin], act_quant="dynamic"), x


def run_path(isa: str, out: Path) -> dict:
    env = dict(os.environ, OCOMP_ISA=isa, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _PATH_SCRIPT, str(TESTS), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


X86_PATHS = ["avx2", "avxvnni", "avxvnni-evex", "avx512vnni"]
ARM_PATHS = ["neon", "neon-dot"]


@pytest.mark.parametrize("isa", X86_PATHS + ARM_PATHS)
def test_path_bit_exact_against_scalar(isa, tmp_path):
    """Each SIMD path (forced with OCOMP_ISA) gives exactly the scalar reference's outputs."""
    require_library()
    ref = run_path("scalar", tmp_path / "scalar.npz")
    assert ref == {"path": "scalar"}
    got = run_path(isa, tmp_path / f"{isa}.npz")
    if "error" in got:
        assert "does not support" in got["error"] or "not a path of this build" in got["error"], got
        pytest.skip(f"OCOMP_ISA={isa}: {got['error']}")
    assert got == {"path": isa}
    a, b = np.load(tmp_path / "scalar.npz"), np.load(tmp_path / f"{isa}.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(b[key], a[key], err_msg=f"{isa} vs scalar: {key}")


def test_default_path_is_the_best_supported(tmp_path):
    """Without OCOMP_ISA the library picks the widest path the CPU runs (read from /proc/cpuinfo here)."""
    require_library()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to cross-check the CPUID choice")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    env = {k: v for k, v in os.environ.items() if k != "OCOMP_ISA"}
    proc = subprocess.run([sys.executable, "-c", "import ocomp.runtime as rt; print(rt.w2a8_path())"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip()
    if {"avx512_vnni", "avx512bw", "avx512vl"} <= flags:
        expected = "avx512vnni"
    elif "avx_vnni" in flags:
        expected = "avxvnni"
    elif "avx2" in flags:
        expected = "avx2"
    elif "asimddp" in flags:
        expected = "neon-dot"
    elif "asimd" in flags:
        expected = "neon"
    else:
        expected = "scalar"
    assert path == expected, (path, expected)


def test_unknown_isa_is_an_error_at_session_creation():
    require_library()
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import test_w2a8 as tw, numpy as np\n"
              "from test_runtime import run_ternary\n"
              "model, x = tw.gemm_model(1, 8, 4)\n"
              "try:\n    run_ternary(model, {'X': x})\nexcept Exception as e:\n    print('ERR', e)\n")
    env = dict(os.environ, OCOMP_ISA="sse9")
    proc = subprocess.run([sys.executable, "-c", script, str(TESTS)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert "OCOMP_ISA=sse9 is not a path of this build" in proc.stdout, proc.stdout + proc.stderr


# ---------------------------------------------------------------- the w2a8 pass (passes/w2a8.py)

import onnx  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

import zoo  # noqa: E402
from ocomp.data import dataset_from_arrays  # noqa: E402
from ocomp.model import infer_shapes  # noqa: E402
from ocomp.pipeline import run_passes  # noqa: E402

ALL_TERNARY = {"keep_first": False, "keep_last": False, "min_params": 0}


def ternary_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == "ocomp"]


def node_attrs(node: onnx.NodeProto) -> dict:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def one_conv_model(rng, relu: bool) -> onnx.ModelProto:
    w = rng.normal(size=(24, 12, 3, 3)).astype(np.float32) * 0.2
    b = rng.normal(size=24).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "W", "B"], ["conv"], pads=[1, 1, 1, 1])]
    nodes.append(helper.make_node("Relu", ["conv"], ["out"]) if relu else helper.make_node("Identity", ["conv"],
                                                                                               ["out"]))
    graph = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT,
                                                                           ["N", 12, 10, 10])],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return infer_shapes(model)


@pytest.mark.parametrize("method,relu", [("auto", True), ("auto", False), ("mse", False), ("percentile", True),
                                         ("minmax", False)])
def test_pass_output_within_the_bound_of_its_scale(relu, method):
    """One ternary conv on signed inputs: the w2a8 model's output differs from the float-activation ternary
    model's by at most alpha[k] * ||T[k]||_1 * max|x - dequant(quant(x))| (the input error the chosen scale and
    zero point allow, clipping included), and that error is at most scale / 2 where no value is clipped."""
    require_library()
    rng = np.random.default_rng(5 + relu)
    model = one_conv_model(rng, relu)
    x = (rng.normal(size=(40, 12, 10, 10)) * 1.5 + 0.4).astype(np.float32)
    data = dataset_from_arrays(model, {"input": x})
    ternary_model = run_passes(model, ["ternary"], {"ternary": ALL_TERNARY}).model
    result = run_passes(ternary_model, ["w2a8"], {"w2a8": {"method": method}}, calibration=data)
    w2a8 = result.model
    (node,) = ternary_nodes(w2a8)
    attrs = node_attrs(node)
    scale, z = attrs["act_scale"], attrs["act_zero_point"]
    assert 0 < z < 255  # signed input: an asymmetric range with zero inside
    assert scale <= (x.max() - x.min()) / 255 * 1.0001  # never wider than the data
    assert attrs.get("activation") == ("Relu" if relu else None)
    assert sum(n.op_type == "Relu" for n in w2a8.graph.node) == 0
    report = result.reports[0]
    assert report.details["mode"] == "static" and report.layers[0].after.startswith("u8 s=")
    if method != "auto":
        assert report.details["methods"] == {method if method != "percentile" else "percentile 99.99": 1}
    deq = (np.clip(np.rint(x * np.float32(1 / np.float32(scale))) + z, 0, 255) - z) * np.float32(scale)
    err = np.abs(x - deq)
    lo, hi = -z * scale, (255 - z) * scale
    inside = (x >= lo) & (x <= hi)
    assert err[inside].max() <= scale / 2 * 1.0001
    t = tw_unpack(node, w2a8)
    alpha = np.abs(numpy_helper.to_array(next(i for i in w2a8.graph.initializer if i.name == node.input[2])))
    bound = alpha * np.abs(t).reshape(len(t), -1).sum(axis=1) * err.max()
    y_q = rt.session(w2a8).run(None, {"input": x})[0]
    y_f = rt.session(ternary_model).run(None, {"input": x})[0]
    diff = np.abs(y_q - y_f).max(axis=(0, 2, 3))
    assert (diff <= bound * 1.001 + 1e-4).all(), (diff / bound).max()
    assert np.abs(y_q - y_f).max() > 0  # it really ran quantized


def tw_unpack(node: onnx.NodeProto, model: onnx.ModelProto) -> np.ndarray:
    from ocomp.passes.ternary import unpack_ternary

    packed = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == node.input[1]))
    shape = node_attrs(node)["weight_shape"]
    return unpack_ternary(packed, int(np.prod(shape))).reshape(shape)


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "flatten_gemm"])
def test_pass_on_zoo_models(name):
    """Every ternary op of a whole model gets a static range, Relus that follow one are fused, and the model
    stays close to the float-activation ternary model (cosine > 0.99 on held-out inputs)."""
    require_library()
    model = infer_shapes(zoo.build(name, folded=True))
    calib = zoo.random_input(model, batch=48, seed=1)["input"]
    ternary_model = run_passes(model, ["ternary"], {"ternary": ALL_TERNARY}).model
    result = run_passes(ternary_model, ["w2a8"], calibration=dataset_from_arrays(model, {"input": calib}))
    out = result.model
    ops = ternary_nodes(out)
    assert ops and all("act_scale" in node_attrs(n) for n in ops)
    acts_before = sum(n.op_type in ("Relu", "Clip") for n in ternary_model.graph.node)
    fused = sum(node_attrs(n).get("activation") in ("Relu", "Clip") for n in ops)
    details = result.reports[0].details
    with_residual = [n for n in ops if len(n.input) == 5]
    assert len(with_residual) == details["fused_residuals"]
    after_residual = sum(node_attrs(n).get("activation") in ("Relu", "Clip") for n in with_residual)
    assert fused and details["fused_activations"] + after_residual == fused
    assert sum(n.op_type in ("Relu", "Clip") for n in out.graph.node) == acts_before - fused
    adds_before = sum(n.op_type == "Add" for n in ternary_model.graph.node)
    assert sum(n.op_type == "Add" for n in out.graph.node) == adds_before - len(with_residual)
    if name == "resnet":
        assert with_residual
    feeds = zoo.random_input(model, batch=16, seed=9)
    a = rt.session(out).run(None, feeds)[0].reshape(16, -1).astype(np.float64)
    b = rt.session(ternary_model).run(None, feeds)[0].reshape(16, -1).astype(np.float64)
    cosine = (a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)
    assert cosine > 0.99, cosine


def test_residual_fusion_is_exact():
    """fuse_residuals folds each TernaryConv -> Add(residual) -> Relu of a calibrated w2a8 ResNet into the op
    (its residual input and activation): the model's outputs are bit for bit those of the unfused graph, on one
    thread and two, and the model passes validation (inspect's checks)."""
    import onnx_graphsurgeon as gs

    from ocomp.model import to_model
    from ocomp.passes.w2a8 import fuse_residuals
    from ocomp.errors import OcompError
    from ocomp.validate import check_nodes

    require_library()
    model = infer_shapes(zoo.build("resnet", folded=True))
    calib = zoo.random_input(model, batch=32, seed=1)["input"]
    ternary_model = run_passes(model, ["ternary"], {"ternary": ALL_TERNARY}).model
    plain = run_passes(ternary_model, ["w2a8"], {"w2a8": {"fuse": False}},
                       calibration=dataset_from_arrays(model, {"input": calib})).model
    assert not any(len(n.input) == 5 for n in ternary_nodes(plain))
    graph = gs.import_onnx(plain)
    nodes = [n for n in graph.nodes if n.domain == "ocomp"]
    count = fuse_residuals(graph, nodes)
    assert count > 0
    fused = to_model(graph, plain)
    check_nodes(fused)
    residual_ops = [n for n in ternary_nodes(fused) if len(n.input) == 5]
    assert len(residual_ops) == count and all(node_attrs(n).get("activation") == "Relu" for n in residual_ops)
    assert sum(n.op_type == "Add" for n in fused.graph.node) == sum(n.op_type == "Add" for n in plain.graph.node) - count
    # validation refuses a residual whose known shape is not the output's, as the runtime does
    broken = onnx.ModelProto.FromString(fused.SerializeToString())
    target = residual_ops[0].input[4]
    info = next(v for v in list(broken.graph.value_info) + list(broken.graph.input) if v.name == target)
    info.type.tensor_type.shape.dim[3].dim_value += 1
    with pytest.raises(OcompError, match="residual .* must have the output's shape"):
        check_nodes(broken)
    feeds = zoo.random_input(model, batch=3, seed=4)
    for threads in (1, 2):
        a = rt.session(fused, intra_op_num_threads=threads).run(None, feeds)
        b = rt.session(plain, intra_op_num_threads=threads).run(None, feeds)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2"])
def test_pass_chains_exactly(name):
    """The chain option: 'on' (the default) hands codes from each TernaryConv whose only reader is a static
    group-1 TernaryConv and that has no residual input; 'all' also where the float output has other readers
    (kept as output 0) or the producer adds a residual. The chained model's outputs are bit for bit those of the
    unchained one (chain=off) on one thread and two; it passes validation and strict shape inference with its
    value_info; each pair has a report row; model_stats counts the same MACs."""
    from ocomp.metrics import model_stats
    from ocomp.validate import check_nodes

    require_library()
    model = infer_shapes(zoo.build(name, folded=True))
    calib = dataset_from_arrays(model, {"input": zoo.random_input(model, batch=32, seed=1)["input"]})
    ternary_model = run_passes(model, ["ternary"], {"ternary": ALL_TERNARY}).model
    plain = run_passes(ternary_model, ["w2a8"], {"w2a8": {"chain": "off"}}, calibration=calib).model
    assert not any(a.name == "output_layout" for n in ternary_nodes(plain) for a in n.attribute)
    feeds = zoo.random_input(model, batch=3, seed=4)
    counts = {}
    for mode in ("on", "all"):
        result = run_passes(ternary_model, ["w2a8"], {"w2a8": {"chain": mode}}, calibration=calib)
        chained = result.model
        report = result.reports[0]
        producers = [n for n in ternary_nodes(chained) if "output_layout" in node_attrs(n)]
        readers = [n for n in ternary_nodes(chained) if "input_layout" in node_attrs(n)]
        counts[mode] = report.details["chained"]
        assert len(producers) == len(readers) == counts[mode]
        rows = [row for row in report.layers if row.after == "u8 nhwc_c4 codes"]
        assert sorted(row.name for row in rows) == sorted(n.name for n in producers)
        by_output = {n.output[1]: n for n in producers}
        for reader in readers:
            writer = by_output[reader.input[0]]
            assert node_attrs(writer)["output_scale"] == node_attrs(reader)["act_scale"]
            if mode == "on":
                assert writer.output[0] == "" and len(writer.input) <= 4
        check_nodes(chained)
        onnx.shape_inference.infer_shapes(chained, check_type=True, strict_mode=True)
        codes = {v.name: v for v in chained.graph.value_info}
        for writer in producers:
            info = codes[writer.output[1]].type.tensor_type
            k = node_attrs(writer)["weight_shape"][0]
            assert info.elem_type == onnx.TensorProto.UINT8 and info.shape.dim[3].dim_value == (k + 3) // 4 * 4
        assert [la.macs for la in model_stats(chained).layers] == [la.macs for la in model_stats(plain).layers]
        for threads in (1, 2):
            a = rt.session(chained, intra_op_num_threads=threads).run(None, feeds)
            b = rt.session(plain, intra_op_num_threads=threads).run(None, feeds)
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
    if name == "resnet":
        assert 0 < counts["on"] < counts["all"]


def test_pass_without_calibration_is_dynamic():
    require_library()
    model = infer_shapes(zoo.build("plain", folded=True))
    result = run_passes(model, ["ternary", "w2a8"], {"ternary": ALL_TERNARY})
    ops = ternary_nodes(result.model)
    assert ops and all(node_attrs(n).get("act_quant") == "dynamic" for n in ops)
    report = result.reports[1]
    assert report.details["mode"] == "dynamic"
    assert any("act_quant=dynamic" in s.reason and "no calibration data" in s.reason for s in report.skipped)
    feeds = zoo.random_input(model, batch=4, seed=2)
    plain = run_passes(model, ["ternary"], {"ternary": ALL_TERNARY}).model
    a, b = rt.session(result.model).run(None, feeds)[0], rt.session(plain).run(None, feeds)[0]
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()


def test_pass_without_ternary_ops_reports_and_keeps_the_model():
    model = infer_shapes(zoo.build("plain"))
    data = dataset_from_arrays(model, zoo.random_input(model, batch=8)["input"])
    result = run_passes(model, ["w2a8"], calibration=data)
    report = result.reports[0]
    assert report.details["mode"] == "none" and not report.layers
    assert "no ternary ops" in report.skipped[0].reason
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in model.graph.node]


def test_pass_cli_flags(tmp_path):
    """The options are CLI flags (--w2a8-method ...); a bad value is one usage error line."""
    from click.testing import CliRunner

    from ocomp.cli import main

    require_library()
    model = infer_shapes(zoo.build("plain", folded=True))
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "calib.npz", input=zoo.random_input(model, batch=16)["input"])
    ok = CliRunner().invoke(main, ["compress", str(src), "-o", str(out), "--passes", "ternary,w2a8",
                                   "--ternary-min-params", "0", "--w2a8-method", "minmax", "--force", "--calib",
                                   str(tmp_path / "calib.npz")])
    assert ok.exit_code == 0, ok.output
    ops = ternary_nodes(onnx.load(out))
    assert ops and all("act_scale" in node_attrs(n) for n in ops)
    bad = CliRunner().invoke(main, ["compress", str(src), "-o", str(tmp_path / "x.onnx"), "--passes",
                                    "ternary,w2a8", "--w2a8-percentile", "10"])
    assert bad.exit_code == 2 and "--w2a8-percentile" in bad.output and "Traceback" not in bad.output

    # the written model is one ocomp's own commands accept (validate.py knows the W2A8 attributes) ...
    for command in (["inspect", str(out)], ["compare", str(src), str(out), "--random", "4"]):
        shown = CliRunner().invoke(main, command)
        assert shown.exit_code == 0, shown.output
    # ... and refuses with one line when they are malformed, before onnxruntime sees them
    broken = onnx.load(out)
    for attr in ternary_nodes(broken)[0].attribute:
        if attr.name == "act_scale":
            attr.f = -1.0
    onnx.save(broken, tmp_path / "broken.onnx")
    refused = CliRunner().invoke(main, ["inspect", str(tmp_path / "broken.onnx")])
    assert refused.exit_code != 0 and "act_scale must be a finite number > 0" in refused.output
    assert "Traceback" not in refused.output
