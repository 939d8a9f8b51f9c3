"""Peak onnxruntime session memory (issue #13's must-show: the ternary W2A8 model's <= ORT int8's).

For each model, the same configurations side by side in one run: the fp32 original, onnxruntime int8 U8S8
(QDQ, per-channel; built by benchmarks/real_models.py's build_int8) and two ocomp W2A8 pipelines built by
`ocomp.api.compress` (real_models.build_ocomp, the same calibration data as real_models.py). Each
configuration is measured in fresh subprocesses (median of --repeats): the RSS after importing onnxruntime
and registering the ocomp library is the baseline, the peak resident set is reset there
(/proc/self/clear_refs), then the session is made (ocomp.session.make_session, one thread) and run --runs
times at batch 1; session memory = VmHWM - baseline. Writes MEMORY.md.

    python benchmarks/session_memory.py                    # resnet20, ppocr_cls, resnet26b (~10 min on 2 cores)
    python benchmarks/session_memory.py --models resnet20 --out /tmp/m

Model files go to --workdir (default: a temporary folder), never into the repository.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # before numpy loads OpenBLAS; not when imported by tests
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import real_models  # noqa: E402  (the int8 builder, the data and the ocomp builder are real_models.py's)

RUNS = 20
REPEATS = 3
PRUNE = {"prune": {"ratio": 0.3, "multiple": 1}}  # multiple 1 explicitly: its default may change
# (label, kind, passes, options) as in real_models.BASE_CONFIGS
CONFIGS = [
    ("original fp32", "orig", None, None),
    (real_models.INT8_U8S8, "int8", None, {"activation_type": "QUInt8"}),
    ("ternary + bnrecal + w2a8", "ocomp", "ternary,bnrecal,foldbn,w2a8", {}),
    ("prune 0.3 + ternary + bnrecal + w2a8", "ocomp", "prune,ternary,bnrecal,foldbn,w2a8", PRUNE),
]
SYNTHETIC = {  # built by benchmarks/calib_scale.py's builder (random He weights, BatchNorm kept)
    "resnet26b": dict(blocks=(2, 2, 2, 2), images=32,
                      text="ResNet-18-sized: calib_scale.resnet((2, 2, 2, 2)), a bottleneck ResNet with two blocks "
                           "per stage at 224x224, random He-initialised weights; calibration: 32 random normal "
                           "images (memory does not depend on the values)"),
}
DEFAULT_MODELS = ["resnet20", "ppocr_cls", "resnet26b"]
MB = 1024 * 1024


# ---------------------------------------------------------------- measuring (the subprocess side)


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024  # kB
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure_here(model_path: str, sample_path: str, input_name: str, runs: int = RUNS,
                 options: dict | None = None) -> dict:
    """In this (fresh) process: the baseline after importing onnxruntime and registering the ocomp library, then
    the peak and final RSS after making the session with ocomp.session.make_session (one thread, `options` as
    further SessionOptions attributes) and `runs` runs at batch 1. Bytes."""
    import onnxruntime  # noqa: F401  (counted in the baseline)

    import ocomp.runtime as rt
    from ocomp.session import make_session

    holder = rt.session_options()  # registers (loads) the ocomp library; kept alive: counted in the baseline
    feed = {input_name: np.load(sample_path)}
    data = Path(model_path).read_bytes()  # the caller's copy of the file: baseline, not session
    gc.collect()
    base = proc_status()["VmRSS"]
    peak_reset = reset_peak()
    sess = make_session(data, threads=1, **(options or {}))
    created = proc_status()["VmRSS"]
    first = None
    for _ in range(runs):
        sess.run(None, feed)
        first = first or proc_status()["VmRSS"]
    status = proc_status()
    so = sess.get_session_options()
    options = {k: (str(getattr(so, k)) if k == "graph_optimization_level" else getattr(so, k))
               for k in ("intra_op_num_threads", "inter_op_num_threads", "graph_optimization_level",
                         "enable_cpu_mem_arena", "enable_mem_pattern", "execution_mode")}
    options["execution_mode"] = str(options["execution_mode"])
    del sess, holder
    return {"baseline": base, "after_create": created, "after_first": first, "peak": status["VmHWM"],
            "after": status["VmRSS"],
            "peak_reset": peak_reset, "session_options": options}


def measure(model_path: Path, sample: np.ndarray, input_name: str, workdir: Path, repeats: int = REPEATS,
            runs: int = RUNS, options: dict | None = None) -> dict:
    """`repeats` fresh subprocesses of measure_here; medians of session memory (peak - baseline), of the RSS
    growth after session creation and after the runs, plus every raw figure."""
    workdir.mkdir(parents=True, exist_ok=True)
    sample_path = workdir / f"{Path(model_path).stem}.sample.npy"
    np.save(sample_path, sample)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    raw = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, __file__, "--worker", str(model_path), str(sample_path), input_name,
                               str(runs), json.dumps(options or {})], capture_output=True, text=True, env=env, cwd=workdir)
        if proc.returncode != 0:
            raise RuntimeError(f"memory subprocess failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:300]}")
        raw.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"session_bytes": statistics.median(r["peak"] - r["baseline"] for r in raw),
            "create_bytes": statistics.median(r["after_create"] - r["baseline"] for r in raw),
            "first_bytes": statistics.median(r["after_first"] - r["baseline"] for r in raw),
            "after_bytes": statistics.median(r["after"] - r["baseline"] for r in raw),
            "baseline_bytes": statistics.median(r["baseline"] for r in raw),
            "file_bytes": Path(model_path).stat().st_size, "session_options": raw[0]["session_options"],
            "peak_reset": all(r["peak_reset"] for r in raw), "raw": raw}


# ---------------------------------------------------------------- building


def synthetic_data(name: str) -> dict:
    """Random calibration images, batches of 1 (the int8 builder fixes the input shape to batch 1)."""
    spec = SYNTHETIC[name]
    rng = np.random.default_rng(0)
    return dict(input="input", calib=rng.normal(0, 1, (spec["images"], 3, 224, 224)).astype(np.float32),
                eval=rng.normal(0, 1, (1, 3, 224, 224)).astype(np.float32), batch=1, note=spec["text"])


def build_models(name: str, shared: Path, workdir: Path, log) -> tuple[dict, dict[str, Path], dict]:
    """(data, {label: model path}, {label: error}) for every configuration, built as real_models.py builds them."""
    from ocomp.model import load_model, save_model

    mdir = workdir / name
    mdir.mkdir(parents=True, exist_ok=True)
    if name in SYNTHETIC:
        import calib_scale

        data = synthetic_data(name)
        original = mdir / f"{name}.onnx"
        import onnx

        onnx.save(calib_scale.resnet(SYNTHETIC[name]["blocks"]), original)
        input_shapes = None
        int8_source = mdir / "int8_source.onnx"
        save_model(load_model(original, {"input": [1, 3, 224, 224]}), int8_source)
    else:
        meta = real_models.MODELS[name]
        data = real_models.load_data(name, shared, None, False)
        original = shared / meta["file"]
        input_shapes = meta["input_shapes"]
        int8_source = mdir / "int8_source.onnx"  # input shapes fixed, as real_models.bench_model does
        save_model(load_model(original, input_shapes), int8_source)
    calib_path = mdir / "calib.npz"
    np.savez(calib_path, **{data["input"]: data["calib"]})
    paths, errors = {}, {}
    for i, (label, kind, passes, options) in enumerate(CONFIGS):
        log(f"{name}: building {label}")
        path = mdir / f"{i:02d}_{kind}.onnx"
        t0 = time.perf_counter()
        try:
            if kind == "orig":
                path = original
            elif kind == "int8":
                real_models.build_int8(int8_source, path, data, options["activation_type"])
            else:
                real_models.build_ocomp(original, path, passes, options, calib_path, input_shapes)
            paths[label] = path
        except Exception as exc:  # noqa: BLE001 - a failing configuration is a result
            errors[label] = real_models._error_text(exc)
        log(f"{name}: {label}: {time.perf_counter() - t0:.1f} s")
    return data, paths, errors


NO_PATTERN = {"enable_mem_pattern": False}  # the diagnostic column: onnxruntime's memory pattern off
FLOOR = "floor: a one-Relu model (same input)"


def floor_model(path: Path, sample: np.ndarray, input_name: str) -> Path:
    """A model of one Relu on the same input: what any session costs (code pages, session structures)."""
    import onnx
    from onnx import TensorProto, helper

    info = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Relu", [input_name], ["y"])], "floor",
                              [info(input_name, TensorProto.FLOAT, list(sample.shape))],
                              [info("y", TensorProto.FLOAT, list(sample.shape))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def layer_census(path: Path) -> str:
    """Which ops hold the weights: counts of the weighted ops by kind (and how many ternary ops run W2A8)."""
    import onnx

    model = onnx.load(str(path))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul", "TernaryConv", "TernaryGemm", "TernaryMatMul"):
            w2a8 = any(a.name in ("act_scale", "act_quant") for a in node.attribute)
            key = node.op_type + (" (W2A8)" if w2a8 else "")
            counts[key] = counts.get(key, 0) + 1
    qdq = sum(n.op_type == "DequantizeLinear" for n in model.graph.node)
    text = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none"
    return text + (f", {qdq} DequantizeLinear" if qdq else "")


# ---------------------------------------------------------------- the benchmark


def run(names: list[str], shared: Path, workdir: Path, repeats: int, runs: int, log=print) -> dict:
    models = []
    for name in names:
        data, paths, errors = build_models(name, shared, workdir, log)
        sample = data["eval"][:1]
        paths[FLOOR] = floor_model(workdir / name / "floor.onnx", sample, data["input"])
        rows = []
        for label in [FLOOR] + [c[0] for c in CONFIGS]:
            row: dict = {"config": label}
            if label in errors:
                row["error"] = errors[label]
            else:
                log(f"{name}: measuring {label}")
                try:
                    row.update(measure(paths[label], sample, data["input"], workdir / name / "mem", repeats, runs))
                    row["no_pattern"] = measure(paths[label], sample, data["input"], workdir / name / "mem", repeats,
                                                runs, NO_PATTERN)
                    row["layers"] = layer_census(paths[label])
                except Exception as exc:  # noqa: BLE001
                    row["error"] = real_models._error_text(exc)
            rows.append(row)
        file = SYNTHETIC[name]["text"].split(":")[0] if name in SYNTHETIC else real_models.MODELS[name]["file"]
        models.append({"model": name, "file": file, "note": data["note"], "rows": rows})
    return {"models": models}


def verdicts(model: dict) -> list[str]:
    """Per ternary row: is its session memory <= the int8 row's (computed, never written by hand)."""
    rows = {r["config"]: r for r in model["rows"] if "error" not in r}
    int8 = rows.get(real_models.INT8_U8S8)
    out = []
    if int8 is None:
        return ["no int8 row to compare with"]
    for label, row in rows.items():
        if "w2a8" not in label:
            continue
        ok = row["session_bytes"] <= int8["session_bytes"]
        floor = rows.get(FLOOR)
        above = (f"; above the floor row: {(row['session_bytes'] - floor['session_bytes']) / MB:.2f} vs "
                 f"{(int8['session_bytes'] - floor['session_bytes']) / MB:.2f} MB" if floor else "")
        line = (f"{label}: {row['session_bytes'] / MB:.2f} MB vs int8 {int8['session_bytes'] / MB:.2f} MB "
                f"({row['session_bytes'] / int8['session_bytes']:.2f}x{above}): "
                f"{'HOLDS (<= int8)' if ok else 'DOES NOT HOLD (> int8)'}")
        if "no_pattern" in row and "no_pattern" in int8:
            a, b = row["no_pattern"]["session_bytes"], int8["no_pattern"]["session_bytes"]
            line += (f"; with enable_mem_pattern=False: {a / MB:.2f} vs {b / MB:.2f} MB "
                     f"({'<=' if a <= b else '>'} int8)")
        out.append(line)
    return out


