"""Test model zoo: small but structurally realistic CNNs built in code.

Every model has one input ``"input"`` of shape ``["N", 3, 32, 32]`` (symbolic
batch ``"N"``) and one output ``"logits"`` of shape ``["N", 10]``, float32,
opset 17, ir_version 8.  Weights are random (He-normal, fixed seed) so the
networks compute a non-trivial function with O(1) activations throughout.

Each model comes in two variants:

* ``folded=False``: every Conv is followed by a ``BatchNormalization`` with
  non-trivial random gamma / beta / running mean / running var (var > 0).
* ``folded=True``: the same network with every Conv->BN pair folded
  numerically into the Conv (``fold_batchnorm``), so both variants compute the
  same function up to float rounding.

Naming: ``model.graph.name`` is the model id (``"resnet"`` / ``"resnet-folded"``);
nodes have readable unique names (``"stage2.block0.conv1"``), a node's output
tensor is ``"<node name>.output"`` (except the final ``"logits"``), and
initializers are named PyTorch-style (``"stage2.block0.conv1.weight"``,
``"stage2.block0.bn1.running_var"``, ...).

API::

    ZOO_NAMES                                   # the 8 model names, in order
    build(name, folded=False, seed=0)           -> onnx.ModelProto
    all_models()                                -> [(id, ModelProto)] * 16
    random_input(model, batch=2, seed=0)        -> {"input": ndarray}
    run(model, feeds)                           -> [ndarray] (plain ORT CPU)
    fold_batchnorm(model)                       -> onnx.ModelProto

Plus ``build_blazeface()``: a small BlazeFace (NHWC input, BlazeBlocks whose shortcuts are widened with
zero channels by Concat or Pad, four detection outputs; see there).

Plus ``build("tiny_conv")``: a single Conv(3->8, 3x3, pad 1) + Relu with output
``"logits"`` of shape ``["N", 8, 32, 32]`` (not part of ``ZOO_NAMES``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "ZOO_NAMES",
    "EXTRA_NAMES",
    "OPSET",
    "IR_VERSION",
    "build",
    "all_models",
    "random_input",
    "run",
    "fold_batchnorm",
    "build_blazeface",
]

ZOO_NAMES: tuple[str, ...] = (
    "plain",
    "resnet",
    "mobilenetv2",
    "inception",
    "grouped",
    "se",
    "flatten_gemm",
    "matmul_head",
)
EXTRA_NAMES: tuple[str, ...] = ("tiny_conv",)

OPSET = 17
IR_VERSION = 8
NUM_CLASSES = 10
INPUT_SHAPE = ("N", 3, 32, 32)


# --------------------------------------------------------------------------
# graph builder
# --------------------------------------------------------------------------


class _Builder:
    """Accumulates nodes/initializers; every helper returns the output tensor name."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self._node_names: set[str] = set()
        # layers whose statistics are set from data by _calibrate (see there)
        self.calib: list[dict] = []

    # -- low level ---------------------------------------------------------
    def init(self, name: str, value: np.ndarray) -> str:
        assert name not in self.inits, f"duplicate initializer {name}"
        self.inits[name] = value
        return name

    def node(self, op: str, inputs: list[str], name: str, output: str | None = None, **attrs) -> str:
        assert name not in self._node_names, f"duplicate node name {name}"
        self._node_names.add(name)
        out = output if output is not None else f"{name}.output"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def const(self, name: str, value: np.ndarray) -> str:
        if name not in self.inits:
            self.inits[name] = value
        return name

    # -- layers ------------------------------------------------------------
    def conv(
        self,
        x: str,
        name: str,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        pad: int | None = None,
        group: int = 1,
        bias: bool = False,
        gain: float = 2.0,
    ) -> str:
        if pad is None:
            pad = k // 2
        fan_in = (cin // group) * k * k
        w = self.rng.normal(0.0, np.sqrt(gain / fan_in), size=(cout, cin // group, k, k))
        inputs = [x, self.init(f"{name}.weight", w.astype(np.float32))]
        if bias:
            b = self.rng.normal(0.0, 0.1, size=(cout,))
            inputs.append(self.init(f"{name}.bias", b.astype(np.float32)))
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
        if group != 1:
            attrs["group"] = group
        return self.node("Conv", inputs, name, **attrs)

    def bn(self, x: str, name: str, c: int) -> str:
        # gamma/beta random; running stats are set by _calibrate to the true
        # per-channel statistics of the BN input, deliberately perturbed
        # (mean += 0.2*sigma*N(0,1), var *= U(0.6, 1.6)) like a real model
        # whose stats do not match the evaluation data exactly.
        r = self.rng
        gamma = r.uniform(0.6, 1.4, size=c)
        beta = r.normal(0.0, 0.2, size=c)
        ins = [x]
        for suffix, v in (("weight", gamma), ("bias", beta), ("running_mean", np.zeros(c)), ("running_var", np.ones(c))):
            ins.append(self.init(f"{name}.{suffix}", v.astype(np.float32)))
        self.calib.append(dict(kind="bn", node=name, input=x, mean=f"{name}.running_mean",
                               var=f"{name}.running_var", mean_noise=r.normal(0.0, 0.2, size=c),
                               var_factor=r.uniform(0.6, 1.6, size=c)))
        return self.node("BatchNormalization", ins, name, epsilon=1e-5, momentum=0.9)

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)

    def relu6(self, x: str, name: str) -> str:
        # Clip-13 style: min / max are (shared) scalar initializer inputs.
        lo = self.const("const.relu6.min", np.array(0.0, dtype=np.float32))
        hi = self.const("const.relu6.max", np.array(6.0, dtype=np.float32))
        return self.node("Clip", [x, lo, hi], name)

    def conv_bn_act(
        self,
        x: str,
        prefix: str,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        group: int = 1,
        act: str | None = "relu",
        idx: str = "",
        bias: bool = False,
    ) -> str:
        y = self.conv(x, f"{prefix}.conv{idx}", cin, cout, k, stride, group=group, bias=bias,
                      gain=2.0 if act else 1.0)
        y = self.bn(y, f"{prefix}.bn{idx}", cout)
        if act == "relu":
            y = self.relu(y, f"{prefix}.relu{idx}")
        elif act == "relu6":
            y = self.relu6(y, f"{prefix}.relu6{idx}")
        return y

    def add(self, a: str, b: str, name: str) -> str:
        return self.node("Add", [a, b], name)

    def maxpool(self, x: str, name: str, k: int, stride: int, pad: int = 0) -> str:
        return self.node("MaxPool", [x], name, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)

    def gap(self, x: str, name: str = "avgpool") -> str:
        return self.node("GlobalAveragePool", [x], name)

    def flatten(self, x: str, name: str = "flatten") -> str:
        return self.node("Flatten", [x], name, axis=1)

    def linear_calib(self, node: str, x: str, weight: str, bias: str, trans_b: bool, fout: int,
                     target_std: float, bias_noise: float) -> None:
        self.calib.append(dict(kind="linear", node=node, input=x, weight=weight, bias=bias,
                               trans_b=trans_b, target_std=target_std,
                               bias_noise=self.rng.normal(0.0, bias_noise, size=fout)))

    def gemm(self, x: str, name: str, fin: int, fout: int, trans_b: bool,
             output: str | None = None, target_std: float = 2.0) -> str:
        # weights/bias rescaled + centred by _calibrate (a "trained" head whose
        # outputs vary per sample rather than being dominated by the feature mean)
        w = self.rng.normal(0.0, np.sqrt(1.0 / fin), size=(fout, fin)).astype(np.float32)
        if not trans_b:
            w = np.ascontiguousarray(w.T)
        b = np.zeros(fout, dtype=np.float32)
        ins = [x, self.init(f"{name}.weight", w), self.init(f"{name}.bias", b)]
        self.linear_calib(name, x, ins[1], ins[2], trans_b, fout, target_std, 0.3)
        return self.node("Gemm", ins, name, output=output, alpha=1.0, beta=1.0, transB=int(trans_b))

    def head(self, x: str, c: int, trans_b: bool) -> str:
        """GlobalAveragePool -> Flatten -> Gemm(c -> 10) producing "logits"."""
        y = self.flatten(self.gap(x))
        return self.gemm(y, "fc", c, NUM_CLASSES, trans_b, output="logits")

    # -- finish ------------------------------------------------------------
    def model(self, graph_name: str, out_shape=("N", NUM_CLASSES)) -> onnx.ModelProto:
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, list(INPUT_SHAPE))
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(out_shape))
        inits = [numpy_helper.from_array(v, name=k) for k, v in self.inits.items()]
        graph = helper.make_graph(self.nodes, graph_name, [inp], [out], initializer=inits)
        m = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="ocomp-tests-zoo",
            ir_version=IR_VERSION,
        )
        return m


