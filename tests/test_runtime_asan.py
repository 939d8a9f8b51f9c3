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


def test_sanitized_library(tmp_path):
    build = tmp_path / "build"
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
    env = dict(
        os.environ,
        LD_PRELOAD=":".join(preload),
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=23",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=24",
        OCOMP_RUNTIME_LIBRARY=str(library),
        OPENBLAS_NUM_THREADS="1",
    )
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path.
    proc = subprocess.run([sys.executable, "-c", SUBSET, str(TESTS)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=build)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "ASAN-SUBSET-OK" in proc.stdout
    for marker in ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer"):
        assert marker not in output, output[-6000:]
