"""`--prune-ratio auto`: per-group pruning ratios from a sensitivity scan, Kneedle knees and a global budget.

1. **Sensitivity scan.** For every prunable channel group g and every candidate
   ratio r (`--prune-auto-ratios`), prune only g by r (same criterion, rounding
   and dead-channel options as a fixed-ratio run), recalibrate BatchNorm
   statistics and biases with bnrecal on the first `--prune-auto-samples`
   calibration samples, and measure the quality of the first model output on
   those samples against the model entering the pass. The point r = 0 is the
   recalibrated unpruned model (one extra candidate, shared by all curves).
   Candidates are independent: `--prune-jobs N` runs them in N worker processes
   ('spawn' context, model bytes and calibration arrays sent once a worker).
   Every scan session uses one onnxruntime thread, so the figures are bitwise
   the same whatever N is.
2. **Quality metric** (`--prune-auto-metric`). Default `cosine`: cosine
   similarity of the logits (all samples flattened) with the unpruned model's.
   It is label-free (calibration data rarely has labels) and smooth in the
   ratio, which Kneedle needs; top-1 agreement or accuracy move in steps of
   1/samples and their knees are noisier. `snr`: SNR in dB of the same logits
   (capped at 200 dB). `top1`: accuracy on labelled calibration data.
   A curve is made monotone (running minimum over increasing ratios): a ratio
   counts only as good as every smaller ratio of its group.
3. **Knee.** Kneedle (`ocomp.kneedle`, curve="concave", direction="decreasing")
   on each monotone curve, 0 included: the largest ratio before quality falls
   off. A curve losing at most FLAT_TOLERANCE[metric] has no knee and takes the
   largest candidate; a curve Kneedle finds no knee on (e.g. falling from the
   first candidate on) takes the point farthest above its chord (Kneedle's
   difference curve maximum; 0 for straight or convex curves).
4. **Budget** (`--prune-target-macs F` / `--prune-target-params F`: fraction of
   the MACs / params of the model entering the pass to keep at most). Without
   a target the knees are used as they are. Otherwise one global quality
   threshold lambda sets every group's ratio r_g(lambda) = the largest candidate
   whose monotone quality is >= lambda; when the knees keep too much, each group
   takes max(knee, r_g(lambda)), when they keep less than allowed,
   min(knee, r_g(lambda)); lambda is the largest threshold (bisection over the
   measured quality values) whose ratio set meets every target. MACs and params
   of a ratio set are measured exactly: the ratios are applied to a copy of the
   graph with prune_graph and the exported model is counted with model_stats.
   If even the largest candidates miss a target, they are used and the report
   says so (details["auto_budget"]["met"] is false).

The pass writes no files: `write_plots(details, folder)` renders the curves
(one PNG a group, knee and chosen ratio marked); ocomp.api.compress calls it
after the pipeline when `--prune-plot` is given.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ocomp.errors import OcompError, UsageError
from ocomp.kneedle import knee_index
from ocomp.metrics import Accuracy, OutputMetrics, model_stats

from .importance import DATA_CRITERIA
from ocomp.model import to_graph, to_model
from ocomp.pipeline import Context, KeptChannels, Report, resolve_options
from ocomp.session import make_session

METRICS = ("cosine", "snr", "top1")
FLAT_TOLERANCE = {"cosine": 1e-5, "snr": 0.01, "top1": 0.0}  # quality loss treated as none
SNR_CAP_DB = 200.0
DEFAULT_RATIOS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8"


# ---------------------------------------------------------------- option types


def ratio_list(value: Any) -> tuple[float, ...]:
    """Candidate ratios: "0.1,0.2,..." or a list; each in (0, 1); sorted, duplicates removed; at least two."""
    items = value.split(",") if isinstance(value, str) else list(value)
    ratios = sorted({float(v) for v in items if str(v).strip()})
    if len(ratios) < 2:
        raise ValueError(f"expected at least two comma-separated ratios, got {value!r}")
    bad = [r for r in ratios if not 0.0 < r < 1.0]
    if bad:
        raise ValueError(f"ratios must be fractions in (0, 1), got {bad[0]!r}")
    return tuple(ratios)


ratio_list.__name__ = "R1,R2,..."


def budget_fraction(value: Any) -> float | None:
    """A fraction in (0, 1] kept; 0 or empty means "no target" (None)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"expected a fraction in (0, 1] (0: no target), got {value!r}")
    return number or None


