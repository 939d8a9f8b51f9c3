"""`--prune-ratio auto`: choose a pruning ratio per channel group from a sensitivity scan (issue #5).

1. Sensitivity scan. For every prunable (unpinned) group and every candidate
   ratio (`--prune-auto-ratios`), only that group is pruned (prune_graph on a
   fresh copy of the model), BatchNorm statistics and biases are recalibrated
   (bnrecal.recalibrate: adaptive BN + bias correction) on the first
   `--prune-auto-samples` calibration samples, and the fidelity to the unpruned
   model is measured on those samples as the mean cosine similarity of the
   outputs (per sample, flattened, averaged over samples and outputs). Cosine
   similarity is used rather than top-1 agreement because it is smooth in the
   ratio, which is what Kneedle needs to find a knee (top-1 agreement on a few
   hundred samples is a noisy staircase).
2. Per-group ratio: the knee of the (concave, decreasing) quality-vs-ratio curve
   found by Kneedle (ocomp.kneedle); without a knee, the largest ratio whose
   quality is within 1% of the group's best.
3. Global budget (`--prune-target-macs F` / `--prune-target-params F`: fraction
   of the original kept, 0 = unset). If the knee ratios miss it, a global
   quality threshold lambda is bisected: every group takes its largest
   candidate ratio whose quality >= lambda (0 when none); the largest lambda
   meeting the target wins. MACs/params are measured by pruning a copy with
   those ratios and running ocomp.metrics.model_stats on the exported model.

The scan is embarrassingly parallel: `--prune-jobs N` runs candidates in N
spawned processes (the model is sent as bytes, the calibration subset as arrays).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ocomp.errors import OcompError, UsageError

KNEE_TOLERANCE = 0.01  # no knee: largest ratio with quality >= (1 - this) * best


def parse_ratios(value: Any) -> tuple[float, ...]:
    """'0.1,0.2,...' (or a sequence) -> sorted distinct fractions in (0, 1); at least 3 for Kneedle."""
    items = value.split(",") if isinstance(value, str) else list(value)
    ratios = sorted({float(str(v).strip()) for v in items if str(v).strip()})
    if len(ratios) < 3 or any(not 0.0 < r < 1.0 for r in ratios):
        raise ValueError(f"expected at least 3 comma-separated ratios in (0, 1), got {value!r}")
    return tuple(ratios)


parse_ratios.__name__ = "ratios"


# ---------------------------------------------------------------- fidelity


def _session(model: onnx.ModelProto):
    try:
        from ocomp.runtime import session

        return session(model)
    except Exception:  # the custom-op runtime is not built: plain onnxruntime runs standard models
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_outputs(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], batch: int = 64) -> list[np.ndarray]:
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name for i in session.get_inputs()}
    count = len(next(iter(arrays.values())))
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, count, batch):
        feeds = {k: v[start:start + batch] for k, v in arrays.items() if k in inputs}
        for part, out in zip(parts, session.run(names, feeds)):
            part.append(np.asarray(out))
    return [np.concatenate(p) for p in parts]


def cosine_fidelity(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Mean over samples (and outputs) of the cosine similarity of the flattened outputs."""
    values = []
    for a, b in zip(outputs, reference):
        a = np.asarray(a, np.float64).reshape(len(a), -1)
        b = np.asarray(b, np.float64).reshape(len(b), -1)
        dot = (a * b).sum(axis=1)
        norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(norm > 0, dot / np.where(norm > 0, norm, 1.0), np.where(np.abs(a - b).max(axis=1) == 0, 1, 0))
        values.append(float(np.mean(cos)))
    return float(np.mean(values))


# ---------------------------------------------------------------- the scan


@dataclass
class _Scanner:
    """Prunes one group of a fresh copy, recalibrates and measures fidelity (picklable state: bytes + arrays)."""

    model_bytes: bytes
    arrays: dict[str, np.ndarray]
    reference_outputs: list[np.ndarray]
    prune_kwargs: dict[str, Any]

    def evaluate(self, gid: str, ratio: float) -> float:
        from ocomp.data import dataset_from_arrays
        from ocomp.model import to_graph, to_model

        from .bnrecal import recalibrate
        from .prune import prune_graph

        model = onnx.load_from_string(self.model_bytes)
        graph = to_graph(model)
        state: dict = {}
        calibration = dataset_from_arrays(model, self.arrays)
        prune_graph(graph, {gid: ratio}, calibration=calibration, state=state, **self.prune_kwargs)
        pruned = to_model(graph, model)
        recal = recalibrate(pruned, calibration, reference=model, kept_channels=state.get("kept_channels"))
        return cosine_fidelity(run_outputs(recal, self.arrays), self.reference_outputs)