# --------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------


def _plain(b: _Builder) -> None:
    x = "input"
    x = b.conv_bn_act(x, "features.0", 3, 16, 3, bias=True)  # Conv with its own bias before BN
    x = b.conv_bn_act(x, "features.1", 16, 32, 3, stride=2)  # 16x16
    x = b.conv_bn_act(x, "features.2", 32, 32, 3)
    x = b.conv_bn_act(x, "features.3", 32, 64, 3, stride=2)  # 8x8
    b.head(x, 64, trans_b=True)


def _basic_block(b: _Builder, x: str, prefix: str, cin: int, cout: int, stride: int) -> str:
    y = b.conv_bn_act(x, prefix, cin, cout, 3, stride, idx="1")
    y = b.conv_bn_act(y, prefix, cout, cout, 3, 1, act=None, idx="2")
    if stride != 1 or cin != cout:
        sc = b.conv(x, f"{prefix}.downsample.0", cin, cout, 1, stride, pad=0, gain=1.0)
        sc = b.bn(sc, f"{prefix}.downsample.1", cout)
    else:
        sc = x
    y = b.add(y, sc, f"{prefix}.add")
    return b.relu(y, f"{prefix}.relu")


def _resnet(b: _Builder) -> None:
    x = b.conv_bn_act("input", "stem", 3, 16, 3)
    x = _basic_block(b, x, "layer1.0", 16, 16, 1)
    x = _basic_block(b, x, "layer2.0", 16, 32, 2)  # 16x16, 1x1 strided projection shortcut
    x = _basic_block(b, x, "layer2.1", 32, 32, 1)
    b.head(x, 32, trans_b=False)


