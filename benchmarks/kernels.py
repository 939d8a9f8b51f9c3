"""Side-by-side kernel timings (issue #13): W2A8 TernaryConv/TernaryGemm vs onnxruntime int8 (QLinearConv /
QGemm, U8S8, per-channel weights) vs onnxruntime fp32 Conv/Gemm, one layer a model, same shapes and weights.

Layers: ResNet-20 (28x28 Fashion-MNIST input) and ResNet-18 3x3 layers, 1x1 layers (strided shortcuts and 1x1
at 7x7 with >= 512 channels), depthwise 3x3, classifier heads at M=1. Ternary weights with 50% zeros;
the fp32 and int8 models use the same weights (alpha * T). Inputs are ReLU outputs (non-negative); the W2A8 op
gets act_scale = max / 255 of calibration inputs drawn like them (zero point 0), quantize_static the same
inputs (MinMax). Every variant takes float input and gives float output (the int8 models include their
QuantizeLinear / DequantizeLinear), so the times compare whole layers.

Runs are interleaved in one process with one global onnxruntime thread pool; the pool size is per process,
so each thread count runs in its own subprocess. Medians (ms) of repeated timed runs; ratios are taken
inside one run only. Prints a header (CPU model and flags, the W2A8 path `ocomp.runtime.w2a8_path()`,
onnxruntime version), the table and geomeans.

    python benchmarks/kernels.py                 # full run (1 and 2 threads)
    python benchmarks/kernels.py --quick         # fewer repetitions
    python benchmarks/kernels.py --threads 1 --json out.json --markdown benchmarks/KERNELS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (name, group, C, K, H=W, kernel, stride, pad, weight_bound)
CONV_SHAPES = [
    ("r20 3x3 16->16 28", "resnet20 3x3", 16, 16, 28, 3, 1, 1, False),
    ("r20 3x3 32->32 14", "resnet20 3x3", 32, 32, 14, 3, 1, 1, False),
    ("r20 3x3 64->64 7", "resnet20 3x3", 64, 64, 7, 3, 1, 1, False),
    ("r20 3x3/2 16->32 28", "resnet20 3x3", 16, 32, 28, 3, 2, 1, False),
    ("r20 3x3/2 32->64 14", "resnet20 3x3", 32, 64, 14, 3, 2, 1, False),
    ("r18 3x3 64->64 56", "resnet18 3x3", 64, 64, 56, 3, 1, 1, False),
    ("r18 3x3 128->128 28", "resnet18 3x3", 128, 128, 28, 3, 1, 1, False),
    ("r18 3x3 256->256 14", "resnet18 3x3", 256, 256, 14, 3, 1, 1, False),
    ("r18 3x3 512->512 7", "resnet18 3x3", 512, 512, 7, 3, 1, 1, False),
    ("r18 3x3/2 64->128 56", "resnet18 3x3", 64, 128, 56, 3, 2, 1, False),
    ("r18 3x3/2 128->256 28", "resnet18 3x3", 128, 256, 28, 3, 2, 1, False),
    ("r18 3x3/2 256->512 14", "resnet18 3x3", 256, 512, 14, 3, 2, 1, False),
    ("1x1/2 64->128 56", "1x1", 64, 128, 56, 1, 2, 0, False),
    ("1x1/2 128->256 28", "1x1", 128, 256, 28, 1, 2, 0, False),
    ("1x1/2 256->512 14", "1x1", 256, 512, 14, 1, 2, 0, False),
    ("1x1 256->1024 14", "1x1", 256, 1024, 14, 1, 1, 0, False),
    ("1x1 512->512 7", "1x1", 512, 512, 7, 1, 1, 0, True),
    ("1x1 512->2048 7", "1x1", 512, 2048, 7, 1, 1, 0, True),
    ("1x1 2048->512 7", "1x1", 2048, 512, 7, 1, 1, 0, True),
    ("dw 3x3 32 112", "depthwise", 1, 32, 112, 3, 1, 1, False),
    ("dw 3x3 144 56", "depthwise", 1, 144, 56, 3, 1, 1, False),
    ("dw 3x3/2 144 56", "depthwise", 1, 144, 56, 3, 2, 1, False),
    ("dw 3x3 576 14", "depthwise", 1, 576, 14, 3, 1, 1, False),
]
# (name, M, Kin, N): classifier heads at batch 1 (weight-bound)
GEMM_SHAPES = [
    ("head 512->1000 M=1", 1, 512, 1000),
    ("head 1280->1000 M=1", 1, 1280, 1000),
    ("head 2048->1000 M=1", 1, 2048, 1000),
]
ZERO_FRACTION = 0.5
VARIANTS = ("w2a8", "int8", "fp32")


def _import_ocomp():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import ocomp.runtime as rt
    from ocomp.codec import pack_ternary

    return rt, pack_ternary


def cpu_header() -> list[str]:
    """CPU model, the SIMD flags that matter here, the W2A8 path, versions."""
    import onnxruntime

    rt, _ = _import_ocomp()
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith(("flags", "Features")):
                flags |= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = [f for f in ("sse4_1", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                          "avx_vnni", "amx_int8", "asimd", "asimddp", "i8mm", "sve") if f in flags]
    try:
        path = rt.w2a8_path()
    except Exception as exc:  # noqa: BLE001 - reported, not fatal for the header
        path = f"unavailable ({exc})"
    return [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"cpu: {model}, {os.cpu_count()} logical cores; flags: {' '.join(wanted)}",
            f"ocomp W2A8 path: {path} (OCOMP_ISA={os.environ.get('OCOMP_ISA', 'unset')}); "
            f"onnxruntime {onnxruntime.__version__}; python {platform.python_version()}"]


def _build_models(out: Path) -> list[dict]:
    """Writes every model and input to `out` (quantize_static runs sessions of its own, so this happens in the
    parent, before any global thread pool exists)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static warns about pre-processing
    _, pack_ternary = _import_ocomp()
    rng = np.random.default_rng(0)

    def make_model(nodes, inits, opsets):
        graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
        model.ir_version = 8
        return model

    def ternary_weights(shape):
        t = rng.choice([-1, 1], size=shape).astype(np.int8)
        t[rng.random(shape) < ZERO_FRACTION] = 0
        return t

    def relu_input(shape):
        return np.maximum(rng.normal(size=shape), 0).astype(np.float32)

    def int8_model(src: str, dst: str, shape) -> None:
        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter([{"X": relu_input(shape)} for _ in range(4)])

            def get_next(self):
                return next(self.batches, None)

        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True)

    def act_scale(shape) -> float:
        return float(np.float32(max(float(relu_input(shape).max()) for _ in range(4)) / 255))

    cases = []
    for i, (name, group, c, k, hw, ks, stride, pad, weight_bound) in enumerate(CONV_SHAPES):
        groups = k if group == "depthwise" else 1
        cin = groups * c
        t = ternary_weights((k, c, ks, ks))
        alpha = rng.uniform(0.01, 0.05, k).astype(np.float32)
        bias = rng.normal(0, 0.1, k).astype(np.float32)
        shape = (1, cin, hw, hw)
        attrs = dict(strides=[stride, stride], pads=[pad] * 4, group=groups)
        tern = make_model(
            [helper.make_node("TernaryConv", ["X", "P", "A", "B"], ["Y"], domain="ocomp", weight_shape=list(t.shape),
                              kernel_shape=[ks, ks], act_scale=act_scale(shape), act_zero_point=0, **attrs)],
            [numpy_helper.from_array(pack_ternary(t), "P"), numpy_helper.from_array(alpha, "A"),
             numpy_helper.from_array(bias, "B")],
            [("", 17), ("ocomp", 1)])
        w = (alpha[:, None, None, None] * t).astype(np.float32)
        flt = make_model([helper.make_node("Conv", ["X", "W", "B"], ["Y"], kernel_shape=[ks, ks], **attrs)],
                         [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "B")], [("", 17)])
        paths = {key: str(out / f"{key}{i}.onnx") for key in VARIANTS}
        onnx.save(tern, paths["w2a8"])
        onnx.save(flt, paths["fp32"])
        int8_model(paths["fp32"], paths["int8"], shape)
        ops = {n.op_type for n in onnx.load(paths["int8"]).graph.node}
        assert "QLinearConv" in ops, f"quantize_static gave {ops}"
        np.save(out / f"x{i}.npy", relu_input(shape))
        cases.append({"kind": "conv", "group": group, "weight_bound": weight_bound, "name": name, "models": paths,
                      "input": str(out / f"x{i}.npy"), "macs": k * c * ks * ks * (hw // stride) ** 2})

    for i, (name, m, kin, n) in enumerate(GEMM_SHAPES, start=len(CONV_SHAPES)):
        t = ternary_weights((n, kin))
        alpha = rng.uniform(0.01, 0.05, n).astype(np.float32)
        bias = rng.normal(0, 0.1, n).astype(np.float32)
        tern = make_model(
            [helper.make_node("TernaryGemm", ["X", "P", "A", "B"], ["Y"], domain="ocomp", weight_shape=[n, kin],
                              act_scale=act_scale((m, kin)), act_zero_point=0)],
            [numpy_helper.from_array(pack_ternary(t), "P"), numpy_helper.from_array(alpha, "A"),
             numpy_helper.from_array(bias, "B")],
            [("", 17), ("ocomp", 1)])
        w = (alpha[:, None] * t).astype(np.float32)
        flt = make_model([helper.make_node("Gemm", ["X", "W", "B"], ["Y"], transB=1)],
                         [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "B")], [("", 17)])
        paths = {key: str(out / f"{key}{i}.onnx") for key in VARIANTS}
        onnx.save(tern, paths["w2a8"])
        onnx.save(flt, paths["fp32"])
        int8_model(paths["fp32"], paths["int8"], (m, kin))
        ops = {n.op_type for n in onnx.load(paths["int8"]).graph.node}
        assert ops & {"QGemm", "MatMulInteger", "QLinearMatMul"}, f"quantize_static gave {ops}"
        np.save(out / f"x{i}.npy", relu_input((m, kin)))
        cases.append({"kind": "gemm", "group": "gemm M=1", "weight_bound": True, "name": name, "models": paths,
                      "input": str(out / f"x{i}.npy"), "macs": m * kin * n})
    return cases


def _child(threads: int, quick: bool, manifest: Path) -> dict:
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state

    rt, _ = _import_ocomp()
    _pybind_state.set_global_thread_pool_sizes(threads, 1)

    def options():
        so = ort.SessionOptions()
        so.use_per_session_threads = False
        so.log_severity_level = 3
        return so

    cases = []
    for case in json.loads(manifest.read_text()):
        sessions = {}
        for key, path in case["models"].items():
            if key == "w2a8":
                sessions[key] = rt.session(path, sess_options=options())
            else:
                sessions[key] = ort.InferenceSession(path, options(), providers=["CPUExecutionProvider"])
        cases.append((case, sessions, {"X": np.load(case["input"])}))

    # Check agreement once (all three compute the same layer, two of them with 8-bit activations).
    for case, sessions, feed in cases:
        y = {key: sess.run(None, feed)[0] for key, sess in sessions.items()}
        scale = max(1e-6, float(np.abs(y["fp32"]).max()))
        for key, bound in (("w2a8", 0.05), ("int8", 0.3)):  # (int8 also quantizes its output to 8 bits)
            err = float(np.abs(y[key] - y["fp32"]).max() / scale)
            assert err < bound, f"{case['name']}: {key} and fp32 disagree (max error {err:.2e} of the output range)"
    reps = 7 if quick else 25
    min_seconds = 0.002 if quick else 0.01  # each sample repeats runs to at least this long
    rows = []
    for case, sessions, feed in cases:
        inner = {}
        for key, sess in sessions.items():
            for _ in range(3):
                sess.run(None, feed)
            t0 = time.perf_counter()
            sess.run(None, feed)
            inner[key] = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-6)))
        samples = {key: [] for key in sessions}
        for _ in range(reps):
            for key, sess in sessions.items():
                t0 = time.perf_counter()
                for _ in range(inner[key]):
                    sess.run(None, feed)
                samples[key].append((time.perf_counter() - t0) / inner[key] * 1e3)
        medians = {key: float(np.median(v)) for key, v in samples.items()}
        rows.append({**{k: case[k] for k in ("kind", "group", "weight_bound", "name", "macs")}, "threads": threads,
                     "ms": medians})
    return {"threads": threads, "rows": rows}


