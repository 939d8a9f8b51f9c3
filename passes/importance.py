"""Channel importance: how much each channel of a channel group matters, by one of the criteria.

- l1 / l2: norms of each producer's output rows (the layer table's matrix view), normalized per producer
  by their mean and summed over the group's producers;
- bn: |gamma| of the group's BatchNorms (falls back to l1 where a group has none, and says so);
- activation: mean |activation| of each producer's output on calibration data (measured with the
  calibration sweep, ocomp/sweep.py).

`select_channels` turns scores into the kept indices of a group.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from ocomp.graph import constant_value, input_at
from ocomp.layers import layer_of
from ocomp.sweep import Calibration, Sweep

from . import channels as ch
from .bnstats import ChannelStats
from .channels import ChannelAnalysis, ChannelGroup

CRITERIA = ("l1", "l2", "bn", "activation", "energy")
DATA_CRITERIA = ("activation", "energy")  # criteria measured on calibration data


def _normalized(score: np.ndarray) -> np.ndarray:
    score = np.asarray(score, dtype=np.float64)
    mean = score.mean() if score.size else 0.0
    return score / mean if mean > 0 else score


def weight_scores(node: gs.Node, p: int) -> np.ndarray:
    """L1 (p=1) or L2 norm of each output channel's weights."""
    rows = np.abs(layer_of(node).rows())
    return rows.sum(axis=1) if p == 1 else np.sqrt((rows ** 2).sum(axis=1))


def scores(group: ChannelGroup, analysis: ChannelAnalysis, criterion: str,
           activations: Mapping[str, np.ndarray] | None) -> tuple[np.ndarray, str, str]:
    """Importance of each channel of `group` (the sum over its members of their normalized scores), the
    criterion actually used and a note saying why it differs from `criterion`."""
    producers = [c for c in group.consumers if c.kind in ch.PRODUCER_KINDS]
    total = np.zeros(group.size)
    note = ""
    if criterion == "bn":
        norms = [c for c in group.consumers if c.kind == ch.NORM and c.node.op == "BatchNormalization"]
        for c in norms:
            gamma = np.abs(np.asarray(constant_value(input_at(c.node, 1)), dtype=np.float64))
            total += _normalized(gamma[analysis.position_matrix(c.tensor, group.id)].mean(axis=1))
        if norms:
            return total, criterion, note
        criterion, note = "l1", "no BatchNormalization in the group: l1 used"
    if criterion == "activation":
        for c in producers:  # a producer's output may hold several groups (split channels): this one's
            total += _normalized(activations[c.tensor][analysis.positions(c.tensor, group.id)])
        return total, criterion, note
    if criterion == "energy":
        exits = [c for c in group.consumers if c.kind in ch.EXIT_KINDS]
        for c in exits:
            total += _normalized(_energy(c, group, analysis, activations[c.tensor]))
        if exits:
            return total, criterion, note
        criterion, note = "l1", "no layer sums the group's channels: l1 used"
    for c in producers:
        rows = weight_scores(c.node, 1 if criterion == "l1" else 2)
        total += _normalized(rows[analysis.positions(c.tensor, group.id)])
    return total, criterion, note


def _energy(consumer, group: ChannelGroup, analysis: ChannelAnalysis, mean_square: np.ndarray) -> np.ndarray:
    """What each channel of `group` contributes to the output energy of the layer that sums it away:
    E[x_c^2] * ||W[:, c]||^2 (activation-weighted weights; the diagonal of the layer's reconstruction error
    when channel c is removed)."""
    layer = layer_of(consumer.node)
    rows = layer.rows()
    per_group = layer.in_channels // layer.groups
    weight_sq = (rows.reshape(rows.shape[0], per_group, -1) ** 2).sum(axis=(0, 2))  # per input position
    positions = analysis.position_matrix(consumer.tensor, group.id)
    return (weight_sq[positions] * mean_square[positions]).sum(axis=1)


def activation_scores(graph: gs.Graph, analysis: ChannelAnalysis, group_ids, calibration: Any,
                      session_factory: Callable | None = None, opsets=(), criterion: str = "activation",
                      progress: bool = False) -> dict[str, np.ndarray]:
    """Per channel of the given groups, on the calibration data, in one forward sweep: mean |activation| of
    every producer output ("activation"), or mean squared activation at every layer input that sums the
    group's channels away ("energy")."""
    wanted: dict[str, int] = {}
    for gid in group_ids:
        group = analysis.group(gid)
        if group.pinned:
            continue
        for c in group.consumers:
            if criterion == "activation" and c.kind in ch.PRODUCER_KINDS:
                wanted[c.tensor] = analysis.layouts[c.tensor].axis
            elif criterion == "energy" and c.kind in ch.EXIT_KINDS:
                wanted[c.tensor] = analysis.layouts[c.tensor].axis
    stats: dict[str, ChannelStats] = {}
    graph.toposort()
    with Sweep(graph, Calibration.read(calibration), session_factory, opsets=opsets) as sweep:
        # the graph is not rewritten while measuring: one run streams every tensor's statistics
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sweep.calibration.samples, desc=f"prune criterion '{criterion}'", unit="image",
                       leave=False)
        for values in sweep.stream(list(wanted)):
            if bar is not None and values:
                bar.update(len(next(iter(values.values()))))
            for name, value in values.items():
                part = ChannelStats.of([value], wanted[name], absolute=criterion == "activation")
                stats[name] = part if name not in stats else stats[name].merge(part)
        if bar is not None:
            bar.close()
    return {name: (s.squares if criterion == "energy" else s.total) / s.count for name, s in stats.items()}


def select_channels(scores: np.ndarray, dead: np.ndarray, ratio: float, multiple: int = 1,
                    min_channels: int = 1) -> np.ndarray:
    """Sorted indices of the channels to keep: dead ones go first, then the lowest scores."""
    size = len(scores)
    remove = int(math.floor(ratio * size + 0.5))
    keep = size - max(remove, int(dead.sum()))
    if multiple > 1:
        keep = min(size, int(math.ceil(keep / multiple)) * multiple)
    keep = min(size, max(keep, min_channels))
    # lexsort: last key first -> dead (False sorts first) then ascending score then index
    order = np.lexsort((np.arange(size), np.asarray(scores, dtype=np.float64), ~dead))
    return np.sort(order[size - keep:])
