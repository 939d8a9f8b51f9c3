"""Pass `prune`: remove whole output channels of weighted layers and rewire every consumer.

What must change together comes from passes/channels.py (channel groups); how much each channel matters
from passes/importance.py; which channels are exactly constant (and removed first, their constant folded
into the consumer's bias, exactly) from passes/deadchannels.py; the rewrite itself is passes/rewrite.py.
This module decides the kept channels of each group (ratios, rounding) and reports. The saved model is
physically smaller and runs in plain onnxruntime.

Programmatic use (`--prune-ratio auto` builds on it)::

    result = prune_graph(graph, {"layer1.0.conv1": 0.5}, PruneSettings(criterion="l1", multiple=8))
    result.kept["layer1.0.conv1"]          # kept channel indices of that group
    result.indices["layer1.0.conv1.out"]   # kept indices along each tensor whose channel axis shrank
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from ocomp.errors import UsageError
from ocomp.pipeline import Context, Option, Pass, Report, fraction, key_value, positive_int, register

from .autoprune import DEFAULT_RATIOS, METRICS, budget_fraction, ratio_list, run_auto
from .channels import ChannelAnalysis, ChannelGroup, analyze
from .deadchannels import constant_channels, dead_channels
from .importance import CRITERIA, DATA_CRITERIA, activation_scores, scores, select_channels
from .rewrite import Rewriter


def ratio_or_auto(value: Any) -> float | str:
    """A fraction in [0, 1), or the string "auto" (kept as "auto")."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return fraction(value)


ratio_or_auto.__name__ = "fraction|auto"


# ---------------------------------------------------------------- settings and results


# Kept channel counts are rounded up to a multiple of 8 unless told otherwise: onnxruntime's float
# convolutions block channels by 8 (16 with AVX-512) and fall back to a slower path on other counts; the
# W2A8 kernels compute 16 output channels a panel and read input channels 4 at a time, so rounding costs
# them little. Measured (benchmarks/PRUNE_MULTIPLE.md, prune 0.3, against multiple 1): float models run
# at 0.67x (ResNet-20) / 0.79x (PP-OCR cls) the latency, W2A8 models at 1.07x / 0.97x, every pipeline is
# 0.6-2.9 pt more accurate, the file 1.08-1.2x larger. Only the float-activation TernaryConv, whose cost
# is per MAC, gets clearly slower (1.1-1.34x).
DEFAULT_MULTIPLE = 8


@dataclass(frozen=True)
class PruneSettings:
    """How channels are chosen: importance criterion, kept counts rounded up to a multiple, a floor, and
    whether exactly constant channels go first."""

    criterion: str = "l1"
    multiple: int = DEFAULT_MULTIPLE
    min_channels: int = 1
    prune_dead: bool = True

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> "PruneSettings":
        return cls(opts["criterion"], opts["multiple"], opts["min_channels"], opts["dead"])


@dataclass
class GroupResult:
    """What happened to one group."""

    id: str
    size: int
    kept_count: int
    ratio: float
    criterion: str
    dead_removed: int = 0
    note: str = ""
    unrounded: str | None = None  # a tensor rounding cannot align, when the multiple was not applied


@dataclass
class PruneResult:
    """The outcome of `prune_graph`.

    kept: kept channel indices (sorted) of every group that shrank, by group id; indices: kept indices along
    every tensor whose channel axis shrank; groups: one GroupResult per group given a ratio; layers: per-node
    rows as in the report; dead_removed: constant channels removed (and folded); analysis: the channel
    analysis the rewrite used (stale after the rewrite).
    """

    kept: dict[str, np.ndarray] = field(default_factory=dict)
    indices: dict[str, np.ndarray] = field(default_factory=dict)
    groups: list[GroupResult] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    dead_removed: int = 0
    analysis: ChannelAnalysis | None = None


# ---------------------------------------------------------------- the pass


