"""Loading, validating and saving ONNX models.

Everything that touches model files lives here: parsing with clear errors,
external data (refused when it points outside the model's folder), input-shape
checks, conversion to and from onnx-graphsurgeon graphs, provenance metadata and
atomic writes. The input file is only ever read.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper

from . import __version__
from .errors import OcompError, UsageError
from .graph import CUSTOM_DOMAIN, STANDARD_DOMAINS

CUSTOM_OPSET_VERSION = 1
MIN_OPSET = 7


def load_model(path: str | os.PathLike, input_shapes: Mapping[str, Sequence[int]] | None = None,
               require_static: bool = True, external_files: list[Path] | None = None) -> onnx.ModelProto:
    """Read, check and shape-infer a model file; raise OcompError with one clear line on bad input.

    `input_shapes` fixes unknown input dimensions (name -> full shape). With
    `require_static`, every input dimension but the first (the batch) must be known.
    `external_files`, when given, receives the external data files the model was read from.
    """
    model = _parse(Path(path))
    files = _load_external_data(model, Path(path))
    if external_files is not None:
        external_files.extend(files)
    if input_shapes:
        set_input_shapes(model, input_shapes)
    check_model(model, str(path))
    if require_static:
        _check_input_dims(model, str(path))
    return infer_shapes(model, str(path))


def path_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be opened for reading ("no such file", "symlink loop", ...), or None."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop (too many levels of symbolic links)"
        if exc.errno == errno.ENOENT:
            return "no such file" + (" (a broken symbolic link)" if os.path.islink(path) else "")
        return exc.strerror or type(exc).__name__
    return None


def _parse(path: Path) -> onnx.ModelProto:
    problem = path_problem(path)
    if problem:
        raise OcompError(f"{path}: {problem}")
    if not path.is_file():
        raise OcompError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OcompError(f"{path}: cannot read the model ({exc.strerror or exc})") from None
    if not data:
        raise OcompError(f"{path}: empty file")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OcompError(f"{path}: not an ONNX model (protobuf parse failed: {reason})") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise OcompError(f"{path}: not an ONNX model (no ir_version, graph or opset_import)")
    if not model.graph.output:
        raise OcompError(f"{path}: not a usable ONNX model (the graph has no outputs)")
    return model


def _external_tensors(model: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    return (t for t in external_data_helper._get_all_tensors(model)
            if t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL)


def _load_external_data(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Read every tensor's external data into the model; the files read, resolved."""
    base = resolve_path(path).parent
    tensors = list(_external_tensors(model))
    files: list[Path] = []
    for tensor in tensors:
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        rel = Path(location)
        if not location or rel.is_absolute() or ".." in rel.parts:
            raise OcompError(f"{path}: tensor '{tensor.name}' has external data at '{location}', "
                             "outside the model's folder; refused")
        problem = path_problem(base / rel)
        if problem and "loop" in problem:
            raise OcompError(f"{path}: external data file '{location}' of tensor '{tensor.name}': {problem}")
        target = resolve_path(base / rel)
        if base not in target.parents:
            raise OcompError(f"{path}: tensor '{tensor.name}' has external data at '{location}', "
                             "which resolves outside the model's folder; refused")
        if not target.is_file():
            raise OcompError(f"{path}: external data file '{location}' of tensor '{tensor.name}' is missing")
        numbers = {}
        for key in ("offset", "length"):
            text = info.get(key, "0")
            if not text.isdigit():  # digits only: no sign, no spaces, no "abc"
                raise OcompError(f"{path}: tensor '{tensor.name}' has external data {key} '{text}', "
                                 "not a non-negative integer")
            numbers[key] = int(text)
        if target.stat().st_size < numbers["offset"] + numbers["length"]:
            raise OcompError(f"{path}: external data file '{location}' is too short for tensor '{tensor.name}'")
        files.append(target)
    if tensors:
        try:
            external_data_helper.load_external_data_for_model(model, str(base))
        except (OSError, ValueError) as exc:
            raise OcompError(f"{path}: cannot read external data: {exc}") from None
    return sorted(set(files))


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in STANDARD_DOMAINS:
            return imp.version
    return 0


def uses_custom_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain not in STANDARD_DOMAINS for n in model.graph.node)


def check_model(model: onnx.ModelProto, what: str = "model") -> None:
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise OcompError(f"{what}: opset {opset} is older than {MIN_OPSET}, which ocomp does not support; "
                         "convert it with onnx.version_converter first")
    valid_types = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
    for tensor in model.graph.initializer:
        if tensor.data_type not in valid_types:
            raise OcompError(f"{what}: initializer '{tensor.name}' has an invalid data type ({tensor.data_type})")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), "invalid model")
        raise OcompError(f"{what}: fails the ONNX checker: {first}") from None