_WORKER: _Scanner | None = None


def _init_worker(scanner: _Scanner) -> None:
    global _WORKER
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER = scanner


def _work(task: tuple[str, float]) -> float:
    assert _WORKER is not None
    return _WORKER.evaluate(*task)


def scan(scanner: _Scanner, tasks: list[tuple[str, float]], jobs: int = 1, progress: bool = False) -> list[float]:
    """Quality of every (group id, ratio) task, in task order."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="prune auto: sensitivity scan", unit="candidate", leave=False)
    results: list[float] = []
    try:
        if jobs <= 1:
            for task in tasks:
                results.append(scanner.evaluate(*task))
                if bar is not None:
                    bar.update(1)
        else:
            import multiprocessing

            with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_init_worker, initargs=(scanner,)) as pool:
                for quality in pool.map(_work, tasks):  # map keeps the task order
                    results.append(quality)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


# ---------------------------------------------------------------- choosing ratios


def knee_ratio(ratios: Sequence[float], quality: Sequence[float]) -> tuple[float, bool]:
    """(ratio, found by Kneedle) for one group's concave decreasing quality curve."""
    from ocomp.kneedle import knee

    try:
        found = knee(list(ratios), list(quality), curve="concave", direction="decreasing", S=1.0)
    except ValueError:
        found = None
    if found is not None:
        return float(found), True
    best = max(quality)
    limit = best - KNEE_TOLERANCE * abs(best)
    ok = [r for r, q in zip(ratios, quality) if q >= limit]
    return float(max(ok)), False


def ratios_at(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], level: float) -> dict[str, float]:
    """Each group's largest candidate ratio whose quality >= level (0 when none)."""
    out = {}
    for gid, (ratios, quality) in curves.items():
        ok = [r for r, q in zip(ratios, quality) if q >= level]
        out[gid] = float(max(ok)) if ok else 0.0
    return out


def kept_fractions(model: onnx.ModelProto, ratios: Mapping[str, float], prune_kwargs: Mapping[str, Any],
                   base: Any) -> tuple[float, float]:
    """(MACs, params) of `model` pruned with `ratios`, as fractions of `base` (a ModelStats)."""
    from ocomp.metrics import model_stats
    from ocomp.model import to_graph, to_model

    from .prune import prune_graph

    graph = to_graph(model)
    kwargs = {k: v for k, v in prune_kwargs.items() if k != "criterion"}
    # the activation criterion changes which channels go, not how many: l1 counts the same MACs/params
    criterion = "l1" if prune_kwargs.get("criterion") == "activation" else prune_kwargs.get("criterion", "l1")
    prune_graph(graph, dict(ratios), criterion=criterion, **kwargs)
    stats = model_stats(to_model(graph, model))
    return stats.macs / max(base.macs, 1), stats.params / max(base.params, 1)


def choose(model: onnx.ModelProto, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
           prune_kwargs: Mapping[str, Any], target_macs: float = 0.0,
           target_params: float = 0.0) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """(knee ratios, chosen ratios, budget outcome)."""
    from ocomp.metrics import model_stats

    knees = {}
    knee_found = {}
    for gid, (ratios, quality) in curves.items():
        knees[gid], knee_found[gid] = knee_ratio(ratios, quality)
    budget: dict[str, Any] = dict(target_macs=target_macs or None, target_params=target_params or None,
                                  knee_found=knee_found)
    base = model_stats(model)

    def meets(ratios: Mapping[str, float]) -> tuple[bool, float, float]:
        macs, params = kept_fractions(model, ratios, prune_kwargs, base)
        ok = (not target_macs or macs <= target_macs + 1e-12) and (not target_params or params <= target_params + 1e-12)
        return ok, macs, params

    ok, macs, params = meets(knees)
    budget.update(knee_macs_fraction=macs, knee_params_fraction=params)
    if ok or not (target_macs or target_params):
        budget.update({"lambda": None})
        budget.update(method="knee", met=ok if (target_macs or target_params) else None,
                      macs_fraction=macs, params_fraction=params)
        return knees, dict(knees), budget

    # bisect the global quality threshold over the measured quality levels (descending)
    levels = sorted({q for _, quality in curves.values() for q in quality}, reverse=True)
    levels.append(-math.inf)  # every group at its largest candidate ratio
    cache: dict[int, tuple[bool, float, float]] = {}

    def at(i: int) -> tuple[bool, float, float]:
        if i not in cache:
            cache[i] = meets(ratios_at(curves, levels[i]))
        return cache[i]

    lo, hi = 0, len(levels) - 1  # find the first (largest lambda) index that meets the target
    if not at(hi)[0]:
        chosen = ratios_at(curves, levels[hi])
        _, macs, params = at(hi)
        budget["lambda"] = None
        budget.update(method="lambda", met=False, macs_fraction=macs, params_fraction=params,
                      note="the target is out of reach with the candidate ratios: every group at its largest")
        return knees, chosen, budget
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid)[0]:
            hi = mid
        else:
            lo = mid + 1
    _, macs, params = at(lo)
    lam = levels[lo]
    budget["lambda"] = None if math.isinf(lam) else float(lam)
    budget.update(method="lambda", met=True, macs_fraction=macs,
                  params_fraction=params, evaluations=len(cache))
    return knees, ratios_at(curves, lam), budget


