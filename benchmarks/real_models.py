"""Real-model benchmark (issue #6): ocomp configurations vs the fp32 original and onnxruntime int8.

For each reference model in ../shared/reference, one row per configuration, all measured in one run:
accuracy (labelled data) or fidelity (agreement + SNR against the original, unlabelled models), params,
MACs, file size, median batch-1 latency with 1 and 2 threads (interleaved across configurations, one
global onnxruntime thread pool per subprocess) and compile time. Writes RESULTS.md and results.json.

    python benchmarks/real_models.py                     # full run (~10 min on 2 cores)
    python benchmarks/real_models.py --quick --out /tmp/b  # resnet20 only, 200 images, 1 thread
    python benchmarks/real_models.py --models resnet20 --limit 2000

Model files are written to --workdir (default: a temporary directory), never into the repository.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared" / "reference"

# (label, kind, passes, options); kind "orig" | "int8" | "ocomp"
BASE_CONFIGS = [
    ("original fp32", "orig", None, None),
    ("ORT int8 (QDQ, per-channel)", "int8", None, None),
    ("prune 0.3", "ocomp", "prune", {"prune": {"ratio": 0.3}}),
    ("prune 0.3 + bnrecal", "ocomp", "prune,bnrecal,foldbn", {"prune": {"ratio": 0.3}}),
    ("prune 0.5", "ocomp", "prune", {"prune": {"ratio": 0.5}}),
    ("prune 0.5 + bnrecal", "ocomp", "prune,bnrecal,foldbn", {"prune": {"ratio": 0.5}}),
    ("ternary", "ocomp", "ternary", {}),
    ("ternary + bnrecal", "ocomp", "ternary,bnrecal,foldbn", {}),
    ("prune 0.3 + ternary", "ocomp", "prune,ternary", {"prune": {"ratio": 0.3}}),
    ("prune 0.3 + ternary + bnrecal", "ocomp", "prune,ternary,bnrecal,foldbn", {"prune": {"ratio": 0.3}}),
    ("prune 0.3 (bn criterion) + bnrecal", "ocomp", "prune,bnrecal,foldbn",
     {"prune": {"ratio": 0.3, "criterion": "bn"}}),
]
QUICK_LABELS = ["original fp32", "ORT int8 (QDQ, per-channel)", "prune 0.3", "prune 0.3 + bnrecal", "ternary",
                "ternary + bnrecal", "prune 0.3 + ternary"]
# Larger / unlabelled models: fewer configurations to stay within the time budget.
SMALL_LABELS = ["original fp32", "ORT int8 (QDQ, per-channel)", "prune 0.3", "prune 0.3 + bnrecal", "ternary",
                "ternary + bnrecal", "prune 0.3 + ternary + bnrecal"]

MODELS = {
    "resnet20": dict(file="resnet20_fashion_mnist.onnx", kind="labelled", input_shapes=None, configs=None),
    "ppocr_cls": dict(file="ppocr_mobile_v2_cls.onnx", kind="labelled", input_shapes={"x": ["N", 3, 48, 192]},
                      configs=None),
    "pplcnet": dict(file="pplcnet_text_orientation.onnx", kind="fidelity", input_shapes=None, configs=SMALL_LABELS),
    "blazeface": dict(file="blazeface_front_128.onnx", kind="fidelity", input_shapes=None, configs=SMALL_LABELS),
}


# ---------------------------------------------------------------- data


def _fashion_images(images: np.ndarray, size: int, nhwc: bool) -> np.ndarray:
    """Fashion-MNIST uint8 (N,1,28,28) -> float32 [0,1] resized to size x size, 3 channels, model layout."""
    from PIL import Image

    out = np.empty((len(images), size, size), np.float32)
    for i, img in enumerate(images[:, 0]):
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), np.float32) / 255.0
    out = np.repeat(out[:, None], 3, axis=1)
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1)) if nhwc else out


def load_data(name: str, shared: Path, limit: int | None, quick: bool) -> dict:
    """{'calib': array, 'eval': array, 'labels': array|None, 'input': name, 'batch': int, 'note': str}."""
    if name == "resnet20":
        test = np.load(shared / "fashion_mnist_test.npz")
        calib = np.load(shared / "fashion_mnist_calib.npz")
        n = 200 if quick else (limit or len(test["labels"]))
        ncal = 128 if quick else 512
        return dict(input="input", calib=calib["images"][:ncal].astype(np.float32) / 255,
                    eval=test["images"][:n].astype(np.float32) / 255, labels=test["labels"][:n], batch=100,
                    note=f"top-1 accuracy on the first {n} Fashion-MNIST test images; calibration: the first "
                         f"{ncal} images of fashion_mnist_calib.npz")
    if name == "ppocr_cls":
        data = np.load(shared / "text_direction_lines.npz")
        x, y = data["x"].astype(np.float32), data["labels"]
        n = min(800, limit or 800)
        return dict(input="x", calib=x[:200], eval=x[200:200 + n], labels=y[200:200 + n], batch=50,
                    note=f"top-1 accuracy on text_direction_lines.npz samples 200..{200 + n - 1}; calibration: "
                         "the first 200")
    size, nhwc, inp, batch = (224, False, "x", 25) if name == "pplcnet" else (128, True, "input:0", 1)
    test = np.load(shared / "fashion_mnist_test.npz")["images"]
    calib = np.load(shared / "fashion_mnist_calib.npz")["images"]
    ncal, n = 128, min(200, limit or 200)
    return dict(input=inp, calib=_fashion_images(calib[:ncal], size, nhwc), eval=_fashion_images(test[:n], size, nhwc),
                labels=None, batch=batch,
                note=f"FIDELITY, not accuracy: top-1 agreement and SNR vs the original on the first {n} Fashion-MNIST "
                     f"test images resized to {size}x{size} (bilinear), replicated to 3 channels, [0,1], "
                     f"{'NHWC' if nhwc else 'NCHW'}; calibration: {ncal} images of fashion_mnist_calib.npz made "
                     "the same way")


def run_outputs(path: Path, data: dict, threads: int = 2) -> list[np.ndarray]:
    """All outputs of the model on data['eval'], concatenated over batches."""
    import ocomp.runtime as rt

    sess = rt.session(str(path), intra_op_num_threads=threads, log_severity_level=3)
    names = [o.name for o in sess.get_outputs()]
    parts: list[list[np.ndarray]] = []
    x, b = data["eval"], data["batch"]
    for start in range(0, len(x), b):
        parts.append(sess.run(names, {data["input"]: x[start:start + b]}))
    return [np.concatenate([p[i] for p in parts]) for i in range(len(names))]


def quality(name: str, outs: list[np.ndarray], ref: list[np.ndarray], data: dict) -> dict:
    if data["labels"] is not None:
        return {"top1": float(np.mean(outs[0].reshape(len(data["labels"]), -1).argmax(1) == data["labels"]))}
    if name == "blazeface":  # scores are outputs 0 and 1 (anchors x 1): agreement on the best-scoring anchor
        top_a = np.concatenate([ref[0], ref[1]], axis=1)[..., 0].argmax(1)
        top_b = np.concatenate([outs[0], outs[1]], axis=1)[..., 0].argmax(1)
    else:
        top_a, top_b = ref[0].argmax(-1), outs[0].argmax(-1)
    a = np.concatenate([r.astype(np.float64).reshape(len(r), -1) for r in ref], axis=1)
    b = np.concatenate([o.astype(np.float64).reshape(len(o), -1) for o in outs], axis=1)
    noise = float(np.sum((a - b) ** 2))
    snr = float(10 * np.log10(np.sum(a ** 2) / noise)) if noise > 0 else float("inf")
    return {"agreement": float(np.mean(top_a == top_b)), "snr_db": snr}


# ---------------------------------------------------------------- building


def build_int8(src: Path, dst: Path, data: dict) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            x, b = data["calib"], data["batch"]
            self.feeds = iter([{data["input"]: x[s:s + b]} for s in range(0, len(x), b)])

        def get_next(self):
            return next(self.feeds, None)

    import onnx
    from onnx import version_converter

    notes = []
    model = onnx.load(str(src))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:  # per-channel DequantizeLinear (axis) needs opset 13
        src = dst.with_name(dst.stem + ".opset13.onnx")
        onnx.save(version_converter.convert_version(model, 13), str(src))
        notes.append(f"converted from opset {opset} to 13 (per-channel QDQ needs it)")
    pre = dst.with_name(dst.stem + ".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre))
    except Exception as exc:  # noqa: BLE001 - e.g. symbolic shape inference asserting on a Shape/Concat chain
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        notes.append(f"quant_pre_process failed ({_error_text(exc)}); ran it with skip_symbolic_shape=True")
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return notes


def _error_text(exc: BaseException) -> str:
    """One line: the exception type and message, or where it was raised when the message is empty."""
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    if not text:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        text = f"raised in {Path(frame.filename).name}:{frame.lineno} {frame.name}()"
    return f"{type(exc).__name__}: {text}"


def build_ocomp(src: Path, dst: Path, passes: str, options: dict, calib_path: Path, input_shapes) -> None:
    from ocomp.api import compress

    compress(src, dst, passes, options, calib=calib_path if "bnrecal" in passes else None, input_shapes=input_shapes)


# ---------------------------------------------------------------- latency


def latency_worker(spec_path: str) -> None:
    """Subprocess: one global thread pool of `threads`, all configurations interleaved; prints JSON."""
    spec = json.loads(Path(spec_path).read_text())
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state

    import ocomp.runtime as rt

    _pybind_state.set_global_thread_pool_sizes(spec["threads"], 1)
    feed = {spec["input"]: np.load(spec["sample"])}
    sessions, errors = {}, {}
    for label, path in spec["models"].items():
        try:
            opts = rt.session_options(log_severity_level=3)
            opts.use_per_session_threads = False
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = rt.session(path, sess_options=opts)
            for _ in range(3):
                sess.run(None, feed)
            sessions[label] = sess
        except Exception as exc:  # noqa: BLE001 - recorded in the row
            errors[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    times: dict[str, list[float]] = {label: [] for label in sessions}
    order = list(sessions)
    rng = random.Random(0)
    for _ in range(spec["rounds"]):
        rng.shuffle(order)
        for label in order:
            sess = sessions[label]
            for _ in range(spec["reps"]):
                t0 = time.perf_counter()
                sess.run(None, feed)
                times[label].append(time.perf_counter() - t0)
    result = {label: {"median_ms": 1e3 * statistics.median(t)} for label, t in times.items()}
    result.update({label: {"error": e} for label, e in errors.items()})
    print(json.dumps(result))


def measure_latency(models: dict[str, str], sample: np.ndarray, input_name: str, threads: int, rounds: int,
                    reps: int, workdir: Path) -> dict:
    sample_path = workdir / "latency_sample.npy"
    np.save(sample_path, sample)
    spec_path = workdir / f"latency_spec_{threads}.json"
    spec_path.write_text(json.dumps(dict(models=models, sample=str(sample_path), input=input_name, threads=threads,
                                         rounds=rounds, reps=reps)))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, "--latency-worker", str(spec_path)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {label: {"error": f"latency subprocess failed: {err}"} for label in models}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the benchmark


def bench_model(name: str, shared: Path, workdir: Path, args, bar) -> dict:
    from ocomp.metrics import model_stats
    from ocomp.model import load_model, save_model

    meta = MODELS[name]
    data = load_data(name, shared, args.limit, args.quick)
    mdir = workdir / name
    mdir.mkdir(parents=True, exist_ok=True)
    original = mdir / "original.onnx"
    save_model(load_model(shared / meta["file"], meta["input_shapes"]), original)
    calib_path = mdir / "calib.npz"
    np.savez(calib_path, **{data["input"]: data["calib"]})
    labels = QUICK_LABELS if args.quick else (meta["configs"] or [c[0] for c in BASE_CONFIGS])
    configs = [c for c in BASE_CONFIGS if c[0] in labels]
    rows: list[dict] = []
    ref_outs = None
    orig_stats = model_stats(load_model(original, meta["input_shapes"]), original)
    for label, kind, passes, options in configs:
        bar.set_description(f"{name}: {label}")
        row: dict = {"config": label, "passes": passes, "options": options}
        path = mdir / (f"{len(rows):02d}_" + label.replace(" ", "_").replace("(", "").replace(")", "")
                       .replace(",", "").replace("+", "p").replace(".", "") + ".onnx")
        try:
            t0 = time.perf_counter()
            if kind == "orig":
                path = original
            elif kind == "int8":
                row["notes"] = build_int8(original, path, data)
            else:
                build_ocomp(original, path, passes, options, calib_path, meta["input_shapes"])
            row["compile_s"] = None if kind == "orig" else time.perf_counter() - t0
            if kind == "int8":  # weights hide behind DequantizeLinear; quantization changes neither count
                row.update(params=orig_stats.params, macs=orig_stats.macs)
            else:
                stats = model_stats(load_model(path, meta["input_shapes"]), path)
                row.update(params=stats.params, macs=stats.macs)
            row["file_bytes"] = path.stat().st_size
            row["path"] = str(path)
            outs = run_outputs(path, data)
            if kind == "orig":
                ref_outs = outs
            row.update(quality(name, outs, ref_outs, data))
        except Exception as exc:  # noqa: BLE001 - a failing configuration is a result, not a crash
            row["error"] = _error_text(exc)
            if args.verbose:
                traceback.print_exc()
        rows.append(row)
        bar.update(1)
    # ONNX shape inference stops at ocomp custom ops, so model_stats may see no output shapes (0 MACs) for the
    # layers after a TernaryConv. Ternarization keeps every multiply-accumulate (now add-only), so a ternary
    # row's MACs are those of the same configuration without ternary (bnrecal/foldbn do not change them).
    by_key = {(tuple(p for p in (r["passes"] or "").split(",") if p), json.dumps(r["options"], sort_keys=True)): r
              for r in rows}
    for row in rows:
        if "error" in row or "ternary" not in (row["passes"] or ""):
            continue
        base_passes = tuple(p for p in row["passes"].split(",") if p not in ("ternary", "bnrecal", "foldbn"))
        twin = rows[0] if not base_passes else by_key.get((base_passes, json.dumps(row["options"], sort_keys=True)))
        if twin is not None and "error" not in twin and twin.get("macs") is not None:
            row["macs_counted_by_model_stats"] = row["macs"]
            row["macs"] = twin["macs"]
            row["macs_from"] = twin["config"]
    ok = {r["config"]: r["path"] for r in rows if "path" in r and "error" not in r}
    sample = data["eval"][:1]
    for threads in args.threads:
        bar.set_description(f"{name}: latency {threads} thread(s)")
        lat = measure_latency(ok, sample, data["input"], threads, args.rounds, args.reps, mdir)
        for row in rows:
            if row["config"] in lat:
                entry = lat[row["config"]]
                row[f"latency_ms_{threads}t"] = entry.get("median_ms")
                if "error" in entry:
                    row[f"latency_error_{threads}t"] = entry["error"]
        bar.update(1)
    base = rows[0]
    for row in rows:
        if "error" in row:
            continue
        row["file_ratio"] = base["file_bytes"] / row["file_bytes"]
        for threads in args.threads:
            key = f"latency_ms_{threads}t"
            if row.get(key) and base.get(key):
                row[f"latency_ratio_{threads}t"] = row[key] / base[key]
        row.pop("path", None)
    return {"model": name, "file": meta["file"], "metric_note": data["note"], "eval_samples": len(data["eval"]),
            "calib_samples": len(data["calib"]), "rows": rows}


def machine() -> dict:
    import onnx
    import onnxruntime

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc)
            .strftime("%Y-%m-%d %H:%M UTC")}


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def write_markdown(result: dict, path: Path) -> None:
    m, threads = result["machine"], result["threads"]
    lines = ["# ocomp real-model benchmark", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, "
             f"Python {m['python']}; {m['date']}.", "",
             f"Command: `{result['command']}` (total {result['seconds']:.0f} s)", "",
             "- Rows marked `+ bnrecal` run the passes `...,bnrecal,foldbn` (BatchNorm recalibration on the "
             "calibration set, then BN folded into the preceding layers); rows without it run only the listed "
             "passes and keep their BatchNormalization nodes, so part of a latency gap between the two rows is the "
             "BN fold, not the recalibration.",
             "- ORT int8: `quant_pre_process`, then `quantize_static` (QDQ, per-channel, MinMax) calibrated on the "
             "same calibration subset as bnrecal. Its params/MACs are the original's (quantization changes neither).",
             "- Prune ratios use the default l1 criterion unless the row says otherwise.",
             f"- Latency: median of {result['rounds']} interleaved rounds x {result['reps']} runs at batch 1, one "
             "global onnxruntime thread pool per thread count (a subprocess each), "
             "`use_per_session_threads = False`, OPENBLAS_NUM_THREADS=1. Ratios are to the original in the same "
             "subprocess (shared machine: absolute times drift 10-25%, ratios are what to compare).",
             "- Compile time: wall time of `ocomp.api.compress` (load, passes, save) or of quant_pre_process + "
             "quantize_static.",
             "- MACs of rows with `ternary`: ternarization keeps every multiply-accumulate (add-only now), so they are "
             "taken from the same configuration without ternary; ONNX shape inference stops at ocomp's custom ops, "
             "and `ocomp.metrics.model_stats` then counts 0 MACs for the layers after the first TernaryConv on some "
             "models (its own count is kept in results.json as `macs_counted_by_model_stats`).",
             "- To stay within the time budget, the unlabelled models (pplcnet, blazeface) run 7 configurations "
             "(no prune 0.5, no prune 0.3 + ternary without bnrecal, no bn-criterion row).",
             "- A configuration that fails shows its error in the row instead of numbers.", ""]
    for model in result["models"]:
        lines += [f"## {model['model']} (`{model['file']}`)", "", model["metric_note"] + ".", ""]
        fidelity = any("agreement" in r for r in model["rows"])
        qcols = ["agreement", "SNR dB"] if fidelity else ["top-1"]
        lat_cols = [c for t in threads for c in (f"{t}T ms", f"{t}T x")]
        header = ["config"] + qcols + ["params", "MACs", "file KB", "size x"] + lat_cols + ["compile s"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in model["rows"]:
            if "error" in r:
                lines.append(f"| {r['config']} | ERROR: {r['error'].replace('|', '/')} |" + " |" * (len(header) - 2))
                continue
            q = ([_fmt(r.get("agreement", 0) * 100, ".1f", "%"), _fmt(r.get("snr_db"), ".1f")] if fidelity
                 else [_fmt(r["top1"] * 100, ".2f", "%")])
            lat = []
            for t in threads:
                if r.get(f"latency_error_{t}t"):
                    lat += [f"ERROR: {r[f'latency_error_{t}t'].replace('|', '/')}", "—"]
                else:
                    lat += [_fmt(r.get(f"latency_ms_{t}t"), ".3f"), _fmt(r.get(f"latency_ratio_{t}t"), ".2f")]
            cells = [r["config"]] + q + [f"{r['params']:,}", f"{r['macs'] / 1e6:.2f}M", f"{r['file_bytes'] / 1024:.1f}",
                                         _fmt(r.get("file_ratio"), ".2f")] + lat + [_fmt(r.get("compile_s"), ".1f")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for r in model["rows"]:
            for note in r.get("notes") or []:
                lines.append(f"- {r['config']}: {note}")
        lines.append("")
    lines += ["`size x`: original file size / this file size (higher is smaller). `NT x`: latency / original "
              "latency with N threads (lower is faster).", ""]
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="resnet20 only, 200 test images, 5 latency rounds, "
                        "1 thread, 7 configurations")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--limit", type=int, default=None, help="evaluation samples per model (default: all)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved latency rounds (default 30; quick 5)")
    parser.add_argument("--reps", type=int, default=5, help="runs per configuration per round")
    parser.add_argument("--threads", default=None, help="thread counts, e.g. 1,2 (default 1,2; quick 1)")
    parser.add_argument("--shared", default=str(DEFAULT_SHARED), help="the shared reference folder")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent),
                        help="folder for RESULTS.md and results.json (default: benchmarks/)")
    parser.add_argument("--workdir", default=None, help="folder for model files (default: a temporary folder)")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing configurations")
    parser.add_argument("--latency-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.latency_worker:
        latency_worker(args.latency_worker)
        return 0
    from tqdm import tqdm

    args.rounds = args.rounds or (5 if args.quick else 30)
    args.threads = [int(t) for t in (args.threads or ("1" if args.quick else "1,2")).split(",")]
    names = ["resnet20"] if args.quick else (args.models.split(",") if args.models else list(MODELS))
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    shared = Path(args.shared)
    if not shared.is_dir():
        print(f"error: {shared}: no such folder (the shared reference models)", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ocomp-bench-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        total = sum(len(QUICK_LABELS if args.quick else (MODELS[n]["configs"] or BASE_CONFIGS)) + len(args.threads)
                    for n in names)
        models = []
        with tqdm(total=total, unit="step") as bar:
            for name in names:
                models.append(bench_model(name, shared, workdir, args, bar))
    command = "python benchmarks/real_models.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"machine": machine(), "command": command.strip(), "seconds": time.perf_counter() - start,
              "threads": args.threads, "rounds": args.rounds, "reps": args.reps, "models": models,
              "notes": []}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_markdown(result, out / "RESULTS.md")
    print(f"wrote {out / 'RESULTS.md'} and {out / 'results.json'} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