budget_fraction.__name__ = "fraction"


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--prune-plot needs matplotlib: pip install ocomp[plot]") from None


# ---------------------------------------------------------------- the auto run


def run_auto(graph: gs.Graph, ctx: Context, report: Report, group_ratios: Callable, prune: Callable,
             settings: Any, opts: Mapping[str, Any]) -> tuple[Any, dict[str, str]]:
    """Prune `graph` in place with automatically chosen per-group ratios (see module doc); returns the
    pruning result and a note for each group.

    group_ratios(graph) -> {group id: ratio, or None for the groups to scan} (the skip and layer options
    apply as with a fixed ratio; groups given a ratio by the layer option keep it and are not scanned).
    prune(graph, ratios, settings, calibration=..., session_factory=..., opsets=...) -> a result with
    `.kept`, `.indices`, `.layers` (passes/prune.py's prune_graph; it is passed in, so this module does not
    import the pass that uses it).
    """
    if ctx.calibration is None:
        raise ctx.option_error("ratio", "'auto' needs calibration data (--calib)")
    if opts["plot"]:
        require_matplotlib()
    metric = opts["auto_metric"]
    if metric not in METRICS:
        raise ctx.option_error("auto_metric", f"expected one of {', '.join(METRICS)}, got '{metric}'")
    if metric == "top1" and not ctx.calibration.has_labels:
        raise ctx.option_error("auto_metric", "top1 needs labels in the calibration data; use cosine or snr")
    try:
        candidates = ratio_list(opts["auto_ratios"])
        targets = {"macs": budget_fraction(opts["target_macs"]), "params": budget_fraction(opts["target_params"])}
    except (TypeError, ValueError) as exc:
        raise ctx.option_error("ratio", f"auto: {exc}") from None
    jobs = int(opts["jobs"])

    base = ctx.export(graph)  # the model entering the pass (export cleans the graph up: analyze afterwards)
    given = group_ratios(graph)
    scanned = [gid for gid, r in given.items() if r is None]
    fixed = {gid: float(r) for gid, r in given.items() if r is not None}

    setup = _setup(base, ctx, opts, metric, prune, settings)
    start = time.perf_counter()
    tasks = [(None, 0.0)] + [(gid, r) for gid in scanned for r in candidates]
    quality = _scan(setup, tasks, jobs, ctx.progress)
    scan_seconds = time.perf_counter() - start

    x = [0.0] + list(candidates)
    curves: dict[str, dict[str, Any]] = {}
    for gid in scanned:
        raw = [quality[(None, 0.0)]] + [quality[(gid, r)] for r in candidates]
        envelope = np.minimum.accumulate(np.asarray(raw, dtype=np.float64)).tolist()
        knee, how = choose_knee(x, envelope, FLAT_TOLERANCE[metric])
        curves[gid] = {"ratios": x, "quality": raw, "monotone": envelope, "knee": knee, "knee_rule": how}

    counter = _Counter(base, prune, settings, fixed)
    chosen, budget = fit_budget(curves, targets, counter)
    for gid, r in chosen.items():
        curves[gid]["chosen"] = r
        curves[gid]["chosen_quality"] = curves[gid]["monotone"][x.index(r)]

    ratios = {**fixed, **chosen}
    opsets = list(ctx.template.opset_import) if ctx.template is not None else []
    result = prune(graph, ratios, settings, calibration=ctx.calibration, session_factory=ctx.session, opsets=opsets)
    notes = {gid: f"auto ratio {c['chosen']:g} (knee {c['knee']:g})" for gid, c in curves.items()}
    notes.update({gid: f"ratio {r:g} from the layer option" for gid, r in fixed.items()})
    report.details["auto"] = curves
    report.details["auto_budget"] = budget
    report.details["auto_scan"] = dict(metric=metric, samples=setup.samples, candidates=len(tasks), jobs=jobs,
                                       seconds=round(scan_seconds, 3), recalibrated=True)
    report.details["auto_summary"] = render_curves(curves, metric, budget)
    if not budget["met"]:
        report.skip("*", "budget", budget["outcome"])
    return result, notes


# ---------------------------------------------------------------- knee and budget


