"""The Python API: compress(), inspect(), compare(), evaluate(). The CLI is a thin layer over these."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx

from .errors import GuardError, OcompError, OcompWarning, UsageError
from .guard import GuardOptions, quiet_run_options
from .metrics import ModelStats, compare_outputs, model_stats
from .model import (add_provenance, atomic_write, check_output_folder, check_run_paths, graph_inputs, input_dims,
                    load_model, path_problem, save_model)
from .pipeline import Report, parse_pass_list, registry, resolve_options, run_passes
from .validate import check_nodes

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass
class Recipe:
    passes: list[str] = field(default_factory=list)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """A TOML recipe: `passes = ["prune", "ternary"]` and one table a pass: `[prune] ratio = 0.3`."""
    problem = path_problem(path)
    if problem:
        raise OcompError(f"{path}: recipe file: {problem}")
    if not os.path.isfile(path):
        raise OcompError(f"{path}: the recipe is not a file")
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise OcompError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise OcompError(f"{path}: not a valid TOML recipe: {exc}") from None
    passes = data.pop("passes", [])
    if isinstance(passes, str):
        passes = [p for p in passes.split(",") if p.strip()]
    if not isinstance(passes, list) or not all(isinstance(p, str) for p in passes):
        raise UsageError(f"{path}: 'passes' must be a list of pass names (or one comma-separated string), "
                         f"got {passes!r}")
    options = {}
    for key, value in data.items():
        if not isinstance(value, dict):
            raise UsageError(f"{path}: unknown recipe key '{key}' (expected 'passes' or one table a pass)")
        options[key] = value
    return Recipe([str(p).strip() for p in passes], options)


@dataclass
class CompressResult:
    model: onnx.ModelProto
    reports: list[Report]
    before: ModelStats
    after: ModelStats
    evaluation: dict[str, dict[str, Any]] | None = None
    # {"data", "samples", "outputs", "top1"?, "passed", "failures", "message"?}; None when not run
    guard: dict[str, Any] | None = None
    # {"original", "compressed" (seconds, median), "runs", "threads", "batch"} or {"skipped": reason}
    latency: dict[str, Any] | None = None

    def to_dict(self) -> dict:
        return {
            "passes": [r.to_dict() for r in self.reports],
            "before": _stats_summary(self.before),
            "after": _stats_summary(self.after),
            "evaluation": self.evaluation,
            "guard": self.guard,
            "latency": self.latency,
        }


def _stats_summary(stats: ModelStats) -> dict:
    return {"params": stats.params, "macs": stats.macs, "weight_bytes": stats.weight_bytes,
            "file_size": stats.file_size}


def compress(input_path: str | os.PathLike, output_path: str | os.PathLike,
             passes: str | Sequence[str] | None = None,
             options: Mapping[str, Mapping[str, Any]] | None = None, *,
             calib: str | os.PathLike | None = None, recipe: str | os.PathLike | None = None,
             report: str | os.PathLike | None = None, eval_data: str | os.PathLike | None = None,
             input_shapes: Mapping[str, Sequence[int]] | None = None, data_options: Any = None,
             progress: bool = False, guard: GuardOptions | None = None, latency: bool = False,
             threads: int | None = None, max_drop: float | None = None,
             target_size: str | None = None) -> CompressResult:
    """Load `input_path`, run the passes, write `output_path` atomically (and the JSON report, if asked).

    With `guard` (the CLI always gives one) and `eval_data` or `calib`, the compressed model's fidelity to
    the original is measured before anything is written (see ocomp.guard); below the thresholds a
    GuardError is raised and nothing is written, unless `guard.force`. With only `calib`, a tail of it is
    held back from the passes for that. `latency` times both models at batch 1 on `threads` threads.

    `max_drop` (points) or `target_size` ("8x", "120KB"): mixed precision under that budget (ocomp.precision):
    each weighted layer ternary, int8 or float, the smallest model within the drop or the most accurate
    within the size; needs `calib` and a ternary pass. A budget that cannot be met raises GuardError naming
    what was reached (written anyway with `guard.force`)."""
    plan = load_recipe(recipe) if recipe else Recipe()
    names = parse_pass_list(passes if passes else plan.passes)
    merged: dict[str, dict[str, Any]] = {}
    for source in (plan.options, options or {}):
        for name, values in source.items():
            if not isinstance(values, Mapping):
                raise UsageError(f"options of pass '{name}' must be a table of option = value, got {values!r}")
            merged.setdefault(name, {}).update(values)
    check_option_values(names, merged)
    budget = None
    if max_drop is not None or target_size is not None:
        from .precision import Budget, split_passes

        budget = Budget(max_drop=max_drop, target_size=target_size)
        split_passes(names)
        if calib is None:
            raise UsageError(f"{budget.describe().split()[0]} needs --calib: the per-layer sensitivities and the "
                             "drop are measured on calibration data")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UsageError(f"--threads: expected a whole number >= 1, got {threads!r}")
    inputs = [("the input model", input_path)] + [(what, p) for what, p in (
        ("the --calib data", calib), ("the --eval data", eval_data), ("the --recipe file", recipe)) if p is not None]
    outputs = [("the output (-o)", output_path)] + ([("the --report file", report)] if report is not None else [])
    check_run_paths(inputs, outputs)
    plot_folder = (merged.get("prune") or {}).get("plot")
    if plot_folder:
        check_output_folder(plot_folder, "the --prune-plot folder", inputs)
    external: list[Path] = []
    model = load_model(input_path, input_shapes, require_static=False, external_files=external)
    if external:
        check_run_paths(inputs + [(f"the input model's external data file '{p.name}'", p) for p in external],
                        outputs)
    check_nodes(model, str(input_path))
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    calibration = _open_data(calib, model, data_options) if calib is not None else None
    evaluation_set = _open_data(eval_data, model, data_options) if eval_data is not None else None
    for dataset in (calibration, evaluation_set):
        if dataset is not None:
            warn_label_range(dataset, model)
    guard_set, guard_where = None, ""
    whole_calibration = calibration
    if guard is not None:
        if evaluation_set is not None:
            guard_set, guard_where = evaluation_set, f"{len(evaluation_set)} --eval samples"
        elif calibration is not None:
            from .guard import hold_back

            calibration, guard_set, guard_where = hold_back(calibration)

    start = time.perf_counter()
    if budget is None:
        result = run_passes(model, names, merged, calibration=calibration, reference=reference, progress=progress,
                            threads=threads)
        passes_seconds = time.perf_counter() - start
    else:
        result, calibration = _mixed(model, names, merged, budget, whole_calibration, reference, guard, progress,
                                     threads, model_file_size(input_path, external))
        passes_seconds = float("inf")  # a failing guard is not repeated pass by pass: the plan is the run
    out = result.model
    add_provenance(out, [{"name": r.pass_name, "options": r.options} for r in result.reports])
    guard_result = None
    if guard is not None:
        guard_result = _run_guard(guard, guard_set, guard_where, reference, out, names, model, merged, calibration,
                                  passes_seconds, progress)
    timing = measure_latency(reference, out, threads) if latency else None
    _write_prune_plots(result.reports)
    save_model(out, output_path)
    before, after = model_stats(reference, input_path), model_stats(out, output_path)
    evaluation = None
    if evaluation_set is not None:
        from .evaluate import evaluate

        with onnxruntime_errors(str(input_path)):
            evaluation = {"original": evaluate(reference, evaluation_set, progress=progress),
                          "compressed": evaluate(out, evaluation_set, reference=reference, progress=progress)}
    outcome = CompressResult(out, result.reports, before, after, evaluation, guard_result, timing)
    if report is not None:
        from .report import json_text

        atomic_write(report, json_text(outcome.to_dict()).encode())
    return outcome


def model_file_size(path: str | os.PathLike, external: Sequence[Path]) -> int:
    """Bytes of a model on disk, its external data files included."""
    return os.path.getsize(path) + sum(os.path.getsize(p) for p in external)


def _mixed(model, names, merged, budget, calibration, reference, guard, progress, threads, original_size):
    """Mixed precision under `budget`: (the pipeline result of the chosen plan, the data the passes used).
    The passes fit on the first 80% of --calib (ocomp.guard.hold_back) and the drop is measured on all of it."""
    import sys

    from .guard import hold_back
    from .pipeline import PipelineResult
    from .precision import search

    fit = hold_back(calibration)[0]
    log = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else None
    found = search(model, names, merged, budget, fit, calibration, reference, threads=threads, progress=progress,
                   log=log, original_size=original_size)
    if not found.reached:
        if guard is None or not guard.force:
            raise GuardError(f"{found.message}; nothing written (use --force to write it anyway)")
        warnings.warn(OcompWarning(f"{found.message}; written anyway (--force)"))
    return PipelineResult(found.model, found.reports), fit


def _run_guard(options: GuardOptions, dataset, where: str, reference: onnx.ModelProto, out: onnx.ModelProto,
               names: Sequence[str], model: onnx.ModelProto, merged, calibration, passes_seconds: float,
               progress: bool) -> dict[str, Any] | None:
    """Measure fidelity; raise GuardError below the thresholds (unless forced). When the passes were quick,
    a failing run is repeated pass by pass to say which pass lost what."""
    from . import guard as g

    if dataset is None:
        return None
    with onnxruntime_errors("the compressed model"):
        figures = g.measure(reference, out, dataset, progress)
    found = g.failures(figures, options)
    record = {"data": where, **figures, "passed": not found, "failures": found}
    if not found:
        return record
    per_pass: list[str] = []
    if len(names) > 1 and passes_seconds < PER_PASS_BREAKDOWN_SECONDS:
        for k in range(1, len(names)):
            partial = run_passes(model, names[:k], {n: v for n, v in merged.items() if n in names[:k]},
                                 calibration=calibration, reference=reference).model
            with onnxruntime_errors("an intermediate model"):
                per_pass.append(f"{names[k - 1]} ({g.headline(g.measure(reference, partial, dataset))})")
        per_pass.append(f"{names[-1]} ({g.headline(figures)})")
    record["message"] = g.message(found, where, names, per_pass, forced=options.force)
    if not options.force:
        raise GuardError(record["message"])
    warnings.warn(OcompWarning(record["message"]))
    return record


# a failing guard repeats the passes one prefix at a time when they took less than this in total
PER_PASS_BREAKDOWN_SECONDS = 30.0


def check_option_values(names: Sequence[str], merged: Mapping[str, Mapping[str, Any]]) -> None:
    """Option values every pass option must satisfy beyond its declared type: no true/false for a
    number or text option (TOML `min_channels = true`), no negative numbers (`--ternary-min-params -5`).
    Usage errors (exit 2), raised before any work, like the conversion errors of resolve_options."""
    known = registry()
    unknown = set(merged) - set(names)
    if unknown:
        raise UsageError(f"options given for passes not in the pipeline: {', '.join(sorted(unknown))}")
    for pass_name in names:
        given = merged.get(pass_name) or {}
        declared = {o.name: o for o in known[pass_name].options}
        for key, value in given.items():
            option = declared.get(key.replace("-", "_"))
            if option is None or option.type is bool:
                continue
            for item in (value if option.multiple and isinstance(value, (list, tuple)) else [value]):
                if isinstance(item, (bool, np.bool_)):
                    raise UsageError(f"{option.flag(pass_name)}: expected a value of type "
                                     f"{getattr(option.type, '__name__', 'value')}, got {item!r}")
        resolved = resolve_options(pass_name, given)
        for key in given:
            option = declared[key.replace("-", "_")]
            value = resolved[option.name]
            for item in (value if option.multiple else [value]):
                problem = negative_value(item)
                if problem:
                    raise UsageError(f"{option.flag(pass_name)}: {problem}")


def negative_value(value: Any) -> str | None:
    """"must not be negative" for a negative number (or a NAME=number pair with a negative number):
    no pass option takes one."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        value = value[1]
    if isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_)) and value < 0:
        return f"must not be negative, got {value!r}"
    return None