def geomeans(rows: list[dict]) -> list[tuple[str, float, float, int]]:
    """(label, geomean w2a8/int8, geomean w2a8/fp32, layers) for the groups the issue's targets name."""
    def gm(selected, other):
        return statistics.geometric_mean([r["ms"]["w2a8"] / r["ms"][other] for r in selected])

    groups = [("conv layers (3x3, 1x1, depthwise)", [r for r in rows if r["kind"] == "conv"])]
    for name in dict.fromkeys(r["group"] for r in rows):
        groups.append((name, [r for r in rows if r["group"] == name]))
    groups.append(("weight-bound (Gemm M=1, 1x1 at 7x7 >= 512 ch)", [r for r in rows if r["weight_bound"]]))
    groups.append(("all layers", rows))
    return [(label, gm(sel, "int8"), gm(sel, "fp32"), len(sel)) for label, sel in groups if sel]


def render(results: list[dict], header: list[str], command: str) -> str:
    lines = [*header, f"command: {command}", "",
             "median ms per run; ratio = W2A8 / other (< 1.0: W2A8 faster); GMAC/s of the W2A8 op", ""]
    head = (f"{'layer':<24} {'thr':>3} {'w2a8':>8} {'int8':>8} {'fp32':>8} {'w/int8':>7} {'w/fp32':>7} "
            f"{'GMAC/s':>7}")
    for result in results:
        lines += [head, "-" * len(head)]
        for row in result["rows"]:
            ms = row["ms"]
            lines.append(f"{row['name']:<24} {row['threads']:>3} {ms['w2a8']:>8.3f} {ms['int8']:>8.3f} "
                         f"{ms['fp32']:>8.3f} {ms['w2a8'] / ms['int8']:>7.2f} {ms['w2a8'] / ms['fp32']:>7.2f} "
                         f"{row['macs'] / ms['w2a8'] / 1e6:>7.1f}")
        lines.append("")
        lines.append(f"geomeans, {result['threads']} thread(s): {'w/int8':>7} {'w/fp32':>7}  layers")
        for label, vs_int8, vs_fp32, count in geomeans(result["rows"]):
            lines.append(f"  {label:<46} {vs_int8:>7.2f} {vs_fp32:>7.2f}  {count}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2], help="thread counts (default 1 2)")
    parser.add_argument("--only", default=None, help="comma-separated substrings: only layers whose name has one")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--markdown", type=Path, help="also write the output to this file (a fenced block)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print("OCOMP-RESULT " + json.dumps(_child(args.threads[0], args.quick, args.manifest)))
        return 0

    if args.only:
        keep = [s.strip() for s in args.only.split(",") if s.strip()]
        CONV_SHAPES[:] = [s for s in CONV_SHAPES if any(k in s[0] for k in keep)]
        GEMM_SHAPES[:] = [s for s in GEMM_SHAPES if any(k in s[0] for k in keep)]
    header = cpu_header()
    tmp = tempfile.TemporaryDirectory(prefix="ocomp-bench-")
    manifest = Path(tmp.name) / "cases.json"
    manifest.write_text(json.dumps(_build_models(Path(tmp.name))))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    results = []
    for threads in args.threads:
        cmd = [sys.executable, __file__, "--child", "--manifest", str(manifest), "--threads", str(threads)]
        cmd += ["--quick"] if args.quick else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            return proc.returncode
        line = next(x for x in proc.stdout.splitlines() if x.startswith("OCOMP-RESULT "))
        results.append(json.loads(line[len("OCOMP-RESULT "):]))
    command = "python benchmarks/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(results, header, command.strip())
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.markdown:
        args.markdown.write_text("# Kernel benchmark: W2A8 ternary ops vs onnxruntime int8 and fp32\n\n"
                                 "Written by `benchmarks/kernels.py --markdown` (one run; ratios are only "
                                 "meaningful inside it).\n\n```\n" + text + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