def choose_knee(x: Sequence[float], quality: Sequence[float], flat_tolerance: float) -> tuple[float, str]:
    """(knee ratio, rule used) of a non-increasing quality curve over increasing ratios x (x[0] = 0)."""
    q = np.asarray(quality, dtype=np.float64)
    if q[0] - q.min() <= flat_tolerance:
        return float(x[-1]), "flat"
    index = knee_index(x, q, curve="concave", direction="decreasing")
    if index is not None:
        return float(x[index]), "kneedle"
    xs = np.asarray(x, dtype=np.float64)
    xn = (xs - xs[0]) / (xs[-1] - xs[0])
    yn = (q - q.min()) / (q.max() - q.min())
    above_chord = yn + xn - 1.0  # distance above the chord from (0, max) to (1, min)
    best = int(np.argmax(above_chord))
    return float(x[best] if above_chord[best] > 0 else x[0]), "chord"


def _ratio_at(curve: Mapping[str, Any], threshold: float) -> float:
    """Largest ratio of the curve whose monotone quality is >= threshold (0 when none)."""
    best = 0.0
    for r, q in zip(curve["ratios"], curve["monotone"]):
        if q >= threshold:
            best = r
    return best


def fit_budget(curves: Mapping[str, Mapping[str, Any]], targets: Mapping[str, float | None],
               counter) -> tuple[dict[str, float], dict[str, Any]]:
    """Chosen ratio per group and the budget outcome; counter(ratios) -> {"macs": kept fraction, "params": ...}."""
    knees = {gid: float(c["knee"]) for gid, c in curves.items()}
    active = {k: v for k, v in targets.items() if v is not None}

    def meets(kept: Mapping[str, float]) -> bool:
        return all(kept[k] <= v + 1e-12 for k, v in active.items())

    knee_kept = counter(knees)
    outcome: dict[str, Any] = dict(target_macs=targets.get("macs"), target_params=targets.get("params"),
                                   knee_macs_kept=knee_kept["macs"], knee_params_kept=knee_kept["params"])
    if not active or not curves:
        chosen, kept, mode, threshold = knees, knee_kept, "knees", None
        met = meets(kept)
    else:
        mode = "lower" if meets(knee_kept) else "raise"
        combine = min if mode == "lower" else max
        levels = sorted({q for c in curves.values() for q in c["monotone"]}, reverse=True)
        thresholds = [math.inf] + levels  # decreasing threshold: more pruning, fewer MACs/params kept

        def ratios_at(t: float) -> dict[str, float]:
            return {gid: combine(knees[gid], _ratio_at(c, t)) for gid, c in curves.items()}

        lo, hi = 0, len(thresholds) - 1  # find the first (largest) threshold that meets the targets
        if meets(counter(ratios_at(thresholds[hi]))):
            while lo < hi:
                mid = (lo + hi) // 2
                if meets(counter(ratios_at(thresholds[mid]))):
                    hi = mid
                else:
                    lo = mid + 1
        threshold = thresholds[hi]
        chosen = ratios_at(threshold)
        kept = counter(chosen)
        met = meets(kept)
        threshold = None if math.isinf(threshold) else threshold
    outcome.update(mode=mode, threshold=threshold, macs_kept=kept["macs"], params_kept=kept["params"], met=met)
    parts = [f"{name} kept {kept[name]:.3f}" + (f" (target <= {active[name]:g})" if name in active else "")
             for name in ("macs", "params")]
    if not active:
        text = "no target: knee ratios used; " + ", ".join(parts)
    elif met:
        text = {"lower": "knees under budget, ratios lowered to use it: ",
                "raise": "knees over budget, ratios raised: "}[mode] + ", ".join(parts)
    else:
        text = "target not reached even with the largest candidate ratios: " + ", ".join(parts)
    outcome["outcome"] = text
    return chosen, outcome


class _Counter:
    """Kept MACs/params fractions of a ratio set, measured on a pruned copy of the model (cached)."""

    def __init__(self, base: onnx.ModelProto, prune: Callable, settings: Any, fixed: Mapping[str, float]):
        self.base = base
        self.prune = prune
        # the count only depends on how many channels are kept: l1 selects the same counts as any criterion
        self.settings = replace(settings, criterion="l1") if settings.criterion in DATA_CRITERIA else settings
        self.fixed = dict(fixed)
        stats = model_stats(base)
        self.macs, self.params = stats.macs, stats.params
        self.cache: dict[tuple, dict[str, float]] = {}

    def __call__(self, ratios: Mapping[str, float]) -> dict[str, float]:
        full = {**self.fixed, **ratios}
        key = tuple(sorted(full.items()))
        if key not in self.cache:
            graph = to_graph(self.base)
            self.prune(graph, full, self.settings)
            stats = model_stats(to_model(graph, self.base))
            self.cache[key] = {"macs": stats.macs / self.macs if self.macs else 1.0,
                               "params": stats.params / self.params if self.params else 1.0}
        return self.cache[key]


