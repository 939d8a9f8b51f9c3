"""Pass registry, option declarations, reports and the pass pipeline.

A pass declares its options once (`Option`); the CLI flags (`--prune-ratio`),
the recipe file (`[prune] ratio = 0.3`) and the Python API
(`compress(..., options={"prune": {"ratio": 0.3}})`) are all derived from that.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import OcompError, PassError, UsageError
from .metrics import model_stats
from .model import check_model, infer_shapes, signature, to_graph, to_model


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """One typed option of a pass. `type` parses a string (CLI) and checks a value (recipe/API)."""

    name: str
    type: Callable[[Any], Any]
    default: Any
    help: str
    multiple: bool = False  # repeatable on the CLI; a list in the recipe/API
    choices: tuple[str, ...] | None = None

    def flag(self, pass_name: str) -> str:
        return f"--{pass_name}-{self.name.replace('_', '-')}"

    def convert(self, value: Any) -> Any:
        if self.multiple:
            if isinstance(value, Mapping):  # recipe tables like `layer = {conv1 = 0.5}`
                value = [f"{k}={v}" for k, v in value.items()]
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                value = [value]
            return tuple(self._one(v) for v in value)
        return self._one(value)

    def _one(self, value: Any) -> Any:
        if self.type is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(f"expected true/false, got {value!r}")
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"expected true/false, got {value!r}")
            return bool(value)
        if isinstance(value, (bool, np.bool_)):
            raise ValueError(f"expected {getattr(self.type, '__name__', 'a value')}, got {value!r}")
        if self.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        converted = self.type(value)
        if self.choices is not None and converted not in self.choices:
            raise ValueError(f"expected one of {', '.join(self.choices)}, got {value!r}")
        return converted


def key_value(value_type: Callable[[str], Any]) -> Callable[[Any], tuple[str, Any]]:
    """Option type for NAME=VALUE pairs, e.g. `--prune-layer conv1=0.5`."""

    def parse(text: Any) -> tuple[str, Any]:
        if isinstance(text, tuple) and len(text) == 2:
            return str(text[0]), value_type(text[1])
        name, sep, value = str(text).rpartition("=")
        if not sep or not name:
            raise ValueError(f"expected NAME=VALUE, got {text!r}")
        return name, value_type(value)

    parse.__name__ = f"NAME={getattr(value_type, '__name__', 'VALUE').upper()}"
    return parse


def fraction(value: Any) -> float:
    number = float(value)
    if not 0.0 <= number < 1.0:
        raise ValueError(f"expected a fraction in [0, 1), got {value!r}")
    return number


def whole_number(minimum: int) -> Callable[[Any], int]:
    """Option type: a whole number >= `minimum` (floats only when integral; booleans are refused earlier)."""

    def convert(value: Any) -> int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected a whole number, got {value!r}")
        number = int(value)
        if number < minimum:
            raise ValueError(f"expected a whole number >= {minimum}, got {value!r}")
        return number

    convert.__name__ = "int"
    return convert


non_negative_int = whole_number(0)
positive_int = whole_number(1)


def mebibytes(value: Any) -> float:
    """Option type: a size in MiB, >= 0."""
    number = float(value)
    if not number >= 0:
        raise ValueError(f"expected a size in MiB >= 0, got {value!r}")
    return number


mebibytes.__name__ = "MiB"


class OptionError(UsageError):
    """A pass option the pass cannot use. The message names the option as the pass declares it
    (`option 'skip' of pass 'ternary': ...`); the CLI shows the flag instead (`flag_message`)."""

    def __init__(self, pass_name: str, option: str, problem: str):
        self.pass_name, self.option, self.problem = pass_name, option, problem
        super().__init__(f"option '{option}' of pass '{pass_name}': {problem}")

    def flag_message(self) -> str:
        return f"--{self.pass_name}-{self.option.replace('_', '-')}: {self.problem}"


# ---------------------------------------------------------------- reports


@dataclass
class LayerChange:
    name: str
    op: str
    before: str
    after: str
    params_before: int
    params_after: int
    macs_before: int = 0
    macs_after: int = 0
    note: str = ""


@dataclass
class Skipped:
    name: str
    op: str
    reason: str


@dataclass
class Report:
    """What a pass changed: per-layer rows, the nodes it declined and why, totals, pass-specific details."""

    pass_name: str
    layers: list[LayerChange] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def change(self, name: str, op: str, before: Any, after: Any, params_before: int, params_after: int,
               macs_before: int = 0, macs_after: int = 0, note: str = "") -> None:
        self.layers.append(LayerChange(name, op, _fmt(before), _fmt(after), int(params_before), int(params_after),
                                       int(macs_before), int(macs_after), note))

    def skip(self, name: str, op: str, reason: str) -> None:
        self.skipped.append(Skipped(name, op, reason))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=_json_default))


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ---------------------------------------------------------------- passes


@dataclass
class KeptChannels:
    """What pruning left: for every tensor whose channel axis shrank, the kept channel indices relative to
    the original model (composed over several prune runs). bnrecal maps channels back to the original
    with it."""

    by_tensor: dict[str, np.ndarray] = field(default_factory=dict)

    def get(self, tensor: str, default: Any = None) -> np.ndarray | None:
        return self.by_tensor.get(tensor, default)

    def __contains__(self, tensor: str) -> bool:
        return tensor in self.by_tensor

    def record(self, indices: Mapping[str, np.ndarray]) -> None:
        """Tensors shrank to `indices` of their current channels."""
        for name, idx in indices.items():
            previous = self.by_tensor.get(name)
            self.by_tensor[name] = np.asarray(previous)[idx] if previous is not None else np.asarray(idx)

    def copy(self) -> "KeptChannels":
        return KeptChannels({k: np.asarray(v).copy() for k, v in self.by_tensor.items()})


@dataclass
class Context:
    """What a pass may use besides the graph. Passes never load/save files, parse flags or print."""

    options: dict[str, Any] = field(default_factory=dict)
    calibration: Any = None  # ocomp.data.Dataset or None
    reference: onnx.ModelProto | None = None  # the original (input) model
    template: onnx.ModelProto | None = None  # the model the current graph was imported from
    history: list[str] = field(default_factory=list)  # passes that ran before this one
    kept_channels: KeptChannels = field(default_factory=KeptChannels)  # left by prune, read by bnrecal
    progress: bool = False
    threads: int | None = None  # onnxruntime intra-op threads for the sessions passes make (None: default)
    pass_name: str = ""

    def option_error(self, option: str, problem: str) -> OptionError:
        """An error about one of the running pass's options (the CLI names the flag)."""
        return OptionError(self.pass_name, option, problem)

    def export(self, graph: gs.Graph) -> onnx.ModelProto:
        """The current graph as a shape-inferred model (the graph is cleaned up and sorted)."""
        if self.template is None:
            raise RuntimeError("Context.export needs a template model")
        return to_model(graph, self.template)

    def session(self, model: onnx.ModelProto | bytes):
        """An onnxruntime session (ocomp's ops registered) with the context's thread count."""
        from .session import make_session

        return make_session(model, threads=self.threads)


