"""Plain-text rendering of pass reports, model statistics and comparisons."""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

from .guard import summary
from .metrics import ModelStats
from .pipeline import Report


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as the strings "inf", "-inf", "nan" (e.g. the SNR of
    identical outputs): what ocomp writes stays strict JSON that every parser accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_text(value: Any) -> str:
    """Strict JSON (no Infinity/NaN tokens), indented; objects without a JSON form become strings."""
    return json.dumps(json_safe(json.loads(json.dumps(value, default=str))), indent=2, allow_nan=False)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A fixed-width text table; `align` is one 'l'/'r' per column (default: first left, rest right)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)
    lines = []
    for n, row in enumerate(cells):
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.2f}{suffix}{unit}"
        n /= 1000.0
    return str(n)


def ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}x" if after else "-"


def render_report(report: Report) -> str:
    lines = [f"== pass {report.pass_name} ({report.seconds:.2f} s)"]
    if report.layers:
        rows = [(c.name, c.op, c.before, c.after, f"{human(c.params_before)} -> {human(c.params_after)}",
                 f"{human(c.macs_before)} -> {human(c.macs_after)}" if c.macs_before or c.macs_after else "",
                 c.note) for c in report.layers]
        lines.append(table(("layer", "op", "before", "after", "params", "MACs", "note"), rows, "lllllll"))
    else:
        lines.append("no layer changed")
    if report.skipped:
        lines.append(f"left unchanged ({len(report.skipped)}):")
        lines.extend(f"  {s.name} [{s.op}]: {s.reason}" for s in report.skipped)
    for key, value in report.details.items():
        if isinstance(value, (str, int, float)):
            lines.append(f"{key}: {_cell(value)}")
    return "\n".join(lines)


def render_summary(reports: Sequence[Report], before: ModelStats, after: ModelStats,
                   latency: dict[str, Any] | None = None, guard: dict[str, Any] | None = None) -> str:
    """Params, MACs, weight bytes, file size and (measured) latency, original vs compressed; the guard's verdict."""
    rows = [("params", human(before.params), human(after.params), ratio(before.params, after.params)),
            ("MACs (batch 1)", human(before.macs), human(after.macs), ratio(before.macs, after.macs)),
            ("weight bytes", human(before.weight_bytes, "B"), human(after.weight_bytes, "B"),
             ratio(before.weight_bytes, after.weight_bytes))]
    if before.file_size and after.file_size:
        rows.append(("file size", human(before.file_size, "B"), human(after.file_size, "B"),
                     ratio(before.file_size, after.file_size)))
    notes = []
    if latency is not None and "original" in latency and "compressed" in latency:
        threads = latency.get("threads")
        rows.append((f"latency (batch {latency.get('batch', 1)}, {threads or 'default'} thread"
                     f"{'' if threads == 1 else 's'})*", f"{1000 * latency['original']:#.3g} ms",
                     f"{1000 * latency['compressed']:#.3g} ms",
                     f"{latency['original'] / latency['compressed']:.2f}x" if latency["compressed"] > 0 else "-"))
        runs = min(latency.get("original_runs", 0), latency.get("compressed_runs", 0))
        notes.append(f"* measured on this machine: median of at least {runs} runs on random inputs after a "
                     "warm-up (--no-latency skips it)")
    elif latency is not None and "skipped" in latency:
        notes.append(f"latency not measured: {latency['skipped']}")
    if guard is not None:
        if guard.get("passed"):
            notes.append(f"accuracy guard: passed on {guard['data']} ({summary(guard)})")
        elif guard.get("message"):
            notes.append(f"accuracy guard: FAILED on {guard['data']}, written anyway (--force): "
                         + "; ".join(guard.get("failures", [])))
    passes = ", ".join(f"{r.pass_name} ({r.seconds:.2f} s)" for r in reports)
    if before.unknown_macs:
        notes.append(unknown_macs_note(before))
    note = "".join(f"\n{n}" for n in notes)
    return f"== summary: {passes}\n" + table(("", "original", "compressed", "ratio"), rows) + note


def unknown_macs_note(stats: ModelStats) -> str:
    names = ", ".join(stats.unknown_macs[:3]) + (", ..." if len(stats.unknown_macs) > 3 else "")
    return (f"note: MACs undercounted for {len(stats.unknown_macs)} layer(s) with unknown output dims ({names}; "
            "unknown dims counted as 1): fix the input shape with --input-shape NAME=D0,D1,...")


def render_stats(stats: ModelStats) -> str:
    lines = ["ops: " + ", ".join(f"{op} x{n}" for op, n in stats.ops.items())]
    rows = [(la.name, la.op, "x".join(map(str, la.weight_shape)), "x".join(map(str, la.output_shape)),
             human(la.params), human(la.macs), la.weight_dtype, f"{la.weight_bits:g}") for la in stats.layers]
    lines.append(table(("layer", "op", "weight", "output", "params", "MACs", "dtype", "bits/w"), rows, "llllrrlr"))
    lines.append(f"total params {stats.params:,} ({human(stats.params)}), MACs at batch 1 {stats.macs:,} "
                 f"({human(stats.macs)}), weight bytes {stats.weight_bytes:,}"
                 + (f", file size {stats.file_size:,} bytes" if stats.file_size is not None else ""))
    if stats.unknown_macs:
        lines.append(unknown_macs_note(stats))
    return "\n".join(lines)


def render_comparison(results: dict[str, dict[str, float]], n: int) -> str:
    rows = []
    for name, m in results.items():
        rows.append((name, f"{m['max_abs']:.3g}", f"{m['max_rel']:.3g}", f"{m['cosine']:.6f}",
                     f"{m['snr_db']:.1f}", f"{m['agreement']:.4f}" if "agreement" in m else "-"))
    return (f"compared on {n} input(s)\n" +
            table(("output", "max abs", "max rel", "cosine", "SNR dB", "top-1 agree"), rows))