# ---------------------------------------------------------------- the scan


class _Setup:
    """Everything a scan worker needs, picklable: model bytes, calibration arrays, base outputs, options."""

    def __init__(self, model: bytes, reference: bytes | None, arrays: dict[str, np.ndarray],
                 labels: np.ndarray | None, batch_size: int, kept: KeptChannels, metric: str,
                 prune: Callable, settings: Any, recal_options: dict[str, Any]):
        self.model = model
        self.reference = reference
        self.arrays = arrays
        self.labels = labels
        self.batch_size = batch_size
        self.kept = kept
        self.metric = metric
        self.prune = prune
        self.settings = settings
        self.recal_options = recal_options
        self.base_output: np.ndarray | None = None

    @property
    def samples(self) -> int:
        return int(len(next(iter(self.arrays.values())))) if self.arrays else 0


def _setup(base: onnx.ModelProto, ctx: Context, opts: Mapping[str, Any], metric: str, prune: Callable,
           settings: Any) -> _Setup:
    data = ctx.calibration.take(int(opts["auto_samples"])) if hasattr(ctx.calibration, "take") else ctx.calibration
    chunks: dict[str, list[np.ndarray]] = {}
    labels: list[np.ndarray] = []
    for feeds, batch_labels in data.batches():
        for name, value in feeds.items():
            chunks.setdefault(name, []).append(np.asarray(value))
        if batch_labels is not None:
            labels.append(np.asarray(batch_labels))
    if not chunks:
        raise OcompError("--prune-ratio auto: the calibration data is empty")
    arrays = {name: np.concatenate(parts) for name, parts in chunks.items()}
    kept = ctx.kept_channels.copy()
    recal = resolve_options("bnrecal", {})
    recal["samples"] = 10**9  # the scan subset is already cut
    setup = _Setup(base.SerializeToString(), ctx.reference.SerializeToString() if ctx.reference is not None else None,
                   arrays, np.concatenate(labels) if labels else None, int(getattr(data, "batch_size", 32)), kept,
                   metric, prune, settings, recal)
    setup.base_output = _Scanner(setup).run(base)
    return setup


def _session(model: onnx.ModelProto | bytes):
    """One-thread sessions: the scan's figures are bitwise the same whatever the number of jobs."""
    return make_session(model, threads=1)


class _ScanContext(Context):
    def session(self, model):
        return _session(model)


class _Scanner:
    """Evaluates scan candidates: prune one group, recalibrate, measure quality against the base outputs."""

    def __init__(self, setup: _Setup):
        from ocomp.data import DataOptions, dataset_from_arrays

        self.setup = setup
        self.model = onnx.load_from_string(setup.model)
        self.reference = onnx.load_from_string(setup.reference) if setup.reference is not None else None
        self.data = dataset_from_arrays(self.model, setup.arrays, setup.labels,
                                        DataOptions(batch_size=setup.batch_size), source="calibration subset")

    def quality(self, gid: str | None, ratio: float) -> float:
        from .bnrecal import BNRecal

        setup = self.setup
        kept = setup.kept.copy()
        model = self.model
        if gid is not None:
            graph = to_graph(model)
            result = setup.prune(graph, {gid: ratio}, setup.settings, calibration=self.data,
                                 session_factory=_session, opsets=list(model.opset_import))
            kept.record(result.indices)
            model = to_model(graph, self.model)
        # bnrecal (adaptive BN + bias correction) as the pipeline runs it, with one-thread sessions
        graph = to_graph(model)
        ctx = _ScanContext(options=dict(setup.recal_options), calibration=self.data, reference=self.reference,
                           template=model, kept_channels=kept)
        BNRecal().run(graph, ctx)
        return measure(setup.metric, self.run(to_model(graph, model)), setup.base_output, setup.labels)

    def run(self, model: onnx.ModelProto) -> np.ndarray:
        session = _session(model)
        output = model.graph.output[0].name
        return np.concatenate([session.run([output], feeds)[0] for feeds, _ in self.data.batches()])


