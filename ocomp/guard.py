"""The accuracy guard of `compress`: the compressed model's fidelity to the original, measured before
anything is written, against thresholds; a result below them is refused (GuardError) unless forced.

Fidelity is measured on every output, streamed batch by batch (float64 sums, no outputs kept):
- classifier outputs (N, C) with C > 1: top-1 agreement with the original (and, with labels, the top-1
  accuracy of both models on the first output);
- score maps (any other output whose original values all lie in [0, 1], e.g. a detection heat map):
  IoU of the maps thresholded at 0.5, besides cosine and SNR;
- everything else (boxes, embeddings, feature maps): cosine similarity and SNR in dB.
The data is --eval when given, else a held-back tail of --calib (see `hold_back`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import onnx

from .errors import GuardError, OcompError  # noqa: F401 - GuardError is raised by ocomp.api

MAP_THRESHOLD = 0.5
HOLD_BACK_FRACTION = 0.2
HOLD_BACK_MAX = 256
HOLD_BACK_MIN_SET = 50  # smaller calibration sets are not split: the guard measures on the set itself


@dataclass(frozen=True)
class GuardOptions:
    """Thresholds: top-1 agreement (classifier outputs) or thresholded-map IoU (score maps) at least
    `min_agreement`; cosine at least `min_cosine` for other outputs; with labels, a top-1 accuracy drop of
    at most `max_top1_drop` (a fraction: 0.05 is 5 points). `force` writes a failing model anyway."""

    min_agreement: float = 0.85
    min_cosine: float = 0.95
    max_top1_drop: float = 0.05
    force: bool = False

    def __post_init__(self) -> None:
        for name in ("min_agreement", "min_cosine", "max_top1_drop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def hold_back(dataset) -> tuple[Any, Any, str]:
    """(data for the passes, data for the guard, description of the guard data) from --calib alone.

    The last 20% of the calibration set, at most 256 samples, is held back from the passes; a set of
    fewer than 50 samples is not split (the guard then measures on the data the passes saw, and says so).
    With a fixed batch size the held-back part is a multiple of it."""
    total = len(dataset)
    held = min(HOLD_BACK_MAX, int(total * HOLD_BACK_FRACTION))
    fixed = {s.fixed_batch for s in getattr(dataset, "specs", [])} - {None}
    if fixed:
        step = fixed.pop()
        held -= held % step
    if total < HOLD_BACK_MIN_SET or held <= 0 or held >= total:
        return dataset, dataset, f"{total} calibration samples (the set is too small to hold any back)"
    return (dataset.window(0, total - held), dataset.window(total - held, total),
            f"{held} held-back calibration samples")


def quiet_run_options():
    """onnxruntime RunOptions that keep its own log lines of a failed run off the console: the failure
    still raises, and ocomp reports it as one line."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def measure(original: onnx.ModelProto, compressed: onnx.ModelProto, dataset, progress: bool = False) -> dict:
    """{"samples", "outputs": {name: {"cosine", "snr_db", "agreement" | "map_iou"}}, and with labels
    "top1": {"original", "compressed"} for the first output}."""
    from .metrics import Accuracy, OutputMetrics
    from .session import make_session

    names = [o.name for o in original.graph.output]
    if [o.name for o in compressed.graph.output] != names:
        raise OcompError("the compressed model's outputs differ from the original's; cannot measure fidelity")
    sessions = make_session(original), make_session(compressed)
    outputs = {name: OutputMetrics(MAP_THRESHOLD) for name in names}
    accuracy = [Accuracy(), Accuracy()]
    samples = 0
    labelled = dataset.has_labels
    batches = dataset.batches()
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=-(-len(dataset) // dataset.batch_size), desc="accuracy guard", unit="batch",
                       leave=False)
    quiet = quiet_run_options()
    for feeds, labels in batches:
        a, b = sessions[0].run(names, feeds, quiet), sessions[1].run(names, feeds, quiet)
        samples += len(next(iter(feeds.values())))
        for name, ya, yb in zip(names, a, b):
            outputs[name].add(ya, yb)
        if labelled and labels is not None and a[0].ndim == 2 and a[0].shape[1] > 1:
            accuracy[0].add(a[0], labels)
            accuracy[1].add(b[0], labels)
    result: dict[str, Any] = {"samples": samples, "outputs": {n: o.result() for n, o in outputs.items()}}
    if labelled and outputs[names[0]].classifier and samples:
        result["top1"] = {"original": accuracy[0].result()["top1"], "compressed": accuracy[1].result()["top1"]}
    return result


