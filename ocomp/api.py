"""The Python API: compress(), inspect(), compare(), evaluate(). The CLI is a thin layer over these."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from .errors import OcompError, UsageError
from .metrics import ModelStats, compare_outputs, model_stats
from .model import (add_provenance, atomic_write, check_output_path, graph_inputs, input_dims, load_model,
                    save_model)
from .pipeline import Report, parse_pass_list, run_passes

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
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise OcompError(f"{path}: no such recipe file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise OcompError(f"{path}: not a valid TOML recipe: {exc}") from None
    passes = data.pop("passes", [])
    if isinstance(passes, str):
        passes = [p for p in passes.split(",") if p.strip()]
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

    def to_dict(self) -> dict:
        return {
            "passes": [r.to_dict() for r in self.reports],
            "before": _stats_summary(self.before),
            "after": _stats_summary(self.after),
            "evaluation": self.evaluation,
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
             progress: bool = False) -> CompressResult:
    """Load `input_path`, run the passes, write `output_path` atomically (and the JSON report, if asked)."""
    plan = load_recipe(recipe) if recipe else Recipe()
    names = parse_pass_list(passes if passes else plan.passes)
    merged: dict[str, dict[str, Any]] = {}
    for source in (plan.options, options or {}):
        for name, values in source.items():
            merged.setdefault(name, {}).update(values)
    check_output_path(input_path, output_path)
    if report is not None:
        check_output_path(input_path, report)
    model = load_model(input_path, input_shapes)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    calibration = _open_data(calib, model, data_options) if calib is not None else None
    evaluation_set = _open_data(eval_data, model, data_options) if eval_data is not None else None

    result = run_passes(model, names, merged, calibration=calibration, reference=reference, progress=progress)
    _write_prune_plots(result.reports)
    out = result.model
    add_provenance(out, [{"name": r.pass_name, "options": r.options} for r in result.reports])
    save_model(out, output_path)
    before, after = model_stats(reference, input_path), model_stats(out, output_path)
    evaluation = None
    if evaluation_set is not None:
        from .evaluate import evaluate

        evaluation = {"original": evaluate(reference, evaluation_set, progress=progress),
                      "compressed": evaluate(out, evaluation_set, reference=reference, progress=progress)}
    outcome = CompressResult(out, result.reports, before, after, evaluation)
    if report is not None:
        from .report import json_text

        atomic_write(report, json_text(outcome.to_dict()).encode())
    return outcome


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
    from ocomp.runtime import session

    model_a = load_model(path_a, input_shapes, require_static=False)
    model_b = load_model(path_b, input_shapes, require_static=False)
    names_a = [o.name for o in model_a.graph.output]
    names_b = [o.name for o in model_b.graph.output]
    if [v.name for v in graph_inputs(model_a)] != [v.name for v in graph_inputs(model_b)] or names_a != names_b:
        raise OcompError(f"{path_a} and {path_b} have different inputs or outputs; they cannot be compared")
    sess_a, sess_b = session(model_a), session(model_b)
    if inputs is not None:
        batches = (feeds for feeds, _ in _open_data(inputs, model_a, data_options).batches())
    else:
        batches = iter([random_feeds(model_a, random or 1, seed)])
    outs_a: list[list[np.ndarray]] = []
    outs_b: list[list[np.ndarray]] = []
    count = 0
    for feeds in batches:
        outs_a.append(sess_a.run(names_a, feeds))
        outs_b.append(sess_b.run(names_b, feeds))
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
    ref = load_model(reference, input_shapes, require_static=False) if reference is not None else None
    dataset = _open_data(data, model, data_options)
    if not dataset.has_labels and ref is None:
        raise OcompError(f"{data}: the data has no labels; give --reference to measure fidelity instead")
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
