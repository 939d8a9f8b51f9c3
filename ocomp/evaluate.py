"""Accuracy and fidelity of a model on a data set, streamed batch by batch.

Accuracy (top-1, top-5) needs labels. Fidelity compares the first output with a reference
model's: top-1 agreement, cosine similarity and SNR in dB (reference as the signal). All
figures are accumulated per batch (counts and float64 sums), so no outputs are kept.
"""

from __future__ import annotations

import math
from typing import Any

import onnx

from .errors import OcompError
from .metrics import Accuracy, ModelStats, OutputMetrics
from .session import make_session


def evaluate(model: onnx.ModelProto, dataset, reference: onnx.ModelProto | None = None,
             progress: bool = False) -> dict[str, Any]:
    """{"samples", "top1"/"top5" (with labels), "agreement"/"cosine"/"snr_db" (with a reference)}."""
    session = make_session(model)
    ref_session = make_session(reference) if reference is not None else None
    output = model.graph.output[0].name
    ref_output = reference.graph.output[0].name if reference is not None else None
    accuracy, fidelity = Accuracy(), OutputMetrics()
    samples = 0
    labelled = dataset.has_labels
    batches = dataset.batches()
    if progress:
        from tqdm import tqdm

        total = -(-len(dataset) // dataset.batch_size)
        batches = tqdm(batches, total=total, desc="evaluate", unit="batch", leave=False)
    for feeds, labels in batches:
        logits = session.run([output], feeds)[0]
        samples += len(next(iter(feeds.values())))
        if labelled and labels is not None:
            accuracy.add(logits, labels)
        if ref_session is not None:
            try:
                fidelity.add(ref_session.run([ref_output], feeds)[0], logits)
            except ValueError:
                raise OcompError(f"the model's output has shape {logits.shape}, the reference's differs; "
                                 "they cannot be compared") from None
    if samples == 0:
        raise OcompError(f"{getattr(dataset, 'source', 'the data set')}: no samples to evaluate")
    result: dict[str, Any] = {"samples": samples}
    if labelled:
        result.update(accuracy.result())
    if ref_session is not None:
        figures = fidelity.result()
        result.update({k: figures[k] for k in ("agreement", "cosine", "snr_db", "non_finite") if k in figures})
    return result


# ---------------------------------------------------------------- rendering


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


_ROWS = (("top-1 accuracy", "top1", _pct), ("top-5 accuracy", "top5", _pct),
         ("top-1 agreement", "agreement", _pct), ("cosine", "cosine", lambda v: _num(v, 5)),
         ("SNR (dB)", "snr_db", lambda v: _num(v, 2)))


def render_single(result: dict[str, Any]) -> str:
    from .report import table

    rows = [(label, fmt(result[key])) for label, key, fmt in _ROWS if key in result]
    return table(("metric", "value"), [("samples", result.get("samples", 0))] + rows)


def render_evaluation(evaluation: dict[str, dict[str, Any]], before: ModelStats, after: ModelStats) -> str:
    """Original vs compressed, side by side: accuracy, fidelity, params, MACs, file size."""
    from .report import human, ratio, table

    original, compressed = evaluation.get("original", {}), evaluation.get("compressed", {})
    rows: list[tuple[str, str, str, str]] = []
    for label, key, fmt in _ROWS:
        if key not in original and key not in compressed:
            continue
        a, b = original.get(key), compressed.get(key)
        if key in ("agreement", "cosine", "snr_db") and a is None:
            a = {"agreement": 1.0, "cosine": 1.0, "snr_db": float("inf")}[key]  # the original vs itself
        change = ""
        if key in ("top1", "top5") and a is not None and b is not None:
            change = f"{100 * (b - a):+.2f} pt"
        rows.append((label, fmt(a), fmt(b), change))
    rows.append(("params", human(before.params), human(after.params), ratio(before.params, after.params)))
    rows.append(("MACs", human(before.macs), human(after.macs), ratio(before.macs, after.macs)))
    if before.file_size is not None and after.file_size is not None:
        rows.append(("file size", human(before.file_size, "B"), human(after.file_size, "B"),
                     ratio(before.file_size, after.file_size)))
    samples = compressed.get("samples", original.get("samples", 0))
    return f"evaluation on {samples} samples\n" + table(("", "original", "compressed", "change"), rows)