def failures(figures: dict, options: GuardOptions) -> list[str]:
    """What falls below the thresholds, one short phrase each (empty: the guard passes)."""
    found = []
    for name, m in figures["outputs"].items():
        if m.get("non_finite"):
            found.append(f"output '{name}' has NaN/Inf values")
        elif "agreement" in m and m["agreement"] < options.min_agreement:
            found.append(f"output '{name}' top-1 agreement {100 * m['agreement']:.1f}% < "
                         f"{100 * options.min_agreement:g}% (--min-agreement)")
        elif "map_iou" in m and m["map_iou"] < options.min_agreement:
            found.append(f"output '{name}' thresholded-map IoU {100 * m['map_iou']:.1f}% < "
                         f"{100 * options.min_agreement:g}% (--min-agreement)")
        elif "agreement" not in m and "map_iou" not in m and not m["cosine"] >= options.min_cosine:
            found.append(f"output '{name}' cosine {m['cosine']:.4f} < {options.min_cosine:g} (--min-cosine)")
    top1 = figures.get("top1")
    if top1 is not None and top1["original"] - top1["compressed"] > options.max_top1_drop + 1e-12:
        found.append(f"top-1 accuracy {100 * top1['original']:.1f}% -> {100 * top1['compressed']:.1f}% "
                     f"(-{100 * (top1['original'] - top1['compressed']):.1f} pt > "
                     f"{100 * options.max_top1_drop:g} pt, --max-top1-drop)")
    return found


def output_figure(m: dict, top1_word: bool = True) -> str:
    """One output's main fidelity figure: (top-1) agreement, map IoU or cosine."""
    if m.get("non_finite"):
        return "NaN/Inf"
    if "agreement" in m:
        return f"{'top-1 ' if top1_word else ''}agreement {100 * m['agreement']:.1f}%"
    if "map_iou" in m:
        return f"map IoU {100 * m['map_iou']:.1f}%"
    return f"cosine {m['cosine']:.4f}"


def headline(figures: dict) -> str:
    """The first output's main figure, e.g. "agreement 95.2%" (for the per-pass breakdown)."""
    parts = [output_figure(next(iter(figures["outputs"].values())), top1_word=False)]
    if "top1" in figures:
        parts.append(f"top-1 {100 * figures['top1']['compressed']:.1f}%")
    return ", ".join(parts)


def summary(figures: dict) -> str:
    """Every output's figure and the top-1 change, e.g. "'y' agreement 95.2%, top-1 92.0% -> 91.5%"."""
    parts = [f"'{name}' {output_figure(m)}" for name, m in figures.get("outputs", {}).items()]
    if "top1" in figures:
        parts.append(f"top-1 {100 * figures['top1']['original']:.1f}% -> {100 * figures['top1']['compressed']:.1f}%")
    return ", ".join(parts)


def message(found: Sequence[str], where: str, passes: Sequence[str], per_pass: Sequence[str] = (),
            forced: bool = False) -> str:
    """One line: what was lost, on which data, after which passes, and what happens now."""
    after = ", ".join(per_pass) if per_pass else ",".join(passes)
    tail = "written anyway (--force)" if forced else "nothing written (use --force to write anyway)"
    return f"accuracy guard: {'; '.join(found)} on {where} after {after}; {tail}"
