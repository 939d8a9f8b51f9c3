"""The custom-op library built with AddressSanitizer + UBSan runs a subset of the
correctness sweep and every bad-input case without a sanitizer report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

pytestmark = [
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed: cannot build the ASan library"),
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="no C++ compiler (g++) installed: cannot build the ASan library"),
]

SUBSET = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import test_runtime as tr
    from ocomp.passes.ternary import pack_ternary

    rng = np.random.default_rng(2024)
    for i in range(40):
        group = int(rng.choice([1, 1, 2, 3]))
        depthwise = i % 7 == 0
        cg = 1 if depthwise else int(rng.integers(1, 7))
        group = int(rng.integers(2, 9)) if depthwise else group
        kg = int(rng.integers(1, 20))
        kh, kw = (int(v) for v in rng.integers(1, 8, size=2))
        strides = tuple(int(v) for v in rng.integers(1, 4, size=2))
        dil = tuple(int(v) for v in rng.integers(1, 3, size=2))
        pads = tuple(int(v) for v in rng.integers(0, 4, size=4))
        eh, ew = dil[0] * (kh - 1) + 1, dil[1] * (kw - 1) + 1
        h = int(rng.integers(max(1, eh - pads[0] - pads[2]), eh + 12))
        w = int(rng.integers(max(1, ew - pads[1] - pads[3]), ew + 12))
        model, x, ref = tr.conv_case(rng, int(rng.integers(1, 3)), cg, kg, group, h, w, kh, kw, strides, pads, dil,
                                     with_bias=bool(i % 2))
        tr.assert_close(tr.run_ternary(model, {"X": x}, intra_op_num_threads=2), ref, f"conv case {i}")
    for m, kin, n in [(1, 7, 3), (5, 130, 40), (8, 64, 16), (33, 65, 17), (100, 150, 9)]:
        t = tr.ternary(rng, (n, kin))
        alpha = rng.uniform(0.5, 1.5, n).astype(np.float32)
        x = rng.normal(size=(m, kin)).astype(np.float32)
        for op in ("TernaryGemm", "TernaryMatMul"):
            model = tr.ternary_node_model(op, pack_ternary(t), alpha, None, weight_shape=[n, kin])
            tr.assert_close(tr.run_ternary(model, {"X": x}), tr.reference_matmul(x, t, alpha, None), op)
    cases = tr._conv_error_cases() + tr._gemm_error_cases()
    for case in cases:
        tr.expect_ort_error(*case.values)
    print(f"ASAN-SUBSET-OK {len(cases)} error cases")
    """
)