def _inverted_residual(b: _Builder, x: str, prefix: str, cin: int, cout: int, stride: int, t: int) -> str:
    hidden = cin * t
    y = x
    if t != 1:
        y = b.conv_bn_act(y, f"{prefix}.expand", cin, hidden, 1, act="relu6")
    y = b.conv_bn_act(y, f"{prefix}.dw", hidden, hidden, 3, stride, group=hidden, act="relu6")
    y = b.conv_bn_act(y, f"{prefix}.project", hidden, cout, 1, act=None)
    if stride == 1 and cin == cout:
        y = b.add(x, y, f"{prefix}.add")
    return y


def _mobilenetv2(b: _Builder) -> None:
    x = b.conv_bn_act("input", "features.0", 3, 16, 3, act="relu6")
    cfg = [  # (cout, stride, expansion)
        (16, 1, 1),
        (24, 2, 4),  # 16x16
        (24, 1, 4),
        (32, 2, 4),  # 8x8
        (32, 1, 4),
    ]
    cin = 16
    for i, (cout, s, t) in enumerate(cfg, start=1):
        x = _inverted_residual(b, x, f"features.{i}", cin, cout, s, t)
        cin = cout
    x = b.conv_bn_act(x, f"features.{len(cfg) + 1}", cin, 128, 1, act="relu6")
    b.head(x, 128, trans_b=True)