def write_markdown(result: dict, path: Path) -> None:
    header = real_models.machine()
    import kernels

    cpu_lines = kernels.cpu_header()
    opts = next((r["session_options"] for m in result["models"] for r in m["rows"] if "session_options" in r), {})
    lines = ["# Session memory: ternary W2A8 vs onnxruntime int8", "",
             f"Machine: {header['cpu']}, {header['cores']} cores; onnxruntime {header['onnxruntime']}, onnx "
             f"{header['onnx']}, Python {header['python']}; ocomp {header['commit']}; {header['date']}.", "",
             "```"] + cpu_lines + ["```", "",
             f"Command: `{result['command']}` (total {result['seconds']:.0f} s)", "",
             "What is measured, per configuration, in fresh subprocesses (median of "
             f"{result['repeats']}; `python benchmarks/session_memory.py --worker ...`):", "",
             "- baseline: VmRSS after importing numpy and onnxruntime, registering (loading) the ocomp runtime "
             "library (`ocomp.runtime.session_options()`), loading the input and reading the model file into a "
             "bytes object (the caller's copy, not the session's); then the peak is reset "
             "(`echo 5 > /proc/self/clear_refs`"
             + ("" if all(r.get("peak_reset", True) for m in result["models"] for r in m["rows"]) else
                ", WHICH FAILED in some run: those peaks include the imports") + ").",
             "- the session is made by `ocomp.session.make_session(bytes, threads=1)` and run "
             f"{result['runs']} times at batch 1 on one input;",
             "- `session MB` = VmHWM (peak resident set) - baseline: everything the session made resident at its "
             "peak, i.e. onnxruntime's copy of the parsed model (the protobuf and its initializers, held while the "
             "session initializes), the initializers as tensors, pre-packed weight buffers (MLAS's packed fp32 "
             "and int8 weights; the ocomp kernels' repacked 2-bit panels, made at kernel creation), the CPU "
             "arena's activation buffers (memory pattern planned), each kernel's scratch buffers, and the code "
             "and data pages of onnxruntime / the ocomp library first touched by these runs. `create MB`: VmRSS "
             "right after the session was made, `after 1 run MB` after the first run, `after N runs MB` after the last "
             "(all minus the baseline; glibc keeps freed heap memory, so RSS does not fall when the session frees "
             "its parse-time copies, and later allocations reuse it).",
             "- `session MB, mem pattern off`: the same measurement (fresh subprocesses) with "
             "`enable_mem_pattern=False`, a diagnostic column: with the memory pattern on, onnxruntime allocates "
             "each activation separately from its CPU arena in the first run, records the pattern, and from the "
             "second run allocates the whole pattern as one block; the arena keeps the first run's chunks, so the "
             "activations can be held twice (compare `after 1 run` with `after N runs`).",
             f"- onnxruntime session options (as read back from the session): "
             + ", ".join(f"{k}={v}" for k, v in opts.items()) + "; CPU execution provider only; "
             "log_severity_level=4. The ocomp library is registered on every session (also the fp32 and int8 "
             "ones), as make_session does.",
             "- ORT int8 U8S8: real_models.build_int8 (quant_pre_process, quantize_static QDQ per-channel, uint8 "
             "activations, int8 weights, MinMax on the same calibration subset). ocomp rows: "
             "`ocomp.api.compress` (real_models.build_ocomp) with the calibration data real_models.py uses; "
             "prune: ratio 0.3, multiple 1 (given explicitly).", ""]
    for model in result["models"]:
        lines += [f"## {model['model']} ({model['file']})", "", model["note"] + ".", "",
                  f"| config | session MB (peak) | create MB | after 1 run MB | after {result['runs']} runs MB | "
                  "session MB, mem pattern off | file KB | weighted ops |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in model["rows"]:
            if "error" in r:
                lines.append(f"| {r['config']} | ERROR: {r['error'].replace('|', '/')} | | | | | | |")
                continue
            off = f"{r['no_pattern']['session_bytes'] / MB:.2f}" if "no_pattern" in r else "—"
            lines.append(f"| {r['config']} | {r['session_bytes'] / MB:.2f} | {r['create_bytes'] / MB:.2f} | "
                         f"{r['first_bytes'] / MB:.2f} | {r['after_bytes'] / MB:.2f} | {off} | "
                         f"{r['file_bytes'] / 1024:.1f} | {r['layers']} |")
        lines.append("")
        lines += [f"- {v}" for v in verdicts(model)]
        spread = [r["config"] + ": " + ", ".join(f"{(x['peak'] - x['baseline']) / MB:.2f}" for x in r["raw"])
                  for r in model["rows"] if "raw" in r]
        lines += ["- per-subprocess session MB: " + "; ".join(spread), ""]
    if result.get("notes"):
        lines += ["## Findings", ""] + [f"- {n}" for n in result["notes"]] + [""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        model, sample, input_name, runs, options = argv[1:6]
        print(json.dumps(measure_here(model, sample, input_name, int(runs), json.loads(options))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated subset of {', '.join(list(real_models.MODELS) + list(SYNTHETIC))}")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="fresh subprocesses per configuration")
    parser.add_argument("--runs", type=int, default=RUNS, help="inferences per subprocess")
    parser.add_argument("--shared", default=str(real_models.DEFAULT_SHARED), help="the shared reference folder")
    parser.add_argument("--out", default=str(HERE), help="folder for MEMORY.md and memory.json (default: "
                        "benchmarks/; the json is written only outside benchmarks/)")
    parser.add_argument("--workdir", default=None, help="folder for model files (default: a temporary folder)")
    parser.add_argument("--notes", default=None, help="a text file of findings appended to MEMORY.md, one a line")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in real_models.MODELS and n not in SYNTHETIC]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ocomp-mem-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        result = run(names, Path(args.shared), workdir, args.repeats, args.runs,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    result.update(command=("python benchmarks/session_memory.py " + " ".join(argv)).strip(),
                  seconds=time.perf_counter() - start, repeats=args.repeats, runs=args.runs,
                  notes=[n for n in Path(args.notes).read_text().splitlines() if n.strip()] if args.notes else [])
    write_markdown(result, out / "MEMORY.md")
    if out.resolve() != HERE:
        (out / "memory.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out / 'MEMORY.md'} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