# The W2A8 ops (TernaryConv / TernaryGemm / TernaryMatMul with int8 activations) on one path, forced with OCOMP_ISA
# (chosen once per process): every conv case of test_w2a8 (3x3, 1x1, strided, dilated, grouped, depthwise,
# multiplier 2, odd channel and pixel counts) static, with a fused Relu and dynamic, at 1 and 2 threads; the gemm
# cases static and dynamic; the fused residual (input 4, static and dynamic); weights fed at run time; the bad-attribute and infinite-input errors. Outputs equal
# test_w2a8's integer reference exactly (a wrong result is a failure here too, not only a sanitizer report).
W2A8_SUBSET = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import ocomp.runtime as rt
    try:
        path = rt.w2a8_path()
    except RuntimeError as e:
        print(f"W2A8-SKIP {e}")
        sys.exit(0)
    import test_w2a8 as tw
    from test_runtime import expect_ort_error, run_ternary, ternary, ternary_node_model
    from ocomp.passes.ternary import pack_ternary

    runs = 0
    for i, case in enumerate(tw.CONV_CASES):
        for variant in ("static", "relu", "dynamic"):
            act = dict(activation="Relu") if variant == "relu" else None
            model, x, t, alpha, bias, attrs = tw.conv_case(300 + i, case, activation=act,
                                                           dynamic=variant == "dynamic")
            y = run_ternary(model, {"X": x}, intra_op_num_threads=1 + (i + len(variant)) % 2)
            scale, z = tw.dynamic_quant(x) if variant == "dynamic" else (0.03, 117)
            lo = 0.0 if variant == "relu" else -np.inf
            ref = tw.epilogue(tw.int_conv(tw.quantize(x, scale, z), t, z, attrs), alpha, bias, scale, 1, lo)
            np.testing.assert_array_equal(y, ref, err_msg=f"{path}: conv case {i} {variant}")
            runs += 1
    for i, case in enumerate(tw.RESIDUAL_CASES):  # input 4: the fused residual Add, then the fused Relu
        model, x, t, alpha, bias, attrs = tw.conv_case(400 + i, case, activation=dict(activation="Relu"),
                                                       dynamic=i % 2 == 1)
        scale, z = tw.dynamic_quant(x) if i % 2 else (0.03, 117)
        ref = tw.epilogue(tw.int_conv(tw.quantize(x, scale, z), t, z, attrs), alpha, bias, scale, 1)
        r = np.random.default_rng(i).normal(size=ref.shape).astype(np.float32)
        y = run_ternary(tw.residual_model(model), {"X": x, "R": r}, intra_op_num_threads=1 + i % 2)
        np.testing.assert_array_equal(y, np.maximum(ref + r, np.float32(0)), err_msg=f"{path}: residual case {i}")
        runs += 1
    for m, kin, n in tw.GEMM_CASES:
        rng = np.random.default_rng(kin)
        t = ternary(rng, (n, kin))
        alpha = rng.uniform(0.01, 0.1, n).astype(np.float32)
        bias = rng.normal(size=n).astype(np.float32)
        x = rng.normal(size=(m, kin)).astype(np.float32)
        for op in ("TernaryGemm", "TernaryMatMul"):
            for dynamic in (False, True):
                scale, z = tw.dynamic_quant(x) if dynamic else (0.02, 128)
                act = dict(act_quant="dynamic") if dynamic else dict(act_scale=scale, act_zero_point=z)
                model = ternary_node_model(op, pack_ternary(t), alpha, bias, weight_shape=[n, kin], **act)
                y = run_ternary(model, {"X": x}, intra_op_num_threads=2 if m > 8 else 1)
                acc = (tw.quantize(x, scale, z) - z) @ t.astype(np.int64).T
                np.testing.assert_array_equal(y, tw.epilogue(acc, alpha, bias, scale, 1),
                                              err_msg=f"{path}: {op} {m}x{kin}x{n} dynamic={dynamic}")
                runs += 1
    model, x, t, alpha, bias, attrs = tw.conv_case(11, tw.CONV_CASES[2])
    fed = ternary_node_model("TernaryConv", None, None, bias, constant=False, **attrs, act_scale=0.03,
                             act_zero_point=117)
    np.testing.assert_array_equal(run_ternary(fed, {"X": x, "P": pack_ternary(t), "A": alpha, "B": bias}),
                                  run_ternary(model, {"X": x}), err_msg=f"{path}: weights fed at run time")
    bad = next(m for m in tw.test_bad_attributes_give_ort_errors.pytestmark if m.name == "parametrize").args[1]
    for act, match in bad:
        expect_ort_error(tw._bad(**act), {"X": np.zeros((1, 8), np.float32)}, match)
    x = np.zeros((1, 8), np.float32)
    x[0, 3] = np.inf
    expect_ort_error(tw._bad(act_quant="dynamic"), {"X": x}, "infinite values")
    print(f"W2A8-ASAN-OK {path} {runs} runs {len(bad) + 1} error cases")
    """
)
# Every W2A8 path of the build, as test_w2a8 lists them; the ones this CPU or build lacks skip (saying why).
W2A8_PATHS = ["scalar", "avx2", "avxvnni", "avxvnni-evex", "avx512vnni", "neon", "neon-dot"]
SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer")


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory):
    """(the ASan + UBSan build of the library, the environment that runs python with it), built once."""
    build = tmp_path_factory.mktemp("asan") / "build"
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT / "runtime"), "-B", str(build), "-DOCOMP_SANITIZE=ON",
         "-DCMAKE_BUILD_TYPE=RelWithDebInfo"],
        capture_output=True, text=True,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compile_ = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)],
                              capture_output=True, text=True)
    assert compile_.returncode == 0, compile_.stdout + compile_.stderr
    library = build / "libocomp_runtime.so"
    assert library.is_file()
    if shutil.which("readelf"):
        needed = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True).stdout
        assert "libasan" in needed, "the library was not built with -fsanitize=address"

    compiler = shutil.which("gcc") or shutil.which("cc")
    libasan = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan) or not os.path.exists(libasan):
        pytest.skip(f"libasan.so not found via {compiler} -print-file-name (install libasan)")

    # libstdc++ is preloaded too: ASan's __cxa_throw interceptor must resolve the
    # real one at startup, and python itself does not link libstdc++.
    libstdcxx = subprocess.run([compiler, "-print-file-name=libstdc++.so.6"], capture_output=True,
                               text=True).stdout.strip()
    preload = [libasan] + ([libstdcxx] if os.path.isabs(libstdcxx) else [])
    env = {k: v for k, v in os.environ.items() if k != "OCOMP_ISA"}
    env.update(
        LD_PRELOAD=":".join(preload),
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=23",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=24",
        OCOMP_RUNTIME_LIBRARY=str(library),
        OPENBLAS_NUM_THREADS="1",
    )
    return build, env


def run_sanitized(script: str, build: Path, env: dict) -> subprocess.CompletedProcess:
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path.
    proc = subprocess.run([sys.executable, "-c", script, str(TESTS)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=build)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    for marker in SANITIZER_MARKERS:
        assert marker not in output, output[-6000:]
    return proc


def test_sanitized_library(sanitized):
    build, env = sanitized
    proc = run_sanitized(SUBSET, build, env)
    assert "ASAN-SUBSET-OK" in proc.stdout


@pytest.mark.parametrize("isa", W2A8_PATHS)
def test_sanitized_w2a8_path(sanitized, isa):
    """The W2A8 kernels of one path (forced with OCOMP_ISA) under ASan + UBSan, exact against the reference."""
    build, env = sanitized
    proc = run_sanitized(W2A8_SUBSET, build, dict(env, OCOMP_ISA=isa))
    if "W2A8-SKIP" in proc.stdout:
        reason = proc.stdout.split("W2A8-SKIP", 1)[1].strip()
        assert "does not support" in reason or "not a path of this build" in reason, reason
        pytest.skip(f"OCOMP_ISA={isa}: {reason}")
    assert f"W2A8-ASAN-OK {isa} " in proc.stdout, proc.stdout[-3000:]