def _inception(b: _Builder) -> None:
    x = b.conv_bn_act("input", "stem", 3, 32, 3, stride=2)  # 16x16
    p = "mixed"
    b1 = b.conv_bn_act(x, f"{p}.branch1x1", 32, 16, 1)
    b2 = b.conv_bn_act(x, f"{p}.branch3x3_1", 32, 16, 1)
    b2 = b.conv_bn_act(b2, f"{p}.branch3x3_2", 16, 24, 3)
    b3 = b.maxpool(x, f"{p}.branch_pool.pool", 3, 1, 1)
    b3 = b.conv_bn_act(b3, f"{p}.branch_pool", 32, 8, 1)
    cat = b.node("Concat", [b1, b2, b3], f"{p}.concat", axis=1)  # 16 + 24 + 8 = 48
    x = b.conv_bn_act(cat, "post", 48, 64, 3, stride=2)  # 8x8, consumes the Concat
    b.head(x, 64, trans_b=False)


def _grouped(b: _Builder) -> None:
    x = b.conv_bn_act("input", "features.0", 3, 32, 3)
    x = b.conv_bn_act(x, "features.1", 32, 32, 3, stride=2, group=4)  # grouped, 16x16
    x = b.conv_bn_act(x, "features.2", 32, 64, 1)
    x = b.conv_bn_act(x, "features.3", 64, 64, 3, stride=2)  # 8x8
    b.head(x, 64, trans_b=False)


def _se(b: _Builder) -> None:
    x = b.conv_bn_act("input", "features.0", 3, 32, 3)
    x = b.conv_bn_act(x, "features.1", 32, 32, 3, stride=2)  # 16x16
    p = "features.1.se"
    s = b.gap(x, f"{p}.avgpool")
    s = b.conv(s, f"{p}.fc1", 32, 8, 1, pad=0, bias=True)
    s = b.relu(s, f"{p}.relu")
    s = b.conv(s, f"{p}.fc2", 8, 32, 1, pad=0, bias=True, gain=1.0)
    s = b.node("Sigmoid", [s], f"{p}.sigmoid")
    x = b.node("Mul", [x, s], f"{p}.mul")
    x = b.conv_bn_act(x, "features.2", 32, 64, 3, stride=2)  # 8x8
    b.head(x, 64, trans_b=True)


def _flatten_gemm(b: _Builder) -> None:
    x = b.conv_bn_act("input", "features.0", 3, 16, 3)
    x = b.maxpool(x, "features.pool0", 2, 2)  # 16x16
    x = b.conv_bn_act(x, "features.1", 16, 32, 3)
    x = b.maxpool(x, "features.pool1", 2, 2)  # 8x8
    x = b.conv_bn_act(x, "features.2", 32, 32, 3, stride=2)  # 4x4
    x = b.flatten(x)  # 32*4*4 = 512 features, channel-major blocks of 16
    x = b.gemm(x, "classifier.0", 32 * 4 * 4, 64, trans_b=True, target_std=1.0)
    x = b.relu(x, "classifier.1")
    b.gemm(x, "classifier.2", 64, NUM_CLASSES, trans_b=False, output="logits")


def _matmul_head(b: _Builder) -> None:
    x = b.conv_bn_act("input", "features.0", 3, 16, 3)
    x = b.conv_bn_act(x, "features.1", 16, 32, 3, stride=2)  # 16x16
    x = b.conv_bn_act(x, "features.2", 32, 64, 3, stride=2)  # 8x8
    x = b.gap(x)
    shape = b.const("reshape.shape", np.array([-1, 64], dtype=np.int64))
    x = b.node("Reshape", [x, shape], "reshape")
    w = b.init("fc.weight", b.rng.normal(0.0, np.sqrt(1.0 / 64), size=(64, NUM_CLASSES)).astype(np.float32))
    bias = b.init("fc.bias", np.zeros(NUM_CLASSES, dtype=np.float32))
    b.linear_calib("fc.matmul", x, w, bias, False, NUM_CLASSES, 2.0, 0.3)
    x = b.node("MatMul", [x, w], "fc.matmul")
    b.node("Add", [x, bias], "fc.add", output="logits")


