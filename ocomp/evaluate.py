"""Accuracy and fidelity of a model on a data set, streamed batch by batch.

Accuracy (top-1, top-5) needs labels. Fidelity compares the first output with a reference
model's: top-1 agreement, cosine similarity and SNR in dB (reference as the signal). All
figures are accumulated per batch (counts and float64 sums), so no outputs are kept.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx

from .errors import OcompError
from .metrics import ModelStats
from .model import CUSTOM_DOMAIN


def uses_custom_ops(model: onnx.ModelProto) -> bool:
    return any(node.domain == CUSTOM_DOMAIN for node in model.graph.node)


def make_session(model: onnx.ModelProto | bytes):
    """An onnxruntime session with the ocomp custom ops when the runtime library is available;
    plain onnxruntime for models without ocomp ops otherwise."""
    proto = model if isinstance(model, onnx.ModelProto) else None
    data = model.SerializeToString() if proto is not None else model
    try:
        from ocomp.runtime import session
    except ImportError:
        session = None
    if session is not None:
        return session(data, log_severity_level=3)  # no ORT warnings about the user's model on the console
    if proto is None:
        proto = onnx.load_from_string(data)
    if uses_custom_ops(proto):
        raise OcompError("the model uses ocomp custom ops (Ternary*) but the ocomp runtime library is not "
                         "available; rebuild/reinstall ocomp")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


class _Fidelity:
    """Running top-1 agreement, cosine and SNR of `output` against `reference`."""

    def __init__(self) -> None:
        self.dot = self.norm_a = self.norm_b = self.noise = 0.0
        self.agree = self.rows = 0

    def add(self, reference: np.ndarray, output: np.ndarray) -> None:
        if reference.shape != output.shape:
            raise OcompError(f"the model's output has shape {output.shape}, the reference's {reference.shape}; "
                             "they cannot be compared")
        a = reference.astype(np.float64).reshape(-1)
        b = output.astype(np.float64).reshape(-1)
        self.dot += float(a @ b)
        self.norm_a += float(a @ a)
        self.norm_b += float(b @ b)
        self.noise += float((a - b) @ (a - b))
        if reference.ndim >= 2 and reference.shape[-1] > 1:
            last = reference.shape[-1]
            self.agree += int(np.sum(reference.reshape(-1, last).argmax(-1) == output.reshape(-1, last).argmax(-1)))
            self.rows += reference.size // last

    def result(self) -> dict[str, float]:
        denom = math.sqrt(self.norm_a * self.norm_b)
        out = {"cosine": self.dot / denom if denom > 0 else float(self.norm_a == self.norm_b),
               "snr_db": 10 * math.log10(self.norm_a / self.noise) if self.noise > 0 else float("inf")}
        if self.rows:
            out = {"agreement": self.agree / self.rows, **out}
        return out


def evaluate(model: onnx.ModelProto, dataset, reference: onnx.ModelProto | None = None,
             progress: bool = False) -> dict[str, Any]:
    """{"samples", "top1"/"top5" (with labels), "agreement"/"cosine"/"snr_db" (with a reference)}."""
    session = make_session(model)
    ref_session = make_session(reference) if reference is not None else None
    output = model.graph.output[0].name
    ref_output = reference.graph.output[0].name if reference is not None else None
    correct1 = correct5 = samples = 0
    fidelity = _Fidelity()
    labelled = dataset.has_labels
    batches = dataset.batches()
    if progress:
        from tqdm import tqdm

        total = -(-len(dataset) // dataset.batch_size)
        batches = tqdm(batches, total=total, desc="evaluate", unit="batch", leave=False)
    for feeds, labels in batches:
        logits = session.run([output], feeds)[0]
        n = len(next(iter(feeds.values())))
        samples += n
        if labelled and labels is not None:
            scores = logits.reshape(n, -1)
            k = min(5, scores.shape[1])
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            hits = top == labels.reshape(-1, 1)
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(axis=1).sum())
        if ref_session is not None:
            fidelity.add(ref_session.run([ref_output], feeds)[0], logits)
    if samples == 0:
        raise OcompError(f"{getattr(dataset, 'source', 'the data set')}: no samples to evaluate")
    result: dict[str, Any] = {"samples": samples}
    if labelled:
        result["top1"] = correct1 / samples
        result["top5"] = correct5 / samples
    if ref_session is not None:
        result.update(fidelity.result())
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
