"""Sanity tests for the in-code model zoo (tests/zoo.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import zoo

# folded vs unfolded variants must agree to this tolerance (float32 rounding only)
FOLD_RTOL = 1e-4
FOLD_ATOL = 1e-4
# minimum mean (over classes) std of logits across a batch of random inputs
MIN_BATCH_STD = 0.05


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
            for d in vi.type.tensor_type.shape.dim]


def _inits(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def _consumers(m: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if tensor in n.input]


def _producer(m: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in m.graph.node if tensor in n.output), None)


# --------------------------------------------------------------------------
# generic properties, every model
# --------------------------------------------------------------------------


def test_api_shape():
    assert zoo.ZOO_NAMES == ("plain", "resnet", "mobilenetv2", "inception", "grouped", "se",
                             "flatten_gemm", "matmul_head")
    ids = [i for i, _ in zoo.all_models()]
    assert len(ids) == 16 and len(set(ids)) == 16
    assert ids[:2] == ["plain", "plain-folded"]


def test_checker_and_io(zoo_model):
    m = zoo_model
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version == 8
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 17)]
    assert [i.name for i in m.graph.input] == ["input"]
    assert _dims(m.graph.input[0]) == ["N", 3, 32, 32]
    assert [o.name for o in m.graph.output] == ["logits"]
    assert _dims(m.graph.output[0]) == ["N", 10]
    for vi in list(m.graph.input) + list(m.graph.output):
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in m.graph.initializer
               if not t.name.endswith(".shape"))


def test_shape_inference(zoo_model):
    m = zoo_model
    onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    # infer the output shape from scratch (declared output shape removed)
    m.graph.output[0].type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    dims = _dims(inferred.graph.output[0])
    if m.graph.name.startswith("matmul_head"):
        # Reshape with constant shape [-1, C] cannot propagate the symbolic batch
        # name through ONNX shape inference: it comes out as an anonymous dim.
        assert len(dims) == 2 and dims[1] == 10 and isinstance(dims[0], str)
    else:
        assert dims == ["N", 10]


def test_names(zoo_model):
    m = zoo_model
    gid = m.graph.name
    assert gid in {i for i, _ in zoo.all_models()}
    names = [n.name for n in m.graph.node]
    assert all(names) and len(set(names)) == len(names)
    inits = [t.name for t in m.graph.initializer]
    assert len(set(inits)) == len(inits)
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm", "BatchNormalization"):
            assert n.input[1] == f"{n.name}.weight", (n.name, n.input[1])


@pytest.mark.parametrize("batch", [1, 3])
def test_runs(zoo_model, batch):
    (y,) = zoo.run(zoo_model, zoo.random_input(zoo_model, batch=batch, seed=batch))
    assert y.shape == (batch, 10) and y.dtype == np.float32
    assert np.isfinite(y).all()
    assert np.abs(y).max() < 100  # activations stay O(1)


def test_outputs_vary_across_inputs(zoo_model):
    (y,) = zoo.run(zoo_model, zoo.random_input(zoo_model, batch=16, seed=7))
    assert y.std(axis=0).mean() > MIN_BATCH_STD
    # the predicted class is not the same for every sample
    assert len(set(y.argmax(axis=1).tolist())) >= 3


@pytest.mark.parametrize("name", zoo.ZOO_NAMES)
def test_folded_matches_unfolded(name):
    m, mf = zoo.build(name), zoo.build(name, folded=True)
    assert m.graph.name == name and mf.graph.name == f"{name}-folded"
    assert "BatchNormalization" in _ops(m)
    assert "BatchNormalization" not in _ops(mf)
    n_bn = _ops(m).count("BatchNormalization")
    assert len(mf.graph.node) == len(m.graph.node) - n_bn
    feeds = zoo.random_input(m, batch=4, seed=3)
    (y,), (yf,) = zoo.run(m, feeds), zoo.run(mf, feeds)
    np.testing.assert_allclose(yf, y, rtol=FOLD_RTOL, atol=FOLD_ATOL)


@pytest.mark.parametrize("name", zoo.ZOO_NAMES)
def test_batchnorm_is_nontrivial(name):
    """BN parameters are not identity, so folding actually changes the Convs."""
    m = zoo.build(name)
    inits = _inits(m)
    for n in m.graph.node:
        if n.op_type != "BatchNormalization":
            continue
        gamma, beta, mean, var = (inits[i] for i in n.input[1:])
        assert (var > 0).all()
        assert gamma.std() > 0.05 and beta.std() > 0.01 and np.abs(mean).max() > 1e-3
        conv = _producer(m, n.input[0])
        assert conv is not None and conv.op_type == "Conv"
    # dropping the BNs' effect (identity stats) changes the output
    mf = zoo.build(name, folded=True)
    assert any(not np.array_equal(_inits(mf)[k], v) for k, v in inits.items() if k.endswith(".weight")
               and k in _inits(mf))


def test_determinism():
    a, b = zoo.build("resnet", seed=0), zoo.build("resnet", seed=0)
    assert a.SerializeToString() == b.SerializeToString()
    c = zoo.build("resnet", seed=1)
    assert a.SerializeToString() != c.SerializeToString()
    # returned models are independent copies
    a.graph.name = "mutated"
    assert zoo.build("resnet").graph.name == "resnet"


def test_gemm_transb_mix():
    trans = set()
    for name in zoo.ZOO_NAMES:
        for n in zoo.build(name).graph.node:
            if n.op_type == "Gemm":
                trans.add(_attr(n, "transB", 0))
    assert trans == {0, 1}


# --------------------------------------------------------------------------
# structural claims, per model
# --------------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["unfolded", "folded"])
def folded(request):
    return request.param


def _head_is_gap_flatten_gemm(m):
    gemm = _producer(m, "logits")
    assert gemm.op_type == "Gemm"
    flat = _producer(m, gemm.input[0])
    assert flat.op_type == "Flatten"
    assert _producer(m, flat.input[0]).op_type == "GlobalAveragePool"


def _conv_channels(m, conv):
    w = _inits(m)[conv.input[1]]
    return w.shape[0], w.shape[1] * _attr(conv, "group", 1)


def test_plain(folded):
    m = zoo.build("plain", folded)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert 3 <= len(convs) <= 4
    assert any(_attr(c, "strides") == [2, 2] for c in convs)
    assert "Add" not in _ops(m) and "Concat" not in _ops(m)
    _head_is_gap_flatten_gemm(m)
    assert _attr(_producer(m, "logits"), "transB") == 1


def test_resnet(folded):
    m = zoo.build("resnet", folded)
    adds = [n for n in m.graph.node if n.op_type == "Add"]
    assert 2 <= len(adds) <= 3
    for a in adds:
        (relu,) = _consumers(m, a.output[0])
        assert relu.op_type == "Relu"
    # one projection shortcut: 1x1 strided Conv (+BN when unfolded) feeding an Add
    proj = [n for n in m.graph.node if n.op_type == "Conv" and _attr(n, "kernel_shape") == [1, 1]]
    assert len(proj) == 1 and _attr(proj[0], "strides") == [2, 2]
    t = proj[0].output[0]
    if not folded:
        (bn,) = _consumers(m, t)
        assert bn.op_type == "BatchNormalization"
        t = bn.output[0]
    assert _consumers(m, t)[0].op_type == "Add"
    # identity shortcut: an Add input coming straight from a block-output Relu
    assert any(_producer(m, i).op_type == "Relu" for a in adds for i in a.input)
    _head_is_gap_flatten_gemm(m)
    assert _attr(_producer(m, "logits"), "transB") == 0


def test_mobilenetv2(folded):
    m = zoo.build("mobilenetv2", folded)
    inits = _inits(m)
    dw = [n for n in m.graph.node if n.op_type == "Conv" and _attr(n, "group", 1) > 1]
    assert len(dw) >= 3
    for c in dw:
        cout, cin = _conv_channels(m, c)
        assert _attr(c, "group") == cin == cout  # depthwise
    assert any(_attr(c, "strides") == [2, 2] for c in dw)
    clips = [n for n in m.graph.node if n.op_type == "Clip"]
    assert clips
    for c in clips:
        assert len(c.input) == 3
        assert float(inits[c.input[1]]) == 0.0 and float(inits[c.input[2]]) == 6.0
    # expand 1x1 convs feed (through BN) a Clip; project 1x1 convs are linear
    one_by_one = [n for n in m.graph.node if n.op_type == "Conv" and _attr(n, "kernel_shape") == [1, 1]]
    assert any(n.name.endswith("expand.conv") for n in one_by_one)
    assert any(n.name.endswith("project.conv") for n in one_by_one)
    adds = [n for n in m.graph.node if n.op_type == "Add"]
    assert len(adds) >= 2
    for a in adds:  # residual adds are linear (no activation after)
        assert all(c.op_type != "Clip" for c in _consumers(m, a.output[0]))
    _head_is_gap_flatten_gemm(m)


def test_inception(folded):
    m = zoo.build("inception", folded)
    (cat,) = [n for n in m.graph.node if n.op_type == "Concat"]
    assert _attr(cat, "axis") == 1 and len(cat.input) == 3
    (post,) = _consumers(m, cat.output[0])
    assert post.op_type == "Conv"
    (pool,) = [n for n in m.graph.node if n.op_type == "MaxPool"]
    assert _attr(pool, "strides") == [1, 1] and _attr(pool, "pads") == [1, 1, 1, 1]
    # the three branches share the stem output
    stem_out = pool.input[0]
    assert len(_consumers(m, stem_out)) == 3
    _head_is_gap_flatten_gemm(m)


def test_grouped(folded):
    m = zoo.build("grouped", folded)
    grouped = [n for n in m.graph.node if n.op_type == "Conv" and _attr(n, "group", 1) > 1]
    assert len(grouped) == 1
    cout, cin = _conv_channels(m, grouped[0])
    assert _attr(grouped[0], "group") == 4 and cin > 4  # grouped, not depthwise
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert convs[0] is not grouped[0] and convs[-1] is not grouped[0]
    _head_is_gap_flatten_gemm(m)


def test_se(folded):
    m = zoo.build("se", folded)
    (sig,) = [n for n in m.graph.node if n.op_type == "Sigmoid"]
    (mul,) = _consumers(m, sig.output[0])
    assert mul.op_type == "Mul"
    trunk = [i for i in mul.input if i != sig.output[0]][0]
    # gate path: trunk -> GAP -> Conv1x1 -> Relu -> Conv1x1 -> Sigmoid
    chain, t = [], sig.input[0]
    while t != trunk:
        p = _producer(m, t)
        chain.append(p.op_type)
        t = p.input[0]
    assert chain == ["Conv", "Relu", "Conv", "GlobalAveragePool"]
    assert _consumers(m, mul.output[0])[0].op_type == "Conv"
    _head_is_gap_flatten_gemm(m)


def test_flatten_gemm(folded):
    m = zoo.build("flatten_gemm", folded)
    gemms = [n for n in m.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2
    flat = _producer(m, gemms[0].input[0])
    assert flat.op_type == "Flatten"
    w = _inits(m)[gemms[0].input[1]]
    assert _attr(gemms[0], "transB") == 1 and w.shape == (64, 32 * 4 * 4)  # C*H*W features
    assert _consumers(m, gemms[0].output[0])[0].op_type == "Relu"
    assert _attr(gemms[1], "transB", 0) == 0
    inferred = onnx.shape_inference.infer_shapes(m)
    shapes = {vi.name: _dims(vi) for vi in inferred.graph.value_info}
    assert shapes[flat.input[0]] == ["N", 32, 4, 4]
    assert "GlobalAveragePool" not in _ops(m)


def test_matmul_head(folded):
    m = zoo.build("matmul_head", folded)
    add = _producer(m, "logits")
    assert add.op_type == "Add"
    mm = _producer(m, add.input[0])
    assert mm.op_type == "MatMul"
    inits = _inits(m)
    assert inits[mm.input[1]].shape == (64, 10) and inits[add.input[1]].shape == (10,)
    reshape = _producer(m, mm.input[0])
    assert reshape.op_type == "Reshape" and inits[reshape.input[1]].tolist() == [-1, 64]
    assert _producer(m, reshape.input[0]).op_type == "GlobalAveragePool"
    assert "Gemm" not in _ops(m)


def test_tiny_conv():
    m = zoo.build("tiny_conv")
    onnx.checker.check_model(m, full_check=True)
    assert _ops(m) == ["Conv", "Relu"]
    assert _dims(m.graph.output[0]) == ["N", 8, 32, 32]
    assert _inits(m)["conv.weight"].shape == (8, 3, 3, 3)
    (y,) = zoo.run(m, zoo.random_input(m, batch=2))
    assert y.shape == (2, 8, 32, 32) and (y >= 0).all() and y.max() > 0


# --------------------------------------------------------------------------
# fold_batchnorm on its own
# --------------------------------------------------------------------------


def test_fold_batchnorm_idempotent_and_pure():
    m = zoo.build("resnet")
    before = m.SerializeToString()
    f1 = zoo.fold_batchnorm(m)
    assert m.SerializeToString() == before  # input untouched
    f2 = zoo.fold_batchnorm(f1)
    assert f1.SerializeToString() == f2.SerializeToString()
    onnx.checker.check_model(f1, full_check=True)


def test_fold_batchnorm_skips_unfoldable():
    """A Conv whose output also feeds another node must keep its BN."""
    m = zoo.build("plain")
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    m.graph.output.append(onnx.helper.make_tensor_value_info(conv.output[0], onnx.TensorProto.FLOAT,
                                                             ["N", 16, 32, 32]))
    f = zoo.fold_batchnorm(m)
    assert _ops(f).count("BatchNormalization") == 1
    (bn,) = [n for n in f.graph.node if n.op_type == "BatchNormalization"]
    assert bn.input[0] == conv.output[0]
    onnx.checker.check_model(f, full_check=True)
    feeds = zoo.random_input(m, batch=2)
    for a, b in zip(zoo.run(m, feeds), zoo.run(f, feeds)):
        np.testing.assert_allclose(b, a, rtol=FOLD_RTOL, atol=FOLD_ATOL)