def measure(metric: str, output: np.ndarray, base: np.ndarray, labels: np.ndarray | None) -> float:
    """Quality of `output` against the base model's `base` (cosine, snr in dB capped at SNR_CAP_DB) or labels
    (top1), with ocomp.metrics' accumulators."""
    if metric == "top1":
        accuracy = Accuracy()
        accuracy.add(output, np.asarray(labels).reshape(-1))
        return accuracy.result()["top1"]
    figures = OutputMetrics()
    figures.add(base, output)
    if metric == "cosine":
        return float(figures.result()["cosine"])
    if figures.noise == 0:
        return SNR_CAP_DB
    return min(SNR_CAP_DB, float(figures.result()["snr_db"])) if figures.norm_a > 0 else -SNR_CAP_DB


_WORKER: dict[str, _Scanner] = {}


def _worker_init(setup: _Setup) -> None:
    _WORKER["scanner"] = _Scanner(setup)


def _worker_task(gid: str | None, ratio: float) -> tuple[str | None, float, float]:
    return gid, ratio, _WORKER["scanner"].quality(gid, ratio)


def _scan(setup: _Setup, tasks: list[tuple[str | None, float]], jobs: int,
          progress: bool) -> dict[tuple[str | None, float], float]:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="prune auto: sensitivity scan", unit="candidate", leave=False,
               disable=not progress)
    results: dict[tuple[str | None, float], float] = {}
    try:
        if jobs <= 1 or len(tasks) <= 1:
            scanner = _Scanner(setup)
            for gid, ratio in tasks:
                results[(gid, ratio)] = scanner.quality(gid, ratio)
                bar.update()
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            context = multiprocessing.get_context("spawn")  # no fork of a process running onnxruntime threads
            with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context,
                                     initializer=_worker_init, initargs=(setup,)) as pool:
                futures = [pool.submit(_worker_task, gid, ratio) for gid, ratio in tasks]
                try:
                    for future in as_completed(futures):
                        gid, ratio, value = future.result()
                        results[(gid, ratio)] = value
                        bar.update()
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    finally:
        bar.close()
    return results


# ---------------------------------------------------------------- rendering


def render_curves(curves: Mapping[str, Mapping[str, Any]], metric: str, budget: Mapping[str, Any]) -> str:
    """A text table: one row a group, its quality at each candidate ratio, knee and chosen ratio."""
    from ocomp.report import table

    if not curves:
        return "no prunable group to scan"
    ratios = next(iter(curves.values()))["ratios"]
    digits = 5 if metric == "cosine" else (2 if metric == "snr" else 3)
    rows = [[gid] + [f"{q:.{digits}f}" for q in c["quality"]] + [f"{c['knee']:g}", f"{c['chosen']:g}"]
            for gid, c in curves.items()]
    head = ["group"] + [f"{r:g}" for r in ratios] + ["knee", "chosen"]
    return (f"sensitivity ({metric} vs ratio)\n" + table(head, rows) + "\n" + budget["outcome"])


def _file_name(group_id: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", group_id).strip("._") or "group"
    name, i = base, 1
    while name in used:
        name, i = f"{base}_{i}", i + 1
    used.add(name)
    return name + ".png"


def write_plots(details: Mapping[str, Any], folder: str | Path) -> list[Path]:
    """One PNG a sensitivity curve of details["auto"] (a prune report's details), knee and chosen ratio marked."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = details.get("auto") or {}
    metric = (details.get("auto_scan") or {}).get("metric", "quality")
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OcompError(f"--prune-plot: cannot create folder {folder}: {exc.strerror or exc}") from None
    written, used = [], set()
    for gid, curve in curves.items():
        x, y = curve["ratios"], curve["quality"]
        fig = Figure(figsize=(5, 3.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(x, y, "o-", color="tab:blue", label=metric)
        if curve.get("monotone") is not None and list(curve["monotone"]) != list(y):
            ax.plot(x, curve["monotone"], "--", color="tab:gray", label="monotone")
        k = x.index(curve["knee"])
        ax.axvline(curve["knee"], color="tab:red", linestyle=":")
        ax.plot([curve["knee"]], [curve["monotone"][k]], "o", color="tab:red", markersize=10, fillstyle="none",
                label=f"knee {curve['knee']:g}")
        if "chosen" in curve:
            c = x.index(curve["chosen"])
            ax.plot([curve["chosen"]], [curve["monotone"][c]], "*", color="tab:green", markersize=12,
                    label=f"chosen {curve['chosen']:g}")
        ax.set_xlabel("ratio of channels removed")
        ax.set_ylabel(metric)
        ax.set_title(gid, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / _file_name(gid, used)
        try:
            fig.savefig(path)
        except OSError as exc:
            raise OcompError(f"--prune-plot: cannot write {path}: {exc.strerror or exc}") from None
        written.append(path)
    return written