# ---------------------------------------------------------------- plots


def plot_curves(directory: str, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                knees: Mapping[str, float], chosen: Mapping[str, float]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--prune-plot needs matplotlib: pip install ocomp[plot]") from None
    os.makedirs(directory, exist_ok=True)
    written = []
    for gid, (ratios, quality) in curves.items():
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot(ratios, quality, "o-", label="quality")
        k = knees[gid]
        ax.axvline(k, color="r", linestyle="--", label=f"knee {k:g}")
        if chosen[gid] != k:
            ax.axvline(chosen[gid], color="g", linestyle=":", label=f"chosen {chosen[gid]:g}")
        ax.set_xlabel("pruning ratio")
        ax.set_ylabel("output cosine similarity")
        ax.set_title(gid, fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(directory, "".join(c if c.isalnum() or c in "._-" else "_" for c in gid) + ".png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------- entry point


def auto_ratios(model: onnx.ModelProto, group_ids: Sequence[str], calibration: Any, opts: Mapping[str, Any],
                progress: bool = False) -> tuple[dict[str, float], dict[str, Any]]:
    """Chosen ratio by group id, and the report details ({"auto": curves, "auto_budget": outcome})."""
    if calibration is None:
        raise UsageError("--prune-ratio auto needs --calib")
    ratios = parse_ratios(opts.get("auto_ratios", "0.1,0.2,0.3,0.4,0.5,0.6,0.7"))
    samples = int(opts.get("auto_samples", 128))
    jobs = int(opts.get("jobs", 1))
    data = calibration.take(samples) if hasattr(calibration, "take") else calibration
    parts: dict[str, list[np.ndarray]] = {}
    for feeds, _ in data.batches():
        for k, v in feeds.items():
            parts.setdefault(k, []).append(np.asarray(v))
    if not parts:
        raise OcompError("--prune-ratio auto: the calibration data is empty")
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    prune_kwargs = dict(criterion=opts.get("criterion", "l1"), multiple=int(opts.get("multiple", 1)),
                        min_channels=int(opts.get("min_channels", 1)), prune_dead=bool(opts.get("dead", True)))
    scanner = _Scanner(model.SerializeToString(), arrays, run_outputs(model, arrays), prune_kwargs)
    tasks = [(gid, r) for gid in group_ids for r in ratios]
    quality = scan(scanner, tasks, jobs=jobs, progress=progress) if tasks else []
    curves = {gid: (list(ratios), quality[i * len(ratios):(i + 1) * len(ratios)]) for i, gid in enumerate(group_ids)}
    knees, chosen, budget = choose(model, curves, prune_kwargs, float(opts.get("target_macs", 0.0) or 0.0),
                                   float(opts.get("target_params", 0.0) or 0.0))
    budget["samples"] = len(next(iter(arrays.values())))
    budget["metric"] = "cosine similarity of the outputs vs the unpruned model, after bnrecal"
    if opts.get("plot"):
        budget["plots"] = plot_curves(str(opts["plot"]), curves, knees, chosen)
    details = {gid: {"ratios": curves[gid][0], "quality": curves[gid][1], "knee": knees[gid], "chosen": chosen[gid]}
               for gid in group_ids}
    return chosen, {"auto": details, "auto_budget": budget}