def _tiny_conv(b: _Builder) -> None:
    x = b.conv("input", "conv", 3, 8, 3, pad=1, bias=True)
    b.node("Relu", [x], "relu", output="logits")


_ARCHS: dict[str, Callable[[_Builder], None]] = {
    "plain": _plain,
    "resnet": _resnet,
    "mobilenetv2": _mobilenetv2,
    "inception": _inception,
    "grouped": _grouped,
    "se": _se,
    "flatten_gemm": _flatten_gemm,
    "matmul_head": _matmul_head,
    "tiny_conv": _tiny_conv,
}


# --------------------------------------------------------------------------
# data calibration
# --------------------------------------------------------------------------


def _calibrate(model: onnx.ModelProto, items: list[dict], seed: int) -> None:
    """Set BN running stats and head layers from activation statistics, in place.

    * BN: running mean/var := per-channel stats of the BN input on calibration
      data, perturbed by the pre-drawn per-channel noise.
    * linear (Gemm / MatMul+Add): weights scaled so the centred output has std
      ``target_std``; bias := -mean output + pre-drawn noise.

    Items are processed level by level (level = number of calibrated layers on
    the longest path from the input, inclusive), so each item sees its final
    upstream parameters.  One ORT session: the calibrated parameters are
    turned into graph inputs and fed.
    """
    if not items:
        return
    import onnxruntime as ort

    g = model.graph
    by_node = {it["node"]: it for it in items}
    params = set()
    for it in items:
        params |= {it["mean"], it["var"]} if it["kind"] == "bn" else {it["weight"], it["bias"]}
    values = {t.name: numpy_helper.to_array(t).copy() for t in g.initializer if t.name in params}

    # levels
    tdepth: dict[str, int] = {}
    for n in g.node:
        d = max((tdepth.get(i, 0) for i in n.input), default=0)
        if n.name in by_node:
            d += 1
            by_node[n.name]["level"] = d
        for o in n.output:
            tdepth[o] = d

    cal = copy.deepcopy(model)
    keep = [t for t in cal.graph.initializer if t.name not in params]
    del cal.graph.initializer[:]
    cal.graph.initializer.extend(keep)
    for name, v in values.items():
        cal.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(v.shape)))
    probe = sorted({it["input"] for it in items})
    for name in probe:
        cal.graph.output.append(helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(cal.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = random_input(model, batch=32, seed=10_000 + seed)

    for level in range(1, max(it["level"] for it in items) + 1):
        acts = dict(zip(probe, sess.run(probe, {**feeds, **values})))
        for it in items:
            if it["level"] != level:
                continue
            a = acts[it["input"]].astype(np.float64)
            if it["kind"] == "bn":
                axes = (0,) + tuple(range(2, a.ndim))
                mu, sd = a.mean(axis=axes), a.std(axis=axes) + 1e-3
                values[it["mean"]] = (mu + it["mean_noise"] * sd).astype(np.float32)
                values[it["var"]] = (sd**2 * it["var_factor"]).astype(np.float32)
            else:
                w = values[it["weight"]].astype(np.float64)
                z = a.reshape(a.shape[0], -1) @ (w.T if it["trans_b"] else w)
                scale = it["target_std"] / max(float((z - z.mean(0)).std()), 1e-6)
                values[it["weight"]] = (w * scale).astype(np.float32)
                values[it["bias"]] = (-z.mean(0) * scale + it["bias_noise"]).astype(np.float32)

    for t in g.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(values[t.name], name=t.name))


# --------------------------------------------------------------------------
# BatchNorm folding
# --------------------------------------------------------------------------


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` with every foldable Conv->BatchNormalization pair folded.

    A BN is folded when its only input producer is a Conv whose output has no
    other consumer (and is not a graph output), whose weight (and bias, if
    any) and all four BN parameters are initializers, and the BN is in
    inference mode.  Folding is done in float64 and cast back to float32::

        s  = gamma / sqrt(var + eps)
        W' = W * s[:, None, None, None]
        b' = (b - mean) * s + beta

    The folded Conv takes over the BN's output name.  New parameters are
    written under the Conv's ``<conv name>.weight`` / ``.bias`` names when
    free (a suffix is added on clashes); initializers left unused are removed.
    """
    m = copy.deepcopy(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    graph_outputs = {o.name for o in g.output}

    def consumers(name: str) -> list[onnx.NodeProto]:
        return [n for n in g.node if name in n.input]

    def use_count(name: str) -> int:
        return sum(list(n.input).count(name) for n in g.node)

    def fresh(base: str) -> str:
        if base not in inits:
            return base
        i = 1
        while f"{base}_{i}" in inits:
            i += 1
        return f"{base}_{i}"

    producer = {o: n for n in g.node for o in n.output}
    to_remove: list[onnx.NodeProto] = []
    for bn in list(g.node):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
            continue
        if len(bn.output) != 1 or len(bn.input) != 5:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in bn.attribute}
        if attrs.get("training_mode", 0):
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
            continue
        y = conv.output[0]
        if y in graph_outputs or len(consumers(y)) != 1 or use_count(y) != 1:
            continue
        if not all(i in inits for i in bn.input[1:]) or conv.input[1] not in inits:
            continue
        has_bias = len(conv.input) > 2 and conv.input[2] != ""
        if has_bias and conv.input[2] not in inits:
            continue

        eps = float(attrs.get("epsilon", 1e-5))
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:])
        w_t = inits[conv.input[1]]
        w = numpy_helper.to_array(w_t).astype(np.float64)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias else np.zeros(w.shape[0])
        s = gamma / np.sqrt(var + eps)
        w_new = (w * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        b_new = ((b - mean) * s + beta).astype(np.float32)

        conv_name = conv.name or y
        # weight: overwrite in place if this Conv is its only user, else write a new tensor
        if use_count(conv.input[1]) == 1:
            w_t.CopyFrom(numpy_helper.from_array(w_new, name=w_t.name))
        else:
            name = fresh(f"{conv_name}.weight")
            g.initializer.append(numpy_helper.from_array(w_new, name=name))
            inits[name] = g.initializer[-1]
            conv.input[1] = name
        if has_bias and use_count(conv.input[2]) == 1:
            b_t = inits[conv.input[2]]
            b_t.CopyFrom(numpy_helper.from_array(b_new, name=b_t.name))
        else:
            name = fresh(f"{conv_name}.bias")
            g.initializer.append(numpy_helper.from_array(b_new, name=name))
            inits[name] = g.initializer[-1]
            if has_bias:
                conv.input[2] = name
            else:
                while len(conv.input) < 2:
                    conv.input.append("")
                conv.input.append(name)

        conv.output[0] = bn.output[0]
        producer[bn.output[0]] = conv
        del producer[y]
        to_remove.append(bn)
        # drop any value_info for the now-vanished intermediate tensor
        for vi in [v for v in g.value_info if v.name == y]:
            g.value_info.remove(vi)

    for n in to_remove:
        g.node.remove(n)
    used = {i for n in g.node for i in n.input} | graph_outputs
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    return m


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _build_bytes(name: str, folded: bool, seed: int) -> bytes:
    if name not in _ARCHS:
        raise KeyError(f"unknown zoo model {name!r}; known: {ZOO_NAMES + EXTRA_NAMES}")
    b = _Builder(seed)
    _ARCHS[name](b)
    model_id = f"{name}-folded" if folded else name
    out_shape = ("N", 8, 32, 32) if name == "tiny_conv" else ("N", NUM_CLASSES)
    m = b.model(model_id, out_shape)
    _calibrate(m, b.calib, seed)
    if folded:
        m = fold_batchnorm(m)
        m.graph.name = model_id
    return m.SerializeToString()


def build(name: str, folded: bool = False, seed: int = 0) -> onnx.ModelProto:
    """Build zoo model ``name`` (a fresh ModelProto each call; safe to mutate)."""
    m = onnx.ModelProto()
    m.ParseFromString(_build_bytes(name, bool(folded), int(seed)))
    return m


def all_models() -> list[tuple[str, onnx.ModelProto]]:
    """All 16 zoo models as ``(id, model)``: ``"plain", "plain-folded", "resnet", ...``."""
    out = []
    for name in ZOO_NAMES:
        out.append((name, build(name, folded=False)))
        out.append((f"{name}-folded", build(name, folded=True)))
    return out


def random_input(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for every non-initializer graph input.

    Symbolic / unknown dims become ``batch``.  Float image-like inputs
    (rank 4) get a smooth low-frequency component plus per-sample,
    per-channel offsets plus pixel noise, so that samples differ in ways that
    survive global pooling; other floats are standard normal.
    """
    rng = np.random.default_rng(seed)
    init_names = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            if len(shape) == 4 and shape[2] >= 4 and shape[3] >= 4:
                n, c, h, w = shape
                low = rng.normal(size=(n, c, 4, 4))
                ry = np.minimum((np.arange(h) * 4) // h, 3)
                rx = np.minimum((np.arange(w) * 4) // w, 3)
                smooth = low[:, :, ry][:, :, :, rx]
                offset = rng.normal(0.0, 0.5, size=(n, c, 1, 1))
                x = 0.6 * smooth + offset + 0.5 * rng.normal(size=shape)
            else:
                x = rng.normal(size=shape)
            feeds[vi.name] = x.astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            feeds[vi.name] = rng.integers(0, 10, size=shape).astype(dtype)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` in a plain onnxruntime CPU session; returns all outputs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


# --------------------------------------------------------------------------
# BlazeFace-like detector (channel-padding residuals)
# --------------------------------------------------------------------------

BLAZEFACE_INPUT_SHAPE = (1, 32, 32, 3)  # NHWC, batch 1, as blazeface_front_128.onnx


def _blaze_block(b: _Builder, x: str, prefix: str, cin: int, cout: int, stride: int, widen: str,
                 hw: int) -> str:
    """A BlazeBlock: depthwise 3x3 (no bias) -> pointwise 1x1 (bias), added to a shortcut that is MaxPooled
    when strided and widened to `cout` channels with zeros by `widen`:

    * "concat_fill": Concat(shortcut, ConstantOfShape(constant shape)) (the TF-converted BlazeFace);
    * "concat_const": Concat(zero initializer, shortcut) (zeros before the shortcut);
    * "pad_after" / "pad_both": Pad on the channel axis, constant 0 (PyTorch BlazeFace's F.pad).
    """
    pads = [0, 0, 1, 1] if stride == 2 else [1, 1, 1, 1]  # TF "SAME"
    w = b.rng.normal(0.0, np.sqrt(2.0 / 9), size=(cin, 1, 3, 3)).astype(np.float32)
    y = b.node("Conv", [x, b.init(f"{prefix}.dw.weight", w)], f"{prefix}.dw", kernel_shape=[3, 3],
               strides=[stride, stride], pads=pads, group=cin)
    y = b.conv(y, f"{prefix}.pw", cin, cout, 1, pad=0, bias=True, gain=1.0)
    sc = b.maxpool(x, f"{prefix}.pool", 2, 2) if stride == 2 else x
    extra, out_hw = cout - cin, hw // stride
    if widen == "concat_fill":
        shape = b.const(f"{prefix}.fill.shape", np.array([1, extra, out_hw, out_hw], dtype=np.int64))
        zeros = b.node("ConstantOfShape", [shape], f"{prefix}.fill")
        sc = b.node("Concat", [sc, zeros], f"{prefix}.concat", axis=1)
    elif widen == "concat_const":
        zeros = b.init(f"{prefix}.zeros", np.zeros((1, extra, out_hw, out_hw), dtype=np.float32))
        sc = b.node("Concat", [zeros, sc], f"{prefix}.concat", axis=1)
    elif widen in ("pad_after", "pad_both"):
        before = extra // 2 if widen == "pad_both" else 0
        pads = np.array([0, before, 0, 0, 0, extra - before, 0, 0], dtype=np.int64)
        sc = b.node("Pad", [sc, b.const(f"{prefix}.pad.pads", pads)], f"{prefix}.pad", mode="constant")
    else:
        assert widen == "none" and extra == 0
    return b.relu(b.add(y, sc, f"{prefix}.add"), f"{prefix}.relu")


def _blaze_heads(b: _Builder, x: str, prefix: str, c: int, hw: int, anchors: int) -> tuple[str, str]:
    """BlazeFace's heads: 1x1 Conv -> Transpose to NHWC -> Reshape to (1, anchors, k)."""
    outs = []
    for kind, per_anchor in (("classificators", 1), ("regressors", 4)):
        y = b.conv(x, f"{prefix}.{kind}", c, anchors * per_anchor, 1, pad=0, bias=True, gain=1.0)
        y = b.node("Transpose", [y], f"{prefix}.{kind}.transpose", perm=[0, 2, 3, 1])
        shape = b.const(f"{prefix}.{kind}.shape", np.array([1, hw * hw * anchors, per_anchor], dtype=np.int64))
        outs.append(b.node("Reshape", [y, shape], f"{prefix}.{kind}.reshape", output=f"{kind}_{prefix}"))
    return outs[0], outs[1]


def build_blazeface(seed: int = 0) -> onnx.ModelProto:
    """A small BlazeFace: NHWC input ``"input"`` (1, 32, 32, 3) transposed to NCHW, a 5x5 stride-2 stem, six
    BlazeBlocks whose shortcuts widen channels in each of the ways real exports do (see `_blaze_block`), and
    two detection levels (8x8 and 4x4, 2 anchors each) whose four outputs are ``classificators_l1``
    (1, 128, 1), ``regressors_l1`` (1, 128, 4), ``classificators_l2`` (1, 32, 1), ``regressors_l2``
    (1, 32, 4). Opset 17, no BatchNorm (biases folded, as in the real model)."""
    b = _Builder(seed)
    x = b.node("Transpose", ["input"], "input.nchw", perm=[0, 3, 1, 2])
    w = b.rng.normal(0.0, np.sqrt(2.0 / 75), size=(8, 3, 5, 5)).astype(np.float32)
    x = b.node("Conv", [x, b.init("stem.weight", w), b.init("stem.bias", np.full(8, 0.1, np.float32))], "stem",
               kernel_shape=[5, 5], strides=[2, 2], pads=[1, 1, 2, 2])  # 16x16
    x = b.relu(x, "stem.relu")
    x = _blaze_block(b, x, "block0", 8, 8, 1, "none", 16)
    x = _blaze_block(b, x, "block1", 8, 12, 2, "concat_fill", 16)  # 8x8
    x = _blaze_block(b, x, "block2", 12, 16, 1, "pad_after", 8)
    x = _blaze_block(b, x, "block3", 16, 20, 1, "concat_const", 8)
    outputs = list(_blaze_heads(b, x, "l1", 20, 8, 2))
    x = _blaze_block(b, x, "block4", 20, 24, 2, "pad_both", 8)  # 4x4
    x = _blaze_block(b, x, "block5", 24, 24, 1, "none", 4)
    outputs += _blaze_heads(b, x, "l2", 24, 4, 2)
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, list(BLAZEFACE_INPUT_SHAPE))
    shapes = [(1, 128, 1), (1, 128, 4), (1, 32, 1), (1, 32, 4)]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(s)) for o, s in zip(outputs, shapes)]
    inits = [numpy_helper.from_array(v, name=k) for k, v in b.inits.items()]
    graph = helper.make_graph(b.nodes, "blazeface", [inp], outs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ocomp-tests-zoo",
                             ir_version=IR_VERSION)
