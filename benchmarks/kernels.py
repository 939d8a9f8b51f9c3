"""Side-by-side kernel timings: ocomp TernaryConv vs onnxruntime float Conv vs int8 QLinearConv.

One-layer models on ResNet-18 layer shapes (50% zero ternary weights), plus a
TernaryGemm 512x1000 classifier head vs float Gemm. Runs are interleaved in one
process and use one global ORT thread pool; the pool size is per process, so
each thread count runs in its own subprocess. Prints medians (ms) and ratios.

    python benchmarks/kernels.py            # full run (1 and 2 threads)
    python benchmarks/kernels.py --quick    # a short run
    python benchmarks/kernels.py --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (name, C, K, H=W, kernel, stride, pad)
CONV_SHAPES = [
    ("3x3 64->64 56", 64, 64, 56, 3, 1, 1),
    ("3x3 128->128 28", 128, 128, 28, 3, 1, 1),
    ("3x3 256->256 14", 256, 256, 14, 3, 1, 1),
    ("3x3 512->512 7", 512, 512, 7, 3, 1, 1),
    ("3x3/2 64->128 56", 64, 128, 56, 3, 2, 1),
    ("3x3/2 128->256 28", 128, 256, 28, 3, 2, 1),
    ("3x3/2 256->512 14", 256, 512, 14, 3, 2, 1),
    ("1x1/2 64->128 56", 64, 128, 56, 1, 2, 0),
    ("1x1/2 128->256 28", 128, 256, 28, 1, 2, 0),
    ("1x1/2 256->512 14", 256, 512, 14, 1, 2, 0),
]
# (name, M, Kin, N)
GEMM_SHAPES = [("head 512->1000 M=1", 1, 512, 1000), ("head 512->1000 M=64", 64, 512, 1000)]
ZERO_FRACTION = 0.5


def _import_ocomp():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        import ocomp.runtime as rt
        from ocomp.passes.ternary import pack_ternary
    except ImportError:  # a checkout without the package installed
        import runtime as rt  # type: ignore[no-redef]
        from passes.ternary import pack_ternary  # type: ignore[no-redef]
    return rt, pack_ternary


def _build_models(out: Path) -> list[dict]:
    """Writes every model and input to `out` (quantize_static runs sessions of its
    own, so this happens in the parent, before any global thread pool exists)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static warns about pre-processing

    _, pack_ternary = _import_ocomp()
    rng = np.random.default_rng(0)

    def make_model(nodes, inits, opsets):
        graph = helper.make_graph(
            nodes, "bench",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
            inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])

    def ternary_weights(shape):
        t = rng.choice([-1, 1], size=shape).astype(np.int8)
        t[rng.random(shape) < ZERO_FRACTION] = 0
        return t

    cases = []
    for i, (name, c, k, hw, ks, stride, pad) in enumerate(CONV_SHAPES):
        t = ternary_weights((k, c, ks, ks))
        alpha = rng.uniform(0.01, 0.05, k).astype(np.float32)
        bias = rng.normal(0, 0.1, k).astype(np.float32)
        x = rng.normal(size=(1, c, hw, hw)).astype(np.float32)
        attrs = dict(strides=[stride, stride], pads=[pad] * 4)
        tern = make_model(
            [helper.make_node("TernaryConv", ["X", "P", "A", "B"], ["Y"], domain="ocomp",
                              weight_shape=list(t.shape), kernel_shape=[ks, ks], **attrs)],
            [numpy_helper.from_array(pack_ternary(t), "P"), numpy_helper.from_array(alpha, "A"),
             numpy_helper.from_array(bias, "B")],
            [("", 17), ("ocomp", 1)],
        )
        w = (alpha[:, None, None, None] * t).astype(np.float32)
        flt = make_model(
            [helper.make_node("Conv", ["X", "W", "B"], ["Y"], kernel_shape=[ks, ks], **attrs)],
            [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "B")],
            [("", 17)],
        )
        paths = {key: str(out / f"{key}{i}.onnx") for key in ("ternary", "float", "int8")}
        onnx.save(tern, paths["ternary"])
        onnx.save(flt, paths["float"])

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter([{"X": rng.normal(size=x.shape).astype(np.float32)} for _ in range(4)])

            def get_next(self):
                return next(self.batches, None)

        quantize_static(paths["float"], paths["int8"], Reader(), quant_format=QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
        ops = {n.op_type for n in onnx.load(paths["int8"]).graph.node}
        assert "QLinearConv" in ops, f"quantize_static gave {ops}"
        np.save(out / f"x{i}.npy", x)
        cases.append({"kind": "conv", "name": name, "models": paths, "input": str(out / f"x{i}.npy")})

    for i, (name, m, kin, n) in enumerate(GEMM_SHAPES, start=len(CONV_SHAPES)):
        t = ternary_weights((n, kin))
        alpha = rng.uniform(0.01, 0.05, n).astype(np.float32)
        bias = rng.normal(0, 0.1, n).astype(np.float32)
        tern = make_model(
            [helper.make_node("TernaryGemm", ["X", "P", "A", "B"], ["Y"], domain="ocomp", weight_shape=[n, kin])],
            [numpy_helper.from_array(pack_ternary(t), "P"), numpy_helper.from_array(alpha, "A"),
             numpy_helper.from_array(bias, "B")],
            [("", 17), ("ocomp", 1)],
        )
        w = (alpha[:, None] * t).astype(np.float32)
        flt = make_model(
            [helper.make_node("Gemm", ["X", "W", "B"], ["Y"], transB=1)],
            [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "B")],
            [("", 17)],
        )
        paths = {key: str(out / f"{key}{i}.onnx") for key in ("ternary", "float")}
        onnx.save(tern, paths["ternary"])
        onnx.save(flt, paths["float"])
        np.save(out / f"x{i}.npy", rng.normal(size=(m, kin)).astype(np.float32))
        cases.append({"kind": "gemm", "name": name, "models": paths, "input": str(out / f"x{i}.npy")})
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
        return so

    cases = []
    for case in json.loads(manifest.read_text()):
        sessions = {}
        for key, path in case["models"].items():
            if key == "ternary":
                sessions[key] = rt.session(path, sess_options=options())
            else:
                sessions[key] = ort.InferenceSession(path, options(), providers=["CPUExecutionProvider"])
        cases.append((case["kind"], case["name"], sessions, {"X": np.load(case["input"])}))

    # Check agreement once, warm up, then interleave the variants run by run.
    for _, name, sessions, feed in cases:
        y_t = sessions["ternary"].run(None, feed)[0]
        y_f = sessions["float"].run(None, feed)[0]
        err = float(np.abs(y_t - y_f).max() / max(1.0, float(np.abs(y_f).max())))
        assert err < 1e-4, f"{name}: ternary and float disagree ({err:.2e})"
    reps = 7 if quick else 31
    min_seconds = 0.002 if quick else 0.01  # each sample repeats runs to at least this long
    rows = []
    for kind, name, sessions, feed in cases:
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
        rows.append({"kind": kind, "name": name, "threads": threads, "ms": medians})
    return {"threads": threads, "isa": os.environ.get("OCOMP_KERNEL_ISA", "auto"), "rows": rows}


