"""The calibration sweep engine: a model's tensors on the whole calibration set, computed once, in order.

Every data-driven step (bnrecal's reconstruction, BN statistics and bias correction, the activation
pruning criterion, activation-scale calibration) needs the same thing: a layer's real inputs on the
calibration data, computed by the model as it is *now* (already compressed and repaired up to that
layer), and the original model's output of that layer. A `Sweep` walks a graph forward in topological
segments: asked for some tensors, it runs (with onnxruntime, batch by batch) exactly the nodes not run yet
that they need, keeps every tensor a not-yet-run node will read, and frees a tensor once its last reader
has run. So a sweep runs every node once over the data, whatever the number of steps: the cost is linear
in depth. Nodes not run yet may be rewritten between requests (that is how each layer sees the repaired
layers before it).

Tensors are held for the whole calibration set, in memory up to `budget` bytes and beyond that in files
in a temporary directory (deleted when the sweep is closed; read back a batch at a time), so the memory a
sweep takes is bounded by the budget plus one batch, whatever the data set's size.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import OcompError
from .graph import CUSTOM_DOMAIN, is_empty

DEFAULT_BUDGET = 2**30  # bytes of calibration-set activations kept in memory (the rest is spilled)
STREAM_BYTES = 256 * 2**20  # Sweep.stream: bytes of values handed over at a time


class DiskArray:
    """A whole-set array spilled to a file, read and written by slices of samples (axis 0) with plain file
    I/O. Not memory-mapped: pages of a mapped file count in the process's resident memory for as long as the
    mapping lives, which would defeat the budget; read pages here live in the kernel's page cache only."""

    def __init__(self, path: str, shape: Sequence[int], dtype):
        self.path, self.shape, self.dtype = path, tuple(int(d) for d in shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.nbytes = self.row_bytes * self.shape[0]
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.nbytes)

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, key) -> range:
        if isinstance(key, (int, np.integer)):
            key = slice(int(key), int(key) + 1)
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a spilled array is read and written by contiguous slices of samples")
        return range(*key.indices(self.shape[0]))

    def __getitem__(self, key) -> np.ndarray:
        rows = self._rows(key)
        out = np.empty((len(rows),) + self.shape[1:], self.dtype)
        if len(rows):
            view = memoryview(out.reshape(-1).view(np.uint8))
            offset, done = rows.start * self.row_bytes, 0
            while done < out.nbytes:
                done += os.preadv(self._fd, [view[done:]], offset + done)
        return out[0] if isinstance(key, (int, np.integer)) else out

    def __setitem__(self, key, value) -> None:
        rows = self._rows(key)
        data = np.ascontiguousarray(np.broadcast_to(np.asarray(value, self.dtype), (len(rows),) + self.shape[1:]))
        view = memoryview(data.reshape(-1).view(np.uint8))
        offset, done = rows.start * self.row_bytes, 0
        while done < data.nbytes:
            done += os.pwrite(self._fd, view[done:], offset + done)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            try:
                os.remove(self.path)
            except OSError:
                pass


class Store:
    """Whole-calibration-set arrays by tensor name: in memory up to `budget` bytes, spilled to files beyond
    it (`DiskArray`)."""

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget = int(budget)
        self.arrays: dict[str, np.ndarray | DiskArray] = {}
        self.in_memory = 0
        self.peak = 0
        self.spilled = 0  # arrays written to disk so far
        self._folder: tempfile.TemporaryDirectory | None = None
        self._counted: set[str] = set()  # in-memory arrays that count against the budget

    def allocate(self, name: str, shape: Sequence[int], dtype) -> np.ndarray | DiskArray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if self.in_memory + nbytes <= self.budget:
            array = np.empty(shape, dtype)
            self.in_memory += nbytes
            self.peak = max(self.peak, self.in_memory)
            self._counted.add(name)
        else:
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="ocomp-sweep-")
            # (a running count: file names are never reused)
            array = DiskArray(os.path.join(self._folder.name, f"{self.spilled}.bin"), shape, dtype)
            self.spilled += 1
        self.arrays[name] = array
        return array

    def adopt(self, name: str, array: np.ndarray) -> None:
        """Hold an array that lives elsewhere anyway (the calibration inputs): not copied, not counted."""
        self.arrays[name] = array

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def __getitem__(self, name: str) -> np.ndarray | DiskArray:
        return self.arrays[name]

    def free(self, name: str) -> None:
        array = self.arrays.pop(name, None)
        if isinstance(array, DiskArray):
            array.close()
        elif name in self._counted:
            self._counted.discard(name)
            self.in_memory -= array.nbytes

    def close(self) -> None:
        for name in list(self.arrays):
            self.free(name)
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