@register
class Prune(Pass):
    """Remove whole output channels of weighted layers and rewire their consumers (structured pruning)."""

    name = "prune"
    options = (
        Option("ratio", ratio_or_auto, 0.3, "fraction of channels removed per channel group, or 'auto': a per-group "
               "ratio from a sensitivity scan on --calib data (Kneedle on each group's quality curve)"),
        Option("criterion", str, "auto", "channel importance: l1, l2 (weight norms), bn (|gamma| of the following "
               "BatchNorm), activation (mean |activation| on --calib data), energy (E[x^2] * ||W||^2 of each "
               "channel where the next layer sums it: its share of that layer's output, on --calib data); auto: "
               "energy with --calib, l1 without", choices=CRITERIA + ("auto",)),
        Option("layer", key_value(fraction), (), "ratio for the group of one layer, NAME=R (repeatable)",
               multiple=True),
        Option("skip", str, (), "leave the group of this layer unchanged (repeatable)", multiple=True),
        Option("min_channels", positive_int, 1, "never keep fewer channels than this in a group"),
        Option("multiple", positive_int, DEFAULT_MULTIPLE, "round kept channel counts up to a multiple of this "
               "(capped at the group's size); 8 suits the W2A8 kernels and onnxruntime's float convolutions, "
               "1 keeps exactly the ratio"),
        Option("dead", bool, True, "remove channels with exactly constant output first, folding them into "
               "the consumer's bias"),
        Option("target_macs", budget_fraction, None, "--prune-ratio auto: keep at most this fraction of the MACs "
               "of the model entering the pass, e.g. 0.5 (0: no target)"),
        Option("target_params", budget_fraction, None, "--prune-ratio auto: keep at most this fraction of the "
               "params (0: no target); without any target the knee ratios are used as they are"),
        Option("auto_ratios", ratio_list, DEFAULT_RATIOS, "--prune-ratio auto: candidate ratios scanned per group "
               "(comma-separated)"),
        Option("auto_samples", positive_int, 256, "--prune-ratio auto: calibration samples used by the scan"),
        Option("auto_metric", str, "cosine", "--prune-ratio auto: quality measured by the scan: cosine (of the "
               "logits vs the unpruned model), snr (dB, same), top1 (accuracy, needs labels)", choices=METRICS),
        Option("jobs", positive_int, 1, "--prune-ratio auto: processes for the sensitivity scan (one thread each)"),
        Option("plot", str, None, "--prune-ratio auto: write one PNG a group's quality curve (knee marked) into "
               "this folder (needs matplotlib: pip install ocomp[plot])"),
    )
    needs = frozenset()

    def run(self, graph: gs.Graph, ctx: Context) -> Report:
        opts = dict(ctx.options)
        report = Report(self.name)
        if opts["criterion"] == "auto":  # data-aware when there is data: it keeps compact nets accurate
            opts["criterion"] = "energy" if ctx.calibration is not None else "l1"
        if opts["criterion"] in DATA_CRITERIA and ctx.calibration is None:
            raise ctx.option_error("criterion", f"'{opts['criterion']}' needs calibration data (--calib)")
        settings = PruneSettings.from_options(opts)
        opsets = list(ctx.template.opset_import) if ctx.template is not None else []
        notes: dict[str, str] = {}
        if opts["ratio"] == "auto":
            result, notes = run_auto(graph, ctx, report, lambda g: self.group_ratios(analyze(g), ctx, report),
                                     prune_graph, settings, opts)
        else:
            for key in ("target_macs", "target_params", "plot"):
                if opts[key]:
                    raise ctx.option_error(key, "needs ratio 'auto'")
            analysis = analyze(graph)
            ratios = self.group_ratios(analysis, ctx, report)
            result = prune_graph(graph, ratios, settings, calibration=ctx.calibration, session_factory=ctx.session,
                                 opsets=opsets, analysis=None if settings.criterion in DATA_CRITERIA else analysis,
                                 progress=ctx.progress)
        ctx.kept_channels.record(result.indices)
        fill_report(report, result, settings.criterion, notes)
        return report

    def group_ratios(self, analysis: ChannelAnalysis, ctx: Context, report: Report) -> dict[str, float | None]:
        """Ratio per prunable group id from the options (ratio, layer, skip); None marks the groups the
        automatic scan decides."""
        opts = ctx.options
        skipped = {g.id for name in opts["skip"] for g in _groups_named(analysis, name, ctx, "skip")}
        overrides: dict[str, tuple[str, float]] = {}
        for name, value in opts["layer"]:
            for g in _groups_named(analysis, name, ctx, "layer"):
                if g.id in overrides and overrides[g.id][1] != value:
                    other = overrides[g.id][0]
                    raise ctx.option_error("layer", f"'{name}' and '{other}' share one channel group ('{g.id}', "
                                           f"they must keep the same channels); give one ratio for it")
                overrides[g.id] = (name, value)
        ratios: dict[str, float | None] = {}
        for g in analysis.groups:
            if g.id in skipped:
                report.skip(g.id, "group", f"group '{g.id}' ({g.size} channels) skipped by the skip option")
                continue
            if g.pinned:
                continue
            ratios[g.id] = overrides[g.id][1] if g.id in overrides else (
                None if opts["ratio"] == "auto" else float(opts["ratio"]))
        return ratios