def _print_table(results: list[dict]) -> None:
    print()
    print("median ms per run; ratio = ternary / other (< 1.0 means ternary is faster)")
    header = f"{'layer':<22} {'thr':>3} {'ternary':>9} {'float':>9} {'int8':>9} {'t/float':>8} {'t/int8':>8}"
    print(header)
    print("-" * len(header))
    for result in results:
        for row in result["rows"]:
            ms = row["ms"]
            int8 = ms.get("int8")
            int8_ms = f"{int8:.3f}" if int8 else "-"
            int8_ratio = f"{ms['ternary'] / int8:.2f}" if int8 else "-"
            print(
                f"{row['name']:<22} {row['threads']:>3} {ms['ternary']:>9.3f} {ms['float']:>9.3f} "
                f"{int8_ms:>9} {ms['ternary'] / ms['float']:>8.2f} {int8_ratio:>8}"
            )
        conv = [r["ms"]["ternary"] / r["ms"]["float"] for r in result["rows"] if r["kind"] == "conv"]
        if conv:
            import statistics

            print(f"{'geomean conv t/float':<22} {result['threads']:>3} {statistics.geometric_mean(conv):>48.2f}")
        print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2], help="thread counts (default 1 2)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print("OCOMP-RESULT " + json.dumps(_child(args.threads[0], args.quick, args.manifest)))
        return 0

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
        line = next(l for l in proc.stdout.splitlines() if l.startswith("OCOMP-RESULT "))
        results.append(json.loads(line[len("OCOMP-RESULT "):]))
    _print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