def warn_label_range(dataset, model: onnx.ModelProto) -> None:
    """A warning when labels fall outside the first output's classes: those samples can never be right."""
    if not dataset.has_labels or not model.graph.output:
        return
    dims = input_dims(model.graph.output[0])
    classes = dims[-1] if dims and isinstance(dims[-1], int) and len(dims) == 2 else None
    if classes is None:
        return
    labels = dataset.labels()
    if labels is None or not len(labels):
        return
    outside = int(np.sum((labels < 0) | (labels >= classes)))
    if outside:
        warnings.warn(OcompWarning(
            f"{dataset.source}: {outside} of {len(labels)} labels lie outside the model's classes 0..{classes - 1} "
            f"(output '{model.graph.output[0].name}'; labels range {int(labels.min())}..{int(labels.max())}): "
            "they count as wrong"))


LATENCY_RUNS = 5  # at least; fast models get more runs, up to LATENCY_MAX_RUNS within LATENCY_BUDGET seconds
LATENCY_MAX_RUNS = 50
LATENCY_BUDGET = 0.25


def measure_latency(original: onnx.ModelProto, compressed: onnx.ModelProto, threads: int | None = None,
                    runs: int = LATENCY_RUNS) -> dict[str, Any]:
    """Median wall time of one inference at batch 1 (random inputs, after one warm-up run) of both models,
    on this machine, with `threads` intra-op threads (None: onnxruntime's default). At least `runs` runs,
    more (up to 50) while they fit in a quarter of a second."""
    try:
        feeds = random_feeds(original, 1, seed=0)
    except OcompError as exc:
        return {"skipped": str(exc)}
    result: dict[str, Any] = {"threads": threads, "batch": next(
        (int(v.shape[0]) for v in feeds.values() if v.ndim), 1)}
    for label, model in (("original", original), ("compressed", compressed)):
        try:
            session = _latency_session(model, threads)
            quiet = quiet_run_options()
            session.run(None, feeds, quiet)
            times: list[float] = []
            while len(times) < runs or (len(times) < LATENCY_MAX_RUNS and sum(times) < LATENCY_BUDGET):
                start = time.perf_counter()
                session.run(None, feeds, quiet)
                times.append(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - a model onnxruntime cannot time is reported, not fatal
            if not _is_onnxruntime_error(exc) and not isinstance(exc, (OcompError, RuntimeError)):
                raise
            return {"skipped": f"the {label} model could not be timed: {_first_line(exc)}"}
        result[label] = statistics.median(times)
        result[f"{label}_runs"] = len(times)
    return result


def _latency_session(model: onnx.ModelProto, threads: int | None):
    from .session import make_session

    return make_session(model, threads=threads)


def _is_onnxruntime_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("onnxruntime")


def _first_line(exc: BaseException) -> str:
    """onnxruntime's message without its decoration: the error code prefix, the C++ source location and
    the failed condition ("/onnxruntime_src/...:84 onnxruntime::ReshapeHelper::...(...) size != 0 was false.")."""
    import re

    text = str(exc).strip()
    if text.startswith("[ONNXRuntimeError] : "):  # "[ONNXRuntimeError] : 1 : FAIL : message" -> "message"
        text = text.split(" : ", 3)[-1]
    text = (text.splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"Non-zero status code returned while running (\S+) node\. Name:'([^']*)' Status Message: ",
                  lambda m: f"node '{m.group(2)}' ({m.group(1)}): ", text)
    text = re.sub(r"/onnxruntime_src/\S+:\d+ .*? was false\. ", "", text)
    return text.strip() or type(exc).__name__


@contextlib.contextmanager
def onnxruntime_errors(what: str) -> Iterator[None]:
    """onnxruntime's exceptions (session creation or a run) as one OcompError line naming the model."""
    try:
        yield
    except Exception as exc:
        if not _is_onnxruntime_error(exc):
            raise
        raise OcompError(f"{what}: onnxruntime cannot run the model: {_first_line(exc)}") from None


def _write_prune_plots(reports: Sequence[Report]) -> None:
    """--prune-plot DIR: the sensitivity curves of `--prune-ratio auto` as PNGs (passes never write files)."""
    for rep in reports:
        if rep.pass_name == "prune" and rep.options.get("plot") and "auto" in rep.details:
            from .passes.autoprune import write_plots

            rep.details["plots"] = [str(p) for p in write_plots(rep.details, rep.options["plot"])]


def _open_data(path: str | os.PathLike, model: onnx.ModelProto, data_options: Any):
    from .data import open_dataset

    return open_dataset(path, model, data_options)


def inspect(path: str | os.PathLike, input_shapes: Mapping[str, Sequence[int]] | None = None) -> ModelStats:
    """Ops histogram, per-layer params/MACs/weight bits, totals and file size of a model file."""
    model = load_model(path, input_shapes, require_static=False)
    check_nodes(model, str(path))
    return model_stats(model, path)


def random_feeds(model: onnx.ModelProto, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal inputs (integers: zeros) with the batch dimension set to `batch`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in graph_inputs(model):
        dims = input_dims(value)
        shape = [batch if axis == 0 and not isinstance(d, int) else d for axis, d in enumerate(dims)]
        if any(not isinstance(d, int) for d in shape):
            raise OcompError(f"input '{value.name}' has unknown dimensions {dims}; give --inputs or --input-shape")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = np.zeros(shape, dtype=dtype)
    return feeds


def compare(path_a: str | os.PathLike, path_b: str | os.PathLike, inputs: str | os.PathLike | None = None,
            random: int | None = None, seed: int = 0,
            input_shapes: Mapping[str, Sequence[int]] | None = None, data_options: Any = None
            ) -> tuple[dict[str, dict[str, float]], int]:
    """Run A and B (custom ops included) on the same inputs; metrics for each output, and the sample count."""
    from .session import make_session

    model_a = load_model(path_a, input_shapes, require_static=False)
    model_b = load_model(path_b, input_shapes, require_static=False)
    check_nodes(model_a, str(path_a))
    check_nodes(model_b, str(path_b))
    names_a = [o.name for o in model_a.graph.output]
    names_b = [o.name for o in model_b.graph.output]
    if [v.name for v in graph_inputs(model_a)] != [v.name for v in graph_inputs(model_b)] or names_a != names_b:
        raise OcompError(f"{path_a} and {path_b} have different inputs or outputs; they cannot be compared")
    with onnxruntime_errors(str(path_a)):
        sess_a = make_session(model_a)
    with onnxruntime_errors(str(path_b)):
        sess_b = make_session(model_b)
    if inputs is not None:
        batches = (feeds for feeds, _ in _open_data(inputs, model_a, data_options).batches())
    else:
        batches = iter([random_feeds(model_a, random or 1, seed)])
    outs_a: list[list[np.ndarray]] = []
    outs_b: list[list[np.ndarray]] = []
    count = 0
    quiet = quiet_run_options()
    for feeds in batches:
        with onnxruntime_errors(str(path_a)):
            outs_a.append(sess_a.run(names_a, feeds, quiet))
        with onnxruntime_errors(str(path_b)):
            outs_b.append(sess_b.run(names_b, feeds, quiet))
        count += len(next(iter(feeds.values())))
    results = {}
    for i, name in enumerate(names_a):
        a = np.concatenate([o[i] for o in outs_a]) if outs_a else np.zeros(0)
        b = np.concatenate([o[i] for o in outs_b]) if outs_b else np.zeros(0)
        if a.shape != b.shape:
            raise OcompError(f"output '{name}' has shape {a.shape} in {path_a} but {b.shape} in {path_b}; "
                             "the models cannot be compared")
        results[name] = compare_outputs(a, b)
    return results, count


def evaluate(path: str | os.PathLike, data: str | os.PathLike, reference: str | os.PathLike | None = None,
             input_shapes: Mapping[str, Sequence[int]] | None = None, data_options: Any = None,
             progress: bool = False) -> dict[str, Any]:
    """Top-1/top-5 accuracy with labels; fidelity against a reference model (agreement, cosine, SNR)."""
    from .evaluate import evaluate as run_evaluation

    model = load_model(path, input_shapes, require_static=False)
    check_nodes(model, str(path))
    ref = load_model(reference, input_shapes, require_static=False) if reference is not None else None
    if ref is not None:
        check_nodes(ref, str(reference))
    dataset = _open_data(data, model, data_options)
    if not dataset.has_labels and ref is None:
        raise OcompError(f"{data}: the data has no labels; give --reference to measure fidelity instead")
    warn_label_range(dataset, model)
    with onnxruntime_errors(str(path) if ref is None else f"{path} or {reference}"):
        return run_evaluation(model, dataset, reference=ref, progress=progress)


def parse_input_shapes(specs: Sequence[str]) -> dict[str, list[int | str]]:
    """`name=N,3,224,224` (repeatable) -> {name: ["N", 3, 224, 224]}; a name keeps that dim symbolic."""
    shapes: dict[str, list[int | str]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            parts = [d.strip() for d in dims.split(",") if d.strip()]
            shapes[name] = [int(d) if d.lstrip("-").isdigit() else d for d in parts]
            if not parts or any(isinstance(d, int) and d <= 0 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise UsageError(f"--input-shape: expected NAME=D0,D1,... with positive sizes or a symbolic name, got '{spec}'") from None
    return shapes