def _groups_named(analysis: ChannelAnalysis, name: str, ctx: Context, option: str) -> list[ChannelGroup]:
    """The groups of the layer `name` (several when its output channels are split between groups, as a
    conv added to a zero-padded shortcut), else the group with that id."""
    groups = analysis.groups_of_node(name)
    if groups:
        return groups
    try:
        return [analysis.group(name)]
    except KeyError:
        pass
    known = [g.id for g in analysis.groups]
    sample = ", ".join(known[:6]) + (", ..." if len(known) > 6 else "")
    raise ctx.option_error(option, f"no weighted layer or channel group named '{name}' (groups: {sample})")


# ---------------------------------------------------------------- prune_graph


def prune_graph(graph: gs.Graph, ratios: Mapping[str, float], settings: PruneSettings = PruneSettings(), *,
                calibration: Any = None, session_factory: Callable | None = None, opsets=(),
                analysis: ChannelAnalysis | None = None, progress: bool = False) -> PruneResult:
    """Prune the groups named in `ratios` (group id -> fraction of channels removed) in place.

    The kept count of a group is C - round(ratio * C) (at least C - dead channels with
    `settings.prune_dead`), rounded up to a multiple of `settings.multiple` (capped at C), and at least
    `settings.min_channels`. Pinned groups and groups absent from `ratios` are left unchanged. The graph
    must carry inferred shapes. The activation criterion runs the graph over `calibration` (an ocomp
    Dataset or an iterable of feed dicts) with `session_factory` sessions. `analysis` may be passed when
    freshly computed on `graph`.
    """
    if settings.criterion not in CRITERIA:
        raise UsageError(f"unknown prune criterion '{settings.criterion}'; valid: {', '.join(CRITERIA)}")
    if settings.multiple < 1 or settings.min_channels < 1:
        raise UsageError("prune: the multiple and the minimum channel count must be >= 1")
    activations = None
    if settings.criterion in DATA_CRITERIA:
        if calibration is None:
            raise UsageError(f"prune: criterion '{settings.criterion}' needs calibration data")
        analysis = analyze(graph)
        activations = activation_scores(graph, analysis, list(ratios), calibration, session_factory, opsets,
                                        settings.criterion, progress=progress)
    elif analysis is None:
        analysis = analyze(graph)
    for gid, ratio in ratios.items():
        try:
            analysis.group(gid)
        except KeyError:
            raise UsageError(f"prune: no channel group '{gid}'") from None
        if not 0.0 <= float(ratio) < 1.0:
            raise UsageError(f"prune: ratio {ratio} for group '{gid}' is not a fraction in [0, 1)")

    result = PruneResult(analysis=analysis)
    values = constant_channels(graph, analysis) if settings.prune_dead else {}
    folds: list[tuple[ChannelGroup, np.ndarray]] = []
    unaligned = analysis.unalignable_groups() if settings.multiple > 1 else {}
    for group in analysis.groups:
        if group.id not in ratios:
            continue
        ratio = float(ratios[group.id])
        if group.pinned:
            result.groups.append(GroupResult(group.id, group.size, group.size, ratio, "none (group pinned)",
                                             note=f"pinned: {group.pinned}"))
            continue
        dead = dead_channels(graph, group, analysis, values) if values else np.zeros(group.size, dtype=bool)
        score, used, note = scores(group, analysis, settings.criterion, activations)
        # A group in a tensor that rounding cannot align (next to a channel Pad's constants, or to a group
        # owning no tensor of its own) is one summand of that tensor's width: rounding its count aligns
        # nothing, it only keeps channels. The ratio applies.
        shared = unaligned.get(group.id)
        kept = select_channels(score, dead, ratio, 1 if shared else settings.multiple, settings.min_channels)
        removed_dead = np.setdiff1d(np.flatnonzero(dead), kept)
        result.groups.append(GroupResult(group.id, group.size, len(kept), ratio, used, len(removed_dead), note,
                                         shared))
        if len(kept) < group.size:
            result.kept[group.id] = kept
        if len(removed_dead):
            folds.append((group, removed_dead))
            result.dead_removed += len(removed_dead)

    rewriter = Rewriter(graph, analysis)
    before = rewriter.snapshot()
    for group, removed in folds:
        rewriter.fold_constant_channels(group, removed, values)
    result.indices = rewriter.apply(result.kept)
    result.layers = rewriter.layer_rows(before, settings.criterion)
    return result