class Pass:
    """Base class: set `name`, `options`, `needs`, implement `run`."""

    name: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    needs: ClassVar[frozenset[str]] = frozenset()  # subset of {"calibration", "reference"}

    def run(self, graph: gs.Graph, ctx: Context) -> Report:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"pass name {cls.name!r} is empty or taken")
    names = [o.name for o in cls.options]
    if len(set(names)) != len(names):
        raise ValueError(f"pass {cls.name!r} declares an option twice")
    REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    import ocomp.passes  # noqa: F401 - importing registers the passes

    return REGISTRY


def parse_pass_list(text: str | Sequence[str]) -> list[str]:
    names = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    known = registry()
    for name in names:
        if name not in known:
            raise UsageError(f"unknown pass '{name}'; valid passes: {', '.join(sorted(known))}")
    if not names:
        raise UsageError(f"no passes given; valid passes: {', '.join(sorted(known))}")
    return names


def resolve_options(pass_name: str, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults overlaid with `given`, each value converted by its declaration; unknown names are usage errors."""
    cls = registry()[pass_name]
    declared = {o.name: o for o in cls.options}
    resolved = {o.name: o.default for o in cls.options}
    for key, value in (given or {}).items():
        name = key.replace("-", "_")
        if name not in declared:
            valid = ", ".join(sorted(declared)) or "none"
            raise UsageError(f"pass '{pass_name}' has no option '{key}'; its options: {valid}")
        try:
            resolved[name] = declared[name].convert(value)
        except (ValueError, TypeError) as exc:
            raise OptionError(pass_name, name, str(exc)) from None
    return resolved


# ---------------------------------------------------------------- running


@dataclass
class PipelineResult:
    model: onnx.ModelProto
    reports: list[Report]


def run_passes(model: onnx.ModelProto, passes: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None,
               *, calibration: Any = None, reference: onnx.ModelProto | None = None,
               progress: bool = False, kept_channels: KeptChannels | None = None,
               threads: int | None = None) -> PipelineResult:
    """Run passes in order on a (loaded, shape-inferred) model; each result is checked before the next runs."""
    options = dict(options or {})
    unknown = set(options) - set(passes)
    if unknown:
        raise UsageError(f"options given for passes not in the pipeline: {', '.join(sorted(unknown))}")
    resolved = {name: resolve_options(name, options.get(name)) for name in passes}
    reference = reference if reference is not None else model
    expected = signature(model)
    kept_channels = kept_channels if kept_channels is not None else KeptChannels()
    reports: list[Report] = []
    history: list[str] = []
    for name in passes:
        cls = registry()[name]
        if "calibration" in cls.needs and calibration is None:
            raise UsageError(f"pass '{name}' needs calibration data: give --calib")
        ctx = Context(options=resolved[name], calibration=calibration, reference=reference, template=model,
                      history=list(history), kept_channels=kept_channels, progress=progress, pass_name=name,
                      threads=threads)
        before = model_stats(model)
        start = time.perf_counter()
        graph = to_graph(model)
        report = cls().run(graph, ctx)
        model = _checked(ctx.export(graph), name, history, expected)
        report.seconds = time.perf_counter() - start
        report.options = resolved[name]
        after = model_stats(model)
        report.totals.update(params_before=before.params, params_after=after.params,
                             macs_before=before.macs, macs_after=after.macs,
                             weight_bytes_before=before.weight_bytes, weight_bytes_after=after.weight_bytes)
        reports.append(report)
        history.append(name)
    return PipelineResult(model, reports)


def _checked(model: onnx.ModelProto, name: str, history: list[str], expected) -> onnx.ModelProto:
    where = f"pass '{name}' (after: {', '.join(history) or 'none'})"
    try:
        check_model(model, where)
        model = infer_shapes(model, where)
    except OcompError as exc:
        raise PassError(f"{exc} -- this is a bug in ocomp, please report it") from None
    if signature(model) != expected:
        raise PassError(f"{where} changed the model's inputs/outputs -- this is a bug in ocomp, please report it")
    return model
