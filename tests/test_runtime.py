"""The ocomp custom-op library against onnxruntime's own float ops.

TernaryConv is compared with ORT Conv on the dequantized weights (alpha * T)
plus bias; TernaryGemm/TernaryMatMul with a float64 numpy reference. Bad
inputs must come back as onnxruntime errors that name the problem.

The model builders here are also used by test_codec.py, test_runtime_asan.py
and test_deploy.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import ocomp.runtime as rt
from ocomp.passes.ternary import pack_ternary

# max |ours - reference| <= REL_TOL * max(1, max |reference|): float32 sums of
# up to a few thousand terms in a different order than ORT's.
REL_TOL = 1e-5

OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("ocomp", 1)]


def require_library() -> str:
    """Path of the built library; skips (saying why) only when it truly cannot be found."""
    try:
        return rt.library_path()
    except RuntimeError as e:
        pytest.skip(f"ocomp runtime library not built: {e}")


def ternary(rng: np.random.Generator, shape, zero_fraction: float = 0.5) -> np.ndarray:
    t = rng.choice(np.array([-1, 1], dtype=np.int8), size=shape)
    t[rng.random(shape) < zero_fraction] = 0
    return t


def _model(nodes, inits, inputs=("X",), outputs=("Y",), opsets=OPSETS) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(n, TensorProto.UINT8 if n == "P" else TensorProto.FLOAT, None) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=opsets)


def ternary_node_model(op: str, packed, alpha, bias, constant: bool = True, **attrs) -> onnx.ModelProto:
    """One ocomp node. constant=False feeds packed/alpha/bias as graph inputs
    (named P, A, B) instead of initializers."""
    names = ["X", "P", "A"] + (["B"] if bias is not None else [])
    node = helper.make_node(op, names, ["Y"], domain="ocomp", **attrs)
    if not constant:
        return _model([node], [], inputs=names)
    inits = [numpy_helper.from_array(np.asarray(packed, np.uint8), "P"),
             numpy_helper.from_array(np.asarray(alpha, np.float32), "A")]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, np.float32), "B"))
    return _model([node], inits)


def conv_attrs(weight_shape, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1) -> dict:
    return dict(weight_shape=list(weight_shape), kernel_shape=list(weight_shape[2:]), strides=list(strides),
                pads=list(pads), dilations=list(dilations), group=group)


def run_ternary(model: onnx.ModelProto, feeds: dict, **options) -> np.ndarray:
    return rt.session(model, **options).run(None, feeds)[0]


def reference_conv(x, t, alpha, bias, attrs) -> np.ndarray:
    w = (np.asarray(alpha, np.float32)[:, None, None, None] * t).astype(np.float32)
    b = np.zeros(t.shape[0], np.float32) if bias is None else np.asarray(bias, np.float32)
    a = {k: v for k, v in attrs.items() if k != "weight_shape"}
    node = helper.make_node("Conv", ["X", "W", "B"], ["Y"], **a)
    model = _model([node], [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
                   opsets=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})[0]


def reference_matmul(x, t, alpha, bias) -> np.ndarray:
    y = np.asarray(x, np.float64) @ (np.asarray(alpha, np.float64)[:, None] * t).T
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def assert_close(y, ref, what=""):
    ref = np.asarray(ref)
    assert y.shape == ref.shape, f"{what}: shape {y.shape} != {ref.shape}"
    bound = REL_TOL * max(1.0, float(np.abs(ref).max(initial=0.0)))
    err = float(np.abs(y.astype(np.float64) - ref).max(initial=0.0))
    assert err <= bound, f"{what}: max |diff| {err:.3g} > {bound:.3g} (REL_TOL={REL_TOL})"


def conv_case(rng, n, cg, kg, group, h, w, kh, kw, strides, pads, dilations, with_bias=True):
    """Builds one random TernaryConv case: (model, x, reference output)."""
    c, k = cg * group, kg * group
    t = ternary(rng, (k, cg, kh, kw))
    alpha = rng.uniform(0.5, 1.5, k).astype(np.float32)
    bias = rng.normal(size=k).astype(np.float32) if with_bias else None
    attrs = conv_attrs(t.shape, strides, pads, dilations, group)
    x = rng.normal(size=(n, c, h, w)).astype(np.float32)
    model = ternary_node_model("TernaryConv", pack_ternary(t), alpha, bias, **attrs)
    return model, x, reference_conv(x, t, alpha, bias, attrs)


@st.composite
def conv_params(draw):
    group_kind = draw(st.sampled_from(["1", "1", "2", "3", "depthwise"]))
    if group_kind == "depthwise":
        group, cg, kg = draw(st.integers(1, 12)), 1, draw(st.sampled_from([1, 1, 2]))
    else:
        group, cg, kg = int(group_kind), draw(st.integers(1, 9)), draw(st.integers(1, 20))
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilations = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = tuple(draw(st.integers(0, 3)) for _ in range(4))
    eff_h, eff_w = dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1
    h = draw(st.integers(max(1, eff_h - pads[0] - pads[2]), eff_h + 14))
    w = draw(st.integers(max(1, eff_w - pads[1] - pads[3]), eff_w + 14))
    n = draw(st.integers(1, 3))
    return dict(n=n, cg=cg, kg=kg, group=group, h=h, w=w, kh=kh, kw=kw, strides=strides, pads=pads,
                dilations=dilations, with_bias=draw(st.booleans()), seed=draw(st.integers(0, 2**31)))


@settings(max_examples=90, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(conv_params())
def test_conv_matches_ort_conv(params):
    require_library()
    p = dict(params)
    rng = np.random.default_rng(p.pop("seed"))
    model, x, ref = conv_case(rng, **p)
    assert_close(run_ternary(model, {"X": x}), ref, str(params))


@pytest.mark.parametrize(
    "c,k,hw,ks,stride,pad",
    [(64, 64, 56, 3, 1, 1), (128, 128, 28, 3, 1, 1), (256, 64, 14, 3, 1, 1), (64, 128, 56, 3, 2, 1),
     (64, 128, 56, 1, 2, 0), (32, 48, 23, 7, 2, 3), (3, 64, 64, 7, 2, 3)],
)
def test_conv_resnet_shapes(c, k, hw, ks, stride, pad):
    """Several reduction blocks, output-channel chunks and tiles (incl. short tails)."""
    require_library()
    rng = np.random.default_rng(c * 1000 + k + hw)
    model, x, ref = conv_case(rng, 1, c, k, 1, hw, hw, ks, ks, (stride, stride), (pad,) * 4, (1, 1))
    assert_close(run_ternary(model, {"X": x}), ref)


@pytest.mark.parametrize(
    "h,w,kh,kw,strides,pads,dilations",
    [(12, 28, 5, 5, (1, 1), (2, 1, 0, 3), (1, 1)),   # padded width 32: aligned, 5 column copies
     (13, 20, 3, 3, (2, 1), (0, 2, 1, 2), (2, 2)),   # width 24, row stride 2, dilated
     (9, 14, 1, 7, (1, 1), (0, 1, 0, 1), (1, 1)),    # width 16
     (9, 22, 3, 3, (1, 1), (1, 1, 1, 1), (1, 3))],   # width 24, column dilation 3
)
def test_conv_aligned_layout(h, w, kh, kw, strides, pads, dilations):
    """Stride-1 rows whose padded width rounds to 8 floats use the aligned, column-shifted layout."""
    require_library()
    rng = np.random.default_rng(h * w)
    model, x, ref = conv_case(rng, 2, 5, 20, 1, h, w, kh, kw, strides, pads, dilations)
    assert_close(run_ternary(model, {"X": x}), ref)


def test_conv_runtime_weights():
    """packed/alpha/bias as graph inputs (decoded per call), not initializers."""
    require_library()
    rng = np.random.default_rng(1)
    t = ternary(rng, (10, 4, 3, 3))
    alpha = rng.uniform(0.5, 1.5, 10).astype(np.float32)
    bias = rng.normal(size=10).astype(np.float32)
    attrs = conv_attrs(t.shape, (1, 2), (1, 0, 2, 1), (2, 1))
    x = rng.normal(size=(2, 4, 11, 13)).astype(np.float32)
    model = ternary_node_model("TernaryConv", None, None, bias, constant=False, **attrs)
    y = run_ternary(model, {"X": x, "P": pack_ternary(t), "A": alpha, "B": bias})
    assert_close(y, reference_conv(x, t, alpha, bias, attrs))
    # Other input sizes with the same session (the kernel caches a plan per size).
    sess = rt.session(ternary_node_model("TernaryConv", pack_ternary(t), alpha, bias, **attrs))
    for h, w in [(11, 13), (7, 5), (20, 3), (11, 13)]:
        x = rng.normal(size=(1, 4, h, w)).astype(np.float32)
        assert_close(sess.run(None, {"X": x})[0], reference_conv(x, t, alpha, bias, attrs), f"{h}x{w}")


@st.composite
def gemm_params(draw):
    return dict(
        m=draw(st.sampled_from([1, 2, 7, 8, 9, 31, 32, 33, 64, 65, 100])),
        kin=draw(st.integers(1, 150)),
        n=draw(st.integers(1, 40)),
        with_bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31)),
    )


@settings(max_examples=60, deadline=None, derandomize=True)
@given(gemm_params(), st.sampled_from(["TernaryGemm", "TernaryMatMul"]))
def test_gemm_and_matmul_match_numpy(params, op):
    require_library()
    rng = np.random.default_rng(params["seed"])
    m, kin, n = params["m"], params["kin"], params["n"]
    t = ternary(rng, (n, kin))
    alpha = rng.uniform(0.5, 1.5, n).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32) if params["with_bias"] else None
    x = rng.normal(size=(m, kin)).astype(np.float32)
    model = ternary_node_model(op, pack_ternary(t), alpha, bias, weight_shape=[n, kin])
    assert_close(run_ternary(model, {"X": x}), reference_matmul(x, t, alpha, bias), str(params))


@pytest.mark.parametrize("x_shape", [(2, 3, 40), (5, 1, 40), (40,), (3, 2, 2, 40), (2, 0, 40)])
def test_matmul_batched(x_shape):
    require_library()
    rng = np.random.default_rng(len(x_shape))
    t = ternary(rng, (17, 40))
    alpha = rng.uniform(0.5, 1.5, 17).astype(np.float32)
    bias = rng.normal(size=17).astype(np.float32)
    x = rng.normal(size=x_shape).astype(np.float32)
    model = ternary_node_model("TernaryMatMul", pack_ternary(t), alpha, bias, weight_shape=[17, 40])
    y = run_ternary(model, {"X": x})
    assert y.shape == x_shape[:-1] + (17,)
    assert_close(y, reference_matmul(x, t, alpha, bias))


def test_threads_give_identical_results():
    require_library()
    rng = np.random.default_rng(7)
    model, x, _ = conv_case(rng, 2, 32, 40, 1, 30, 30, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    y1 = run_ternary(model, {"X": x}, intra_op_num_threads=1)
    y2 = run_ternary(model, {"X": x}, intra_op_num_threads=2)
    np.testing.assert_array_equal(y1, y2)
    t = ternary(rng, (100, 70))
    gm = ternary_node_model("TernaryGemm", pack_ternary(t), np.ones(100), None, weight_shape=[100, 70])
    xg = rng.normal(size=(130, 70)).astype(np.float32)
    np.testing.assert_array_equal(run_ternary(gm, {"X": xg}, intra_op_num_threads=1),
                                  run_ternary(gm, {"X": xg}, intra_op_num_threads=2))


def test_session_accepts_path_bytes_and_proto(tmp_path):
    require_library()
    rng = np.random.default_rng(3)
    model, x, ref = conv_case(rng, 1, 2, 3, 1, 5, 5, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for source in (model, model.SerializeToString(), path, str(path)):
        assert_close(rt.session(source).run(None, {"X": x})[0], ref)
    options = rt.session_options(intra_op_num_threads=1)
    assert options.intra_op_num_threads == 1
    rt.session(model, sess_options=options)  # registered once, then reused
    assert_close(rt.session(model, sess_options=options).run(None, {"X": x})[0], ref)
    with pytest.raises(TypeError):
        rt.session_options(no_such_option=1)


def test_library_path_override(monkeypatch, tmp_path):
    monkeypatch.setenv(rt.LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(RuntimeError, match="OCOMP_RUNTIME_LIBRARY"):
        rt.library_path()


def test_library_exports_only_its_entry_points():
    path = require_library()
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) not installed")
    out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, check=True).stdout
    symbols = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert symbols == {"RegisterCustomOps", "OcompW2A8Path"}, symbols
    needed = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
    assert "onnxruntime" not in needed


# ---------------------------------------------------------------- bad inputs


def _conv_error_cases():
    """(id, model, feeds, expected message fragment) for TernaryConv."""
    rng = np.random.default_rng(11)
    t = ternary(rng, (4, 3, 3, 3))
    packed = pack_ternary(t)
    alpha = np.ones(4, np.float32)
    bias = np.zeros(4, np.float32)
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    attrs = conv_attrs(t.shape, pads=(1, 1, 1, 1))

    def case(name, feeds=None, packed=packed, alpha=alpha, bias=bias, match="", constant=True, **overrides):
        a = dict(attrs, **overrides)
        a = {k: v for k, v in a.items() if v is not None}
        model = ternary_node_model("TernaryConv", packed, alpha, bias, constant=constant, **a)
        return pytest.param(model, feeds if feeds is not None else {"X": x}, match, id=name)

    bad_code = packed.copy()
    bad_code[3] |= 0b11 << 4
    bad_pad = np.concatenate([pack_ternary(np.zeros(4 * 27 - 1, np.int8)), [0]]).astype(np.uint8)
    bad_pad[-2] |= 0b11 << 6
    return [
        case("packed-too-short", packed=packed[:-1], match="packed weights have 26 bytes, expected 27"),
        case("packed-too-long", packed=np.concatenate([packed, [0]]).astype(np.uint8), match="expected 27"),
        case("invalid-code", packed=bad_code, match="0b11"),
        case("alpha-length", alpha=np.ones(3, np.float32), match="alpha must have shape [4]"),
        case("bias-length", bias=np.ones(5, np.float32), match="bias must have shape [4]"),
        case("input-3d", feeds={"X": x[0]}, match="must be 4-D"),
        case("channel-mismatch", feeds={"X": rng.normal(size=(1, 4, 8, 8)).astype(np.float32)}, match="channels"),
        case("input-smaller-than-kernel", feeds={"X": x[:, :, :1, :1]}, pads=[0, 0, 0, 0], match="smaller than"),
        case("stride-zero", strides=[0, 1], match="strides"),
        case("stride-rank", strides=[1, 1, 1], match="strides"),
        case("dilation-zero", dilations=[1, 0], match="dilations"),
        case("negative-pad", pads=[0, -1, 0, 0], match="pads"),
        case("pads-length", pads=[1, 1], match="pads"),
        case("group-not-dividing", group=3, weight_shape=[4, 1, 3, 3], kernel_shape=None, match="divisible"),
        case("group-zero", group=0, match="group"),
        case("weight-shape-rank", weight_shape=[4, 3, 3], kernel_shape=None, match="weight_shape"),
        case("weight-shape-zero", weight_shape=[4, 0, 3, 3], kernel_shape=None, match="weight_shape"),
        case("weight-shape-missing", weight_shape=None, match="weight_shape"),
        case("kernel-shape-mismatch", kernel_shape=[5, 5], match="kernel_shape"),
        case("auto-pad", auto_pad="SAME_UPPER", match="auto_pad"),
        case("runtime-packed-length", constant=False,
             feeds={"X": x, "P": packed[:-2], "A": alpha, "B": bias}, match="expected 27"),
        case("runtime-invalid-code", constant=False,
             feeds={"X": x, "P": bad_code, "A": alpha, "B": bias}, match="0b11"),
        case("runtime-alpha-length", constant=False,
             feeds={"X": x, "P": packed, "A": alpha[:2], "B": bias}, match="alpha"),
        case("runtime-bias-length", constant=False,
             feeds={"X": x, "P": packed, "A": alpha, "B": np.ones((2, 2), np.float32)}, match="bias"),
    ]


def _gemm_error_cases():
    rng = np.random.default_rng(12)
    t = ternary(rng, (6, 10))
    packed = pack_ternary(t)
    x = rng.normal(size=(3, 10)).astype(np.float32)

    def case(name, op="TernaryGemm", feeds=None, packed=packed, alpha=np.ones(6, np.float32), bias=None,
             match="", weight_shape=(6, 10)):
        attrs = {} if weight_shape is None else {"weight_shape": list(weight_shape)}
        model = ternary_node_model(op, packed, alpha, bias, **attrs)
        return pytest.param(model, feeds if feeds is not None else {"X": x}, match, id=name)

    bad_code = packed.copy()
    bad_code[0] = 0xFF
    return [
        case("gemm-packed-length", packed=packed[:-1], match="expected 15"),
        case("gemm-invalid-code", packed=bad_code, match="0b11"),
        case("gemm-alpha-length", alpha=np.ones(7, np.float32), match="alpha must have shape [6]"),
        case("gemm-bias-length", bias=np.ones(2, np.float32), match="bias must have shape [6]"),
        case("gemm-input-rank", feeds={"X": x[None]}, match="2-D"),
        case("gemm-features", feeds={"X": x[:, :9].copy()}, match="input features"),
        case("gemm-weight-shape-missing", weight_shape=None, match="weight_shape"),
        case("gemm-weight-shape-rank", weight_shape=(6, 10, 1), match="weight_shape"),
        case("matmul-features", op="TernaryMatMul", feeds={"X": x[None, :, :4].copy()}, match="input features"),
        case("matmul-scalar", op="TernaryMatMul", feeds={"X": np.array(1.0, dtype=np.float32)}, match="rank"),
    ]


def expect_ort_error(model, feeds, match):
    """The model fails at session creation or at run with an onnxruntime error naming the problem."""
    with pytest.raises(Exception) as excinfo:
        rt.session(model).run(None, feeds)
    assert type(excinfo.value).__module__.startswith("onnxruntime"), repr(excinfo.value)
    assert match in str(excinfo.value), f"{match!r} not in {excinfo.value}"


@pytest.mark.parametrize("model,feeds,match", _conv_error_cases() + _gemm_error_cases())
def test_bad_input_gives_ort_error(model, feeds, match):
    require_library()
    expect_ort_error(model, feeds, match)


@pytest.mark.parametrize("act", [{}, dict(act_scale=0.05)], ids=["float", "w2a8"])
def test_conv_uint8_input_needs_input_layout(act):
    """TernaryConv's X may be uint8 (int8 chaining's codes) as far as onnxruntime's type check goes; without
    input_layout the kernel refuses it with a clear error."""
    require_library()
    rng = np.random.default_rng(12)
    t = ternary(rng, (4, 8, 3, 3))
    model = ternary_node_model("TernaryConv", pack_ternary(t), np.ones(4), None, **conv_attrs(t.shape), **act)
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    expect_ort_error(model, {"X": np.zeros((1, 8, 5, 5), np.uint8)}, "X has the wrong element type")


def test_process_survives_errors():
    """After a series of errors the library still computes correct results."""
    require_library()
    rng = np.random.default_rng(5)
    model, x, ref = conv_case(rng, 1, 3, 5, 1, 9, 9, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    assert_close(run_ternary(model, {"X": x}), ref)
    assert os.path.isfile(rt.library_path())


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_baseline_kernel_without_avx2(tmp_path, isa):
    """The narrower builds of the hot loop, forced with OCOMP_KERNEL_ISA: generic (SSE2/NEON) and, on
    AVX-512 machines where the default is the avx512 build, avx2; in a fresh process (the choice is made
    once per process). Short tiles (widths not a multiple of 16) go through every build's tail path."""
    require_library()
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        sys.path.insert(0, sys.argv[1])
        import test_runtime as tr
        from ocomp.passes.ternary import pack_ternary
        rng = np.random.default_rng(9)
        cases = [(2, 6, 20, 1, 13, 17, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
                 (1, 4, 9, 2, 28, 28, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1)),   # aligned layout
                 (1, 1, 1, 8, 11, 9, 3, 3, (2, 2), (1, 0, 1, 2), (1, 2)),    # depthwise, strided
                 (1, 16, 40, 1, 7, 7, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))]
        for case in cases:
            model, x, ref = tr.conv_case(rng, *case)
            tr.assert_close(tr.run_ternary(model, {"X": x}), ref, str(case))
        t = tr.ternary(rng, (30, 70))
        x = rng.normal(size=(70, 70)).astype(np.float32)
        model = tr.ternary_node_model("TernaryGemm", pack_ternary(t), np.ones(30), None, weight_shape=[30, 70])
        tr.assert_close(tr.run_ternary(model, {"X": x}), tr.reference_matmul(x, t, np.ones(30), None))
        print("GENERIC-OK")
        """
    )
    env = dict(os.environ, OCOMP_KERNEL_ISA=isa, OPENBLAS_NUM_THREADS="1")
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path.
    proc = subprocess.run([sys.executable, "-c", script, str(Path(__file__).resolve().parent)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and "GENERIC-OK" in proc.stdout, proc.stdout + proc.stderr