@dataclass
class Calibration:
    """The calibration set read once: graph-input arrays for all samples and the batch boundaries."""

    arrays: dict[str, np.ndarray]
    bounds: list[tuple[int, int]]
    labels: np.ndarray | None = None

    @property
    def samples(self) -> int:
        return self.bounds[-1][1] if self.bounds else 0

    @classmethod
    def read(cls, dataset: Any, limit: int | None = None) -> "Calibration":
        """From an ocomp Dataset (its first `limit` samples), or an iterable of (feeds, labels) / feeds."""
        if limit is not None and hasattr(dataset, "take"):
            dataset = dataset.take(limit)
        batches = dataset.batches() if hasattr(dataset, "batches") else dataset
        parts: dict[str, list[np.ndarray]] = {}
        labels: list[np.ndarray] = []
        bounds, start = [], 0
        for item in batches:
            feeds, batch_labels = item if isinstance(item, tuple) else (item, None)
            n = len(next(iter(feeds.values())))
            for name, value in feeds.items():
                parts.setdefault(name, []).append(np.asarray(value))
            if batch_labels is not None:
                labels.append(np.asarray(batch_labels))
            bounds.append((start, start + n))
            start += n
        if not bounds:
            raise OcompError("the calibration data is empty")
        return cls({k: np.concatenate(v) for k, v in parts.items()}, bounds,
                   np.concatenate(labels) if labels else None)

    def batches(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """(feeds, labels) batch by batch, as a Dataset gives them."""
        for lo, hi in self.bounds:
            yield ({k: v[lo:hi] for k, v in self.arrays.items()},
                   self.labels[lo:hi] if self.labels is not None else None)


@dataclass
class Stats:
    """What a sweep did: segments run, nodes run, seconds in onnxruntime, peak bytes held, spilled arrays."""

    segments: int = 0
    nodes: int = 0
    seconds: float = 0.0
    peak_bytes: int = 0
    spilled: int = 0
    per_segment: list[tuple[int, float]] = field(default_factory=list)  # (nodes, seconds)


class Sweep:
    """Runs `graph` forward over the calibration set on request (see the module docstring).

    session_factory(model) -> an onnxruntime session (ocomp.session.make_session by default).
    The graph must be toposorted and must not gain or lose nodes while the sweep is used; nodes that have
    not run yet may have their constants changed.
    """

    def __init__(self, graph: gs.Graph, calibration: Calibration, session_factory: Callable | None = None,
                 budget: int = DEFAULT_BUDGET, opsets: Iterable[onnx.OperatorSetIdProto] = ()):
        if session_factory is None:
            from .session import make_session

            session_factory = make_session
        self.graph = graph
        self.calibration = calibration
        self.session_factory = session_factory
        self.store = Store(budget)
        self.opsets = list(opsets)
        self.stats = Stats()
        self.nodes = list(graph.nodes)
        self.position = {id(n): i for i, n in enumerate(self.nodes)}
        self.producer: dict[str, gs.Node] = {}
        self.readers: dict[str, int] = {}  # tensor -> number of nodes not run yet that read it
        for node in self.nodes:
            for out in node.outputs:
                self.producer[out.name] = node
            for name in self._variable_inputs(node):
                self.readers[name] = self.readers.get(name, 0) + 1
        self.ran: set[int] = set()
        self.outputs = {t.name for t in graph.outputs}
        self.held: set[str] = set()  # what the last request returned: kept until the next one
        for name, array in calibration.arrays.items():
            if any(t.name == name for t in graph.inputs):
                self.store.adopt(name, array)

    @staticmethod
    def _variable_inputs(node: gs.Node) -> list[str]:
        return list(dict.fromkeys(t.name for t in node.inputs if isinstance(t, gs.Variable) and not is_empty(t)))

    # ------------------------------------------------------------ requests

    def get(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Whole-set arrays of `names` (each (samples, ...)), running what they need; valid until the next
        request."""
        names = list(dict.fromkeys(names))
        self._release()
        self.held = set(names)
        missing = [n for n in names if n not in self.store]
        if missing:
            self._run(self._needed(missing), missing)
        return {n: self.store[n] for n in names}

    def run_nodes(self, nodes: Sequence[gs.Node], outputs: Sequence[str]) -> Iterator[tuple[int, list[np.ndarray]]]:
        """Run `nodes` (not yet run, e.g. one layer being measured) on the held tensors batch by batch without
        marking them run; yields (batch index, values of `outputs`)."""
        inputs = self._segment_inputs(nodes)
        missing = [n for n in inputs if n not in self.store]
        if missing:
            raise OcompError(f"sweep: tensors {missing[:3]} are not computed yet; request them first")
        session = self.session_factory(self._model(nodes, inputs, outputs))
        for b, (lo, hi) in enumerate(self.calibration.bounds):
            yield b, session.run(list(outputs), {n: np.asarray(self.store[n][lo:hi]) for n in inputs})

    def stream(self, names: Sequence[str], max_bytes: int = STREAM_BYTES) -> Iterator[dict[str, np.ndarray]]:
        """The values of `names` over the calibration set, a slice of samples at a time, with nothing kept
        (for statistics of a graph that is not rewritten meanwhile, e.g. an importance criterion): one
        session runs what they need; slices hold about `max_bytes` of those values (the first slice, one
        sample, measures them). Nodes are not marked run."""
        names = list(dict.fromkeys(names))
        computed = [n for n in names if n not in self.store]
        nodes = self._needed(computed)
        inputs = self._segment_inputs(nodes)
        session = self.session_factory(self._model(nodes, inputs, computed)) if computed else None
        start = time.perf_counter()
        step = 1
        for lo, hi in self.calibration.bounds:
            a = lo
            while a < hi:
                b = min(hi, a + step)
                values = dict(zip(computed, session.run(computed, {n: np.asarray(self.store[n][a:b]) for n in inputs}))
                              if session is not None else [])
                values.update({n: np.asarray(self.store[n][a:b]) for n in names if n not in values})
                if step == 1:  # now the bytes a sample takes are known
                    step = max(1, int(max_bytes // max(sum(v.nbytes for v in values.values()), 1)))
                yield values
                a = b
        self.stats.segments += 1
        self.stats.nodes += len(nodes)
        self.stats.seconds += time.perf_counter() - start

    def close(self) -> None:
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.store.peak)
        self.stats.spilled = self.store.spilled
        self.store.close()

    def __enter__(self) -> "Sweep":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _needed(self, names: list[str]) -> list[gs.Node]:
        """Nodes not run yet that produce `names` and what they need, in topological order."""
        chosen: dict[int, gs.Node] = {}
        stack = list(names)
        while stack:
            name = stack.pop()
            if name in self.store:
                continue
            node = self.producer.get(name)
            if node is None:
                raise OcompError(f"sweep: tensor '{name}' is neither computed by the graph nor a graph input "
                                 "given by the calibration data")
            if id(node) in chosen or id(node) in self.ran:
                continue
            chosen[id(node)] = node
            stack.extend(self._variable_inputs(node))
        return sorted(chosen.values(), key=lambda n: self.position[id(n)])

    def _segment_inputs(self, nodes: Sequence[gs.Node]) -> list[str]:
        made = {o.name for n in nodes for o in n.outputs}
        return list(dict.fromkeys(i for n in nodes for i in self._variable_inputs(n) if i not in made))

    def _run(self, nodes: list[gs.Node], wanted: list[str]) -> None:
        start = time.perf_counter()
        inputs = self._segment_inputs(nodes)
        keep = []
        for node in nodes:
            for out in node.outputs:
                later = self.readers.get(out.name, 0) - sum(
                    1 for n in nodes if out.name in self._variable_inputs(n))
                if out.name in wanted or later > 0 or out.name in self.outputs:
                    keep.append(out.name)
        session = self.session_factory(self._model(nodes, inputs, keep))
        buffers: dict[str, np.ndarray] = {}
        total = self.calibration.samples
        for lo, hi in self.calibration.bounds:
            values = session.run(keep, {n: np.asarray(self.store[n][lo:hi]) for n in inputs})
            for name, value in zip(keep, values):
                if name not in buffers:
                    buffers[name] = self.store.allocate(name, (total,) + value.shape[1:], value.dtype)
                buffers[name][lo:hi] = value
        for node in nodes:
            self.ran.add(id(node))
            for name in self._variable_inputs(node):
                self.readers[name] -= 1
        for name in inputs + keep:
            self._free_if_dead(name)
        seconds = time.perf_counter() - start
        self.stats.segments += 1
        self.stats.nodes += len(nodes)
        self.stats.seconds += seconds
        self.stats.per_segment.append((len(nodes), seconds))
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.store.peak)

    def _free_if_dead(self, name: str) -> None:
        if name in self.held or name in self.outputs:
            return
        if self.readers.get(name, 0) <= 0 and name in self.store:
            self.store.free(name)

    def _release(self) -> None:
        held, self.held = self.held, set()
        for name in held:
            self._free_if_dead(name)

    def _model(self, nodes: Sequence[gs.Node], inputs: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto:
        """The segment as a model: its inputs are held tensors, its outputs what must be kept."""
        tensors = {t.name: t for n in nodes for t in list(n.inputs) + list(n.outputs)}
        ins, outs = [], []
        for name in inputs:
            array = self.store[name]
            ins.append(gs.Variable(name, dtype=array.dtype, shape=("N",) + tuple(array.shape[1:])))
        for name in outputs:
            tensor = tensors[name]
            outs.append(gs.Variable(name, dtype=tensor.dtype if tensor.dtype is not None else np.float32))
        # the segment's nodes are copied, so the graph itself is never rewired
        copies = []
        renamed = {**{v.name: v for v in ins}, **{v.name: v for v in outs}}
        for node in nodes:
            new_out = []
            for t in node.outputs:
                if t.name not in renamed:
                    renamed[t.name] = gs.Variable(t.name, dtype=t.dtype, shape=t.shape)
                new_out.append(renamed[t.name])
            new_in = [renamed.get(t.name, t) if isinstance(t, gs.Variable) and not is_empty(t) else t
                      for t in node.inputs]
            copies.append(gs.Node(node.op, node.name, dict(node.attrs), new_in, new_out, domain=node.domain))
        sub = gs.Graph(nodes=copies, inputs=ins, outputs=outs, opset=self._opset())
        model = gs.export_onnx(sub, do_type_check=False)
        del model.opset_import[:]
        model.opset_import.extend(self.opsets or [onnx.helper.make_opsetid("", self._opset())])
        if not any(o.domain == CUSTOM_DOMAIN for o in model.opset_import) and \
                any(n.domain == CUSTOM_DOMAIN for n in copies):
            model.opset_import.append(onnx.helper.make_opsetid(CUSTOM_DOMAIN, 1))
        return model

    def _opset(self) -> int:
        for o in self.opsets:
            if o.domain in ("", "ai.onnx"):
                return int(o.version)
        return int(getattr(self.graph, "opset", 17) or 17)