def infer_shapes(model: onnx.ModelProto, what: str = "model") -> onnx.ModelProto:
    """Full shape inference (strict unless the model has custom-domain ops, whose shapes come from value_info)."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=not uses_custom_ops(model),
                                                 data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), "shape inference failed")
        raise OcompError(f"{what}: shape inference failed: {first}") from None


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names` (intermediate values for a probe run)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return probe


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs (not initializers listed as inputs, as old exporters do)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    dims: list[int | str | None] = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def _check_input_dims(model: onnx.ModelProto, what: str) -> None:
    for value in graph_inputs(model):
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
            raise OcompError(f"{what}: input '{value.name}' has no shape; fix it with --input-shape")
        for axis, dim in enumerate(input_dims(value)):
            if axis > 0 and not isinstance(dim, int):
                name = f"'{dim}'" if dim else "unknown"
                raise OcompError(f"{what}: input '{value.name}' has a dynamic dimension {name} at axis {axis}; "
                                 f"only the batch (axis 0) may be dynamic; fix it with "
                                 f"--input-shape {value.name}=1,...")


def set_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int | str]]) -> None:
    """Overwrite input shapes; a string dimension (e.g. "N") stays symbolic."""
    inputs = {v.name: v for v in graph_inputs(model)}
    for name, shape in shapes.items():
        if name not in inputs:
            raise UsageError(f"--input-shape: the model has no input '{name}' (inputs: {', '.join(inputs)})")
        dims = inputs[name].type.tensor_type.shape
        dims.ClearField("dim")
        for size in shape:
            if isinstance(size, str):
                dims.dim.add().dim_param = size
            else:
                dims.dim.add().dim_value = int(size)
    del model.graph.value_info[:]


def resolve_path(path: str | os.PathLike) -> Path:
    """`path` made absolute with symlinks resolved; a symlink loop is a one-line OcompError."""
    try:
        return Path(path).resolve()
    except RuntimeError:  # Python < 3.13 on a symlink loop
        raise OcompError(f"{path}: symlink loop (too many levels of symbolic links)") from None
    except OSError as exc:
        raise OcompError(f"{path}: cannot resolve the path ({exc.strerror or exc})") from None


def _same(a: Path, b: Path) -> bool:
    if resolve_path(a) == resolve_path(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_run_paths(inputs: Sequence[tuple[str, str | os.PathLike]],
                    outputs: Sequence[tuple[str, str | os.PathLike]]) -> None:
    """Before any work: no output may name an input of the run (the model, its external data, data
    sets, the recipe), lie inside an input data folder, or name another output; every output must be
    writable (its folder exists and a file can be created in it). `inputs`/`outputs` are (what, path)."""
    for i, (what, out) in enumerate(outputs):
        dst = Path(out)
        if dst.is_dir():
            raise OcompError(f"{dst}: {what} names a directory")
        for source_what, source in inputs:
            src = Path(source)
            if _same(src, dst):
                raise OcompError(f"{dst}: {what} names {source_what}; refused (a run never overwrites its inputs)")
            if src.is_dir() and resolve_path(src) in resolve_path(dst).parents:
                raise OcompError(f"{dst}: {what} lies inside {source_what} folder; refused (a run never "
                                 "changes its inputs)")
        for other_what, other in outputs[:i]:
            if _same(Path(other), dst):
                raise OcompError(f"{dst}: {what} names the same file as {other_what}")
        check_writable(dst, what)


def check_output_folder(path: str | os.PathLike, what: str,
                        inputs: Sequence[tuple[str, str | os.PathLike]]) -> None:
    """A folder the run writes files into (created if missing): not a file, not an input data folder or
    inside one, and creatable/writable (its nearest existing parent is probed)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OcompError(f"{folder}: {what} is not a folder")
    target = resolve_path(folder)
    for source_what, source in inputs:
        src = Path(source)
        if src.is_dir() and (resolve_path(src) == target or resolve_path(src) in target.parents):
            raise OcompError(f"{folder}: {what} is or lies inside {source_what} folder; refused (a run never "
                             "changes its inputs)")
    existing = target
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OcompError(f"{folder}: {what} cannot be created ('{existing}' is not a folder)")
    check_writable(existing / "probe", what)


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """The output's folder exists and a file can be created in it (tried, not guessed: root and
    read-only file systems make permission bits unreliable)."""
    path = Path(path)
    parent = resolve_path(path).parent
    if not parent.is_dir():
        raise OcompError(f"{path}: {what} directory '{path.parent}' does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise OcompError(f"{path}: cannot write {what} into '{path.parent}' ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_path(input_path: str | os.PathLike, output_path: str | os.PathLike) -> None:
    """The output is not the input, and it can be written."""
    check_run_paths([("the input model", input_path)], [("the output path", output_path)])


def _umask() -> int:
    try:
        with open("/proc/self/status") as status:  # reading it does not change the process's umask
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to a temp file beside `path`, then rename it over `path`. The file gets the mode an
    ordinary write would give it: an existing target keeps its mode, a new one gets 0666 minus the umask.
    The temp file is removed on any exception (the CLI turns SIGTERM/SIGHUP/SIGINT into exceptions)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    if model.ByteSize() >= 2**31 - 1:
        raise OcompError(f"{path}: the model is over 2 GB; ocomp writes single-file models only")
    atomic_write(path, model.SerializeToString())


def add_provenance(model: onnx.ModelProto, passes: list[dict]) -> None:
    """Record the ocomp version and the passes (with their options) in metadata_props."""
    props = {p.key: p.value for p in model.metadata_props}
    history = json.loads(props.get("ocomp.passes", "[]"))
    history.extend(passes)
    props["ocomp.version"] = __version__
    props["ocomp.passes"] = json.dumps(history, sort_keys=True, default=str)
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


# ---------------------------------------------------------------- graphsurgeon


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import into onnx-graphsurgeon; Constant nodes become initializers so passes see one kind of constant."""
    graph = gs.import_onnx(model)
    for node in list(graph.nodes):
        if node.op == "Constant" and node.domain in STANDARD_DOMAINS and "value" in node.attrs:
            value = node.attrs["value"]
            values = value.values if isinstance(value, gs.Constant) else np.asarray(value)
            out = node.outputs[0]
            const = gs.Constant(out.name, np.array(values))
            for consumer in list(out.outputs):
                consumer.inputs = [const if t is out else t for t in consumer.inputs]
            if out in graph.outputs:
                continue  # a constant graph output keeps its Constant node
            node.outputs.clear()
    _bypass_constant_identities(graph)
    graph.cleanup()
    return graph


def _bypass_constant_identities(graph: gs.Graph) -> None:
    """Identity(constant) -> the constant itself (PyTorch exports weights this way), so passes
    see the weight. A constant read by anything else too (a tied weight) keeps its Identity:
    rewriting one of its readers must not change the others."""
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op != "Identity" or node.domain not in STANDARD_DOMAINS or not node.outputs:
                continue
            source, out = node.inputs[0], node.outputs[0]
            if not isinstance(source, gs.Constant) or len(source.outputs) != 1 or out in graph.outputs:
                continue
            const = gs.Constant(out.name, np.asarray(source.values))
            for consumer in list(out.outputs):
                consumer.inputs = [const if t is out else t for t in consumer.inputs]
            node.inputs.clear()
            node.outputs.clear()
            changed = True


def to_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graph, keeping the template's ir_version, opsets and metadata; shapes re-inferred.

    value_info of standard-domain tensors is dropped and recomputed (passes change
    shapes); value_info of custom-op outputs is kept, since ONNX cannot infer those.
    """
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    custom_outputs = {o for n in model.graph.node if n.domain not in STANDARD_DOMAINS for o in n.output}
    kept = [v for v in model.graph.value_info if v.name in custom_outputs]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    model.ir_version = template.ir_version
    opsets = {imp.domain: imp.version for imp in template.opset_import}
    for node in model.graph.node:
        if node.domain == CUSTOM_DOMAIN:
            opsets.setdefault(CUSTOM_DOMAIN, CUSTOM_OPSET_VERSION)
    del model.opset_import[:]
    for domain, version in opsets.items():
        model.opset_import.add(domain=domain, version=version)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(template, field))
    model.metadata_props.extend(template.metadata_props)
    model.graph.name = template.graph.name
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - validation afterwards reports what is wrong
        return model


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)


def signature(model: onnx.ModelProto) -> list[tuple[str, str, int, tuple]]:
    """(kind, name, elem_type, dims) of inputs and outputs: passes must keep it unchanged."""
    rows = []
    for kind, values in (("input", graph_inputs(model)), ("output", list(model.graph.output))):
        for v in values:
            rows.append((kind, v.name, v.type.tensor_type.elem_type, tuple(input_dims(v))))
    return rows
