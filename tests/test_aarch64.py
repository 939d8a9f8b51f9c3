"""The W2A8 integer kernels on aarch64, under qemu: the runtime and the C++ deployment example
(examples/deploy) cross-compiled, run by qemu-aarch64 with the aarch64 onnxruntime library on one model that
holds every W2A8 case of tests/test_w2a8.py (3x3/1x1/strided/dilated/grouped/depthwise convs, Gemm and
MatMul, static and dynamic quantization, fused Relu), and the raw outputs compared byte for byte with the
x86 build's (which tests/test_w2a8.py proves equal to the scalar path and to a numpy integer reference).

Paths: OCOMP_ISA=scalar, neon and neon-dot on `-cpu max` (dotprod), the default choice on `-cpu cortex-a53`
(no dotprod: neon), and neon-dot refused there. Emulated time is not a measurement.

Needs: qemu-aarch64, aarch64-linux-gnu-g++, cmake, the aarch64 sysroot (/usr/aarch64-linux-gnu) and the
aarch64 libonnxruntime.so (the manylinux aarch64 wheel's onnxruntime/capi/libonnxruntime.so.1.x): in
$OCOMP_AARCH64_ORT_LIBRARY, or as $OCOMP_CACHE_DIR/aarch64/libonnxruntime.so.* (default ~/.cache/ocomp).
Builds go to $OCOMP_CACHE_DIR/aarch64/build-* (incremental). README, "Checking aarch64 under qemu", has the
commands. Skips with one line naming what is missing otherwise.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import ocomp.runtime as rt
import test_w2a8 as tw
from test_runtime import require_library, ternary

REPO = Path(__file__).resolve().parents[1]
SYSROOT = Path("/usr/aarch64-linux-gnu")


def cache_dir() -> Path:
    return Path(os.environ.get("OCOMP_CACHE_DIR") or Path.home() / ".cache" / "ocomp") / "aarch64"


def ort_library() -> Path | None:
    given = os.environ.get("OCOMP_AARCH64_ORT_LIBRARY")
    if given:
        return Path(given) if Path(given).is_file() else None
    found = sorted(glob.glob(str(cache_dir() / "libonnxruntime.so.*")))
    return Path(found[-1]) if found else None


def missing() -> str | None:
    for tool, what in (("qemu-aarch64", "qemu-aarch64 (apt-get install qemu-user)"),
                       ("aarch64-linux-gnu-g++", "aarch64-linux-gnu-g++ (apt-get install g++-aarch64-linux-gnu)"),
                       ("cmake", "cmake")):
        if shutil.which(tool) is None:
            return what
    if not (SYSROOT / "lib" / "ld-linux-aarch64.so.1").exists():
        return f"the aarch64 sysroot {SYSROOT} (apt-get install g++-aarch64-linux-gnu)"
    if ort_library() is None:
        return ("the aarch64 libonnxruntime.so ($OCOMP_AARCH64_ORT_LIBRARY or "
                f"{cache_dir()}/libonnxruntime.so.*; see README, Checking aarch64 under qemu)")
    return None


def cmake_build(source: Path, build: Path, *defines: str) -> None:
    toolchain = REPO / "runtime" / "cmake" / "toolchain-aarch64.cmake"
    if not (build / "CMakeCache.txt").exists():
        proc = subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                               f"-DCMAKE_TOOLCHAIN_FILE={toolchain}", *defines],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    proc = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def arm_build() -> tuple[Path, Path]:
    reason = missing()
    if reason:
        pytest.skip(f"aarch64 check needs {reason}")
    base = cache_dir()
    cmake_build(REPO / "runtime", base / "build-runtime")
    cmake_build(REPO / "examples" / "deploy", base / "build-deploy", f"-DORT_LIBRARY={ort_library()}")
    library = base / "build-runtime" / "libocomp_runtime.so"
    program = base / "build-deploy" / "ocomp_deploy"
    assert library.is_file() and program.is_file()
    return program, library


# ---------------------------------------------------------------- one model with every case


def cases() -> list[tuple[str, onnx.ModelProto, np.ndarray]]:
    """(name, one-node model, input) for every W2A8 case."""
    found = []
    for i, case in enumerate(tw.CONV_CASES):
        model, x, *_ = tw.conv_case(100 + i, case)
        found.append((f"conv{i}", model, x))
        model, x, *_ = tw.conv_case(200 + i, case, activation=dict(activation="Relu"))
        found.append((f"relu{i}", model, x))
    for i in (1, 5):
        model, x, *_ = tw.conv_case(300 + i, tw.CONV_CASES[i], dynamic=True)
        found.append((f"dynamic{i}", model, x))
    for m, kin, n in tw.GEMM_CASES:
        model, x = tw.gemm_model(m, kin, n)
        found.append((f"gemm_dynamic{m}", model, x))
        rng = np.random.default_rng(m + kin)
        t = ternary(rng, (n, kin))
        xs = rng.normal(size=(2, m, kin)).astype(np.float32)
        model = tw.ternary_node_model("TernaryMatMul", tw.pack_ternary(t), rng.uniform(0.01, 0.1, n),
                                      rng.normal(size=n), weight_shape=[n, kin], act_scale=0.02, act_zero_point=131,
                                      activation="Clip", clip_min=-0.25, clip_max=0.5)
        found.append((f"matmul{m}", model, xs))
    return found


def combined_model(parts: list[tuple[str, onnx.ModelProto, np.ndarray]]) -> tuple[onnx.ModelProto, np.ndarray]:
    """One model: input X is every case's input flattened end to end; each case slices and reshapes its part,
    runs its op, flattens the result; output Y concatenates them (Slice/Reshape/Concat move floats exactly)."""
    nodes, inits, outs = [], [], []
    offset = 0
    for name, model, x in parts:
        node = model.graph.node[0]
        size = x.size
        inits += [numpy_helper.from_array(np.array([offset], np.int64), f"{name}_lo"),
                  numpy_helper.from_array(np.array([offset + size], np.int64), f"{name}_hi"),
                  numpy_helper.from_array(np.array(x.shape, np.int64), f"{name}_shape")]
        nodes += [helper.make_node("Slice", ["X", f"{name}_lo", f"{name}_hi"], [f"{name}_flat"]),
                  helper.make_node("Reshape", [f"{name}_flat", f"{name}_shape"], [f"{name}_x"])]
        renamed = {"X": f"{name}_x", "Y": f"{name}_y"}
        for init in model.graph.initializer:
            copy = onnx.TensorProto()
            copy.CopyFrom(init)
            copy.name = renamed[init.name] = f"{name}_{init.name}"
            inits.append(copy)
        op = onnx.NodeProto()
        op.CopyFrom(node)
        op.name = name
        del op.input[:], op.output[:]
        op.input.extend(renamed[i] for i in node.input)
        op.output.append(renamed["Y"])
        nodes.append(op)
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), f"{name}_flatshape"))
        nodes.append(helper.make_node("Reshape", [f"{name}_y", f"{name}_flatshape"], [f"{name}_out"]))
        outs.append(f"{name}_out")
        offset += size
    nodes.append(helper.make_node("Concat", outs, ["Y"], axis=0))
    graph = helper.make_graph(nodes, "w2a8_cases", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT,
                                                                                  [offset])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ocomp", 1)])
    model.ir_version = 8
    flat = np.concatenate([x.reshape(-1) for _, _, x in parts]).astype(np.float32)
    return model, flat


@pytest.fixture(scope="module")
def case_files(tmp_path_factory, arm_build):
    require_library()
    folder = tmp_path_factory.mktemp("aarch64")
    model, x = combined_model(cases())
    path = folder / "cases.onnx"
    onnx.save(model, path)
    (folder / "in.raw").write_bytes(x.tobytes())
    expected = rt.session(model, intra_op_num_threads=1).run(None, {"X": x})[0]
    return path, folder / "in.raw", x.size, expected


CPUINFO = ("processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
           "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
           "CPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n")


def qemu_prefix() -> Path:
    """qemu-aarch64's -L prefix: the aarch64 sysroot's lib plus an aarch64 /proc/cpuinfo. qemu-user (7.2) shows
    the host's x86 /proc/cpuinfo to the guest, and onnxruntime's cpuinfo library crashes (SIGSEGV) parsing it;
    qemu opens a path under the prefix first when it exists there. (The kernels choose their path from
    HWCAP, which qemu sets from -cpu, not from this file.)"""
    root = cache_dir() / "qemu-root"
    (root / "proc").mkdir(parents=True, exist_ok=True)
    if not (root / "lib").exists():
        (root / "lib").symlink_to(SYSROOT / "lib")
    (root / "proc" / "cpuinfo").write_text("".join(CPUINFO.format(i=i) for i in range(2)))
    return root


def run_arm(arm_build, case_files, cpu: str, isa: str | None, out: Path, threads: int = 1):
    program, library = arm_build
    path, raw, size, _ = case_files
    env = {k: v for k, v in os.environ.items() if k != "OCOMP_ISA"}
    if isa is not None:
        env["OCOMP_ISA"] = isa
    return subprocess.run(["qemu-aarch64", "-cpu", cpu, "-L", str(qemu_prefix()), str(program), str(path), str(library),
                           str(raw), str(size), str(out), str(threads)], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("cpu,isa,threads", [("max", "scalar", 1), ("max", "neon", 1), ("max", "neon-dot", 2),
                                             ("cortex-a53", None, 1)])
def test_arm_outputs_equal_x86(arm_build, case_files, tmp_path, cpu, isa, threads):
    out = tmp_path / "out.raw"
    proc = run_arm(arm_build, case_files, cpu, isa, out, threads)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = case_files[3]
    got = np.frombuffer(out.read_bytes(), np.float32)
    assert got.shape == expected.shape
    assert np.isfinite(expected).all()
    mismatch = np.flatnonzero(got.view(np.uint32) != expected.view(np.uint32))
    assert mismatch.size == 0, f"{mismatch.size} of {got.size} outputs differ (first at {mismatch[:5]})"


def test_arm_dot_path_refused_without_dotprod(arm_build, case_files, tmp_path):
    """cortex-a53 has no dotprod: forcing neon-dot is an error naming the reason, not a crash."""
    proc = run_arm(arm_build, case_files, "cortex-a53", "neon-dot", tmp_path / "out.raw")
    assert proc.returncode == 1
    assert "neon-dot" in proc.stderr and "does not support" in proc.stderr, proc.stderr[-2000:]