# ---------------------------------------------------------------- report


def fill_report(report: Report, result: PruneResult, criterion: str, notes: Mapping[str, str] = {}) -> None:
    """Per-layer rows, pinned groups and details; `notes` adds a note to the rows of a group."""
    analysis = result.analysis
    used = {g.id: g.criterion for g in result.groups}  # bn falls back to l1 in groups without a BN
    unrounded = {g.id: g.unrounded for g in result.groups if g.unrounded}
    for row in result.layers:
        note = (f"out {row['out_before']}->{row['out_after']}, in {row['in_before']}->{row['in_after']}; "
                f"group {row['group']}; criterion {used.get(row['group'], 'none (group unchanged)')}")
        if row["group"] in unrounded:
            note += f"; count not rounded to the multiple: {unrounded[row['group']]} cannot be aligned by it"
        if row["group"] in notes:
            note += f"; {notes[row['group']]}"
        report.change(row["name"], row["op"], row["before"], row["after"], row["params_before"],
                      row["params_after"], row["macs_before"], row["macs_after"], note)
    pinned = []
    for g in analysis.groups:
        if not g.pinned:
            continue
        pinned.append(dict(group=g.id, size=g.size, reasons=[dict(node=n, op=op, reason=why)
                                                             for n, op, why in g.pinned_by]))
        for name, op, why in g.pinned_by:
            report.skip(name or g.id, op, f"group '{g.id}' ({g.size} channels) left unchanged: {why}")
    report.details.update(
        criterion=criterion,
        dead_channels_removed=result.dead_removed,
        groups=[dict(id=g.id, channels_before=g.size, channels_after=g.kept_count, ratio=g.ratio,
                     dead_removed=g.dead_removed, criterion=g.criterion, note=g.note, unrounded=g.unrounded)
                for g in result.groups],
        pinned_groups=pinned,
        layers=[dict(row) for row in result.layers],
    )
