"""Fuzz: random single-field corruptions of a small compressed model and of calibration files, run through
`inspect`, `compare` and `compress`. Every run ends with exit 0 or with one `error:` line and exit 1/2/3,
never a traceback or an "internal error", and no input file changes. Seeded; the case count is printed
and recorded (`record_property("cases", ...)`)."""

from __future__ import annotations

import hashlib
import io
import random
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import AttributeProto, TensorProto, helper

import zoo
from ocomp.cli import main

SEED = 14
MODEL_CASES = 150
DATA_CASES = 80


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(args: list, inputs: list[Path], case: str) -> int:
    before = {p: _sha(p) for p in inputs}
    result = CliRunner().invoke(main, [str(a) for a in args])
    text = result.stdout + result.stderr
    assert "Traceback" not in text, (case, args, text)
    assert result.exit_code in (0, 1, 2, 3), (case, args, result.exit_code, text, result.exception)
    if result.exit_code:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, args, result.stderr)
        assert "internal error" not in lines[0], (case, args, lines[0])
    for path, digest in before.items():
        assert _sha(path) == digest, (case, args, f"{path} changed")
    return result.exit_code


# ---------------------------------------------------------------- model corruptions


def _corrupt_model(model: onnx.ModelProto, rng: random.Random) -> str:
    """Change one field of `model` in place; return what was changed."""
    graph = model.graph
    kind = rng.choice(["node_attr", "node_attr", "node_attr", "node_io", "node_op", "init_dims", "init_type",
                       "init_bytes", "init_bytes", "value_type", "model"])
    if kind == "model":
        field, value = rng.choice([("ir_version", rng.choice([0, 1, 99])), ("opset", rng.choice([0, 5, 999])),
                                   ("custom_opset", rng.choice([0, 2])), ("graph_name", "")])
        if field == "ir_version":
            model.ir_version = value
        elif field == "opset":
            next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = value
        elif field == "custom_opset":
            for o in model.opset_import:
                if o.domain == "ocomp":
                    o.version = value
        else:
            graph.name = value
        return f"model {field}={value}"
    if kind.startswith("node"):
        custom = [n for n in graph.node if n.domain == "ocomp"]
        node = rng.choice(custom if custom and rng.random() < 0.7 else list(graph.node))
        where = f"node {node.name} ({node.op_type})"
        if kind == "node_op":
            field = rng.choice(["op_type", "domain"])
            value = rng.choice(["TernaryConv", "TernaryGemm", "Conv", "Bogus", ""] if field == "op_type"
                               else ["", "ocomp", "bogus"])
            setattr(node, field, value)
            return f"{where} {field}={value!r}"
        if kind == "node_io":
            names = [t.name for t in graph.initializer] + [v.name for v in graph.value_info] + ["", "nosuch"]
            slot = rng.randrange(len(node.input))
            node.input[slot] = rng.choice(names)
            return f"{where} input[{slot}]={node.input[slot]!r}"
        if not node.attribute or rng.random() < 0.15:
            node.attribute.append(helper.make_attribute(rng.choice(["bogus", "group", "pads"]),
                                                        rng.choice([3, [1, 2], "x"])))
            return f"{where} added attribute {node.attribute[-1].name}"
        attr = rng.choice(list(node.attribute))
        action = rng.choice(["remove", "type", "value"])
        if action == "remove":
            node.attribute.remove(attr)
            return f"{where} removed {attr.name}"
        if action == "type":
            replacement = helper.make_attribute(attr.name, rng.choice(["3,3", 2.5, 7, [1.5, 2.5]]))
            attr.CopyFrom(replacement)
            return f"{where} {attr.name} retyped to {AttributeProto.AttributeType.Name(attr.type)}"
        if attr.type == AttributeProto.INTS and attr.ints:
            index = rng.randrange(len(attr.ints))
            attr.ints[index] = rng.choice([0, -1, -7, 1 << 20, 1 << 40, attr.ints[index] + 1])
            return f"{where} {attr.name}[{index}]={attr.ints[index]}"
        if attr.type == AttributeProto.INT:
            attr.i = rng.choice([0, -1, 3, 1 << 40])
            return f"{where} {attr.name}={attr.i}"
        if attr.type == AttributeProto.FLOAT:
            attr.f = rng.choice([float("nan"), -1.0, 1e30])
            return f"{where} {attr.name}={attr.f}"
        attr.CopyFrom(helper.make_attribute(attr.name, [0, 0]))
        return f"{where} {attr.name}=[0, 0]"
    if kind.startswith("init"):
        tensor = rng.choice(list(graph.initializer))
        where = f"initializer {tensor.name}"
        if kind == "init_dims" and tensor.dims:
            index = rng.randrange(len(tensor.dims))
            tensor.dims[index] = rng.choice([0, -1, 1 << 31, tensor.dims[index] + 1, max(1, tensor.dims[index] - 1)])
            return f"{where} dims[{index}]={tensor.dims[index]}"
        if kind == "init_type":
            tensor.data_type = rng.choice([TensorProto.UINT8, TensorProto.FLOAT16, TensorProto.INT64,
                                           TensorProto.STRING, 99])
            return f"{where} data_type={tensor.data_type}"
        if tensor.raw_data:
            data = bytearray(tensor.raw_data)
            action = rng.choice(["truncate", "flip", "empty"])
            if action == "truncate":
                data = data[: rng.randrange(len(data))]
            elif action == "flip":
                index = rng.randrange(len(data))
                data[index] ^= 0xFF
            else:
                data = bytearray()
            tensor.raw_data = bytes(data)
            return f"{where} raw_data {action}"
        tensor.dims.append(2)
        return f"{where} extra dim"
    value = rng.choice(list(graph.input) + list(graph.output))
    dims = value.type.tensor_type.shape.dim
    if dims and rng.random() < 0.6:
        index = rng.randrange(len(dims))
        dims[index].dim_value = rng.choice([0, 1, 5, 1 << 20])
        return f"value {value.name} dim[{index}]={dims[index].dim_value}"
    value.type.tensor_type.elem_type = rng.choice([TensorProto.INT64, TensorProto.DOUBLE, TensorProto.UINT8])
    return f"value {value.name} elem_type={value.type.tensor_type.elem_type}"


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    model = zoo.build("resnet", folded=True)
    onnx.save(model, folder / "src.onnx")
    result = CliRunner().invoke(main, ["compress", str(folder / "src.onnx"), "-o", str(folder / "small.onnx"),
                                       "--passes", "ternary", "--no-latency", "-q"])
    assert result.exit_code == 0, result.output
    np.savez(folder / "calib.npz", input=zoo.random_input(model, batch=8, seed=5)["input"])
    return folder


def test_fuzz_model_corruptions(fuzz_dir: Path, tmp_path: Path, record_property) -> None:
    rng = random.Random(SEED)
    small = onnx.load(fuzz_dir / "small.onnx")
    calib = fuzz_dir / "calib.npz"
    codes: dict[int, int] = {}
    runs = 0
    for case in range(MODEL_CASES):
        model = onnx.ModelProto()
        model.CopyFrom(small)
        what = _corrupt_model(model, rng)
        bad = tmp_path / f"bad{case}.onnx"
        bad.write_bytes(model.SerializeToString())
        out = tmp_path / f"out{case}.onnx"
        for args in (["inspect", bad], ["compare", fuzz_dir / "small.onnx", bad, "--random", "2"],
                     ["compress", bad, "-o", out, "--passes", "foldbn", "--calib", calib, "--no-latency", "-q"]):
            code = _run(args, [bad, fuzz_dir / "small.onnx", calib], f"case {case}: {what}")
            codes[code] = codes.get(code, 0) + 1
            runs += 1
    print(f"fuzz: {MODEL_CASES} model corruptions, {runs} runs, exit codes {dict(sorted(codes.items()))}")
    record_property("cases", MODEL_CASES)
    assert codes.get(1, 0) > MODEL_CASES // 2  # most corruptions are caught, each as one line
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---------------------------------------------------------------- calibration-file corruptions


def _npz_bytes(arrays: dict[str, np.ndarray], compressed: bool) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def _corrupt_data(x: np.ndarray, rng: random.Random) -> tuple[bytes, str]:
    compressed = rng.random() < 0.5
    kind = rng.choice(["byte", "truncate", "nan", "dtype", "shape", "name", "header", "labels", "empty"])
    arrays: dict[str, np.ndarray] = {"input": x.copy()}
    if kind == "nan":
        index = tuple(rng.randrange(d) for d in x.shape)
        arrays["input"][index] = rng.choice([np.nan, np.inf, -np.inf, 1e38])
    elif kind == "dtype":
        arrays["input"] = x.astype(rng.choice([np.int32, np.float16, np.uint8, np.complex64, np.bool_]))
    elif kind == "shape":
        arrays["input"] = x.reshape(rng.choice([(8, 3, 1024), (24, 32, 32), (8, 3, 32, 32, 1)]))
    elif kind == "name":
        arrays = {"images": x, "other": x}
    elif kind == "labels":
        arrays["labels"] = rng.choice([np.zeros(5, np.int64), np.zeros((8, 2), np.int64), np.zeros(8, np.float32)])
    elif kind == "empty":
        arrays["input"] = x[:0]
    data = bytearray(_npz_bytes(arrays, compressed))
    if kind == "byte":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    elif kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind == "header":
        start = data.find(b"(8, 3, 32, 32)")
        data[start:start + 14] = rng.choice([b"(9, 3, 32, 32)", b"(8, 3, 32, 33)", b"(1, 3, 32, 32)"])
    return bytes(data), f"{kind} ({'compressed' if compressed else 'stored'})"


def test_fuzz_calibration_corruptions(fuzz_dir: Path, tmp_path: Path, record_property) -> None:
    rng = random.Random(SEED + 1)
    x = np.load(fuzz_dir / "calib.npz")["input"]
    src = fuzz_dir / "src.onnx"
    codes: dict[int, int] = {}
    for case in range(DATA_CASES):
        data, what = _corrupt_data(x, rng)
        bad = tmp_path / f"calib{case}.npz"
        bad.write_bytes(data)
        out = tmp_path / f"out{case}.onnx"
        for args in (["compress", src, "-o", out, "--passes", "bnrecal", "--bnrecal-no-reconstruct", "--calib", bad,
                      "--no-latency", "-q"],
                     ["compare", src, fuzz_dir / "small.onnx", "--inputs", bad]):
            code = _run(args, [bad, src], f"data case {case}: {what}")
            codes[code] = codes.get(code, 0) + 1
    print(f"fuzz: {DATA_CASES} calibration corruptions, exit codes {dict(sorted(codes.items()))}")
    record_property("cases", DATA_CASES)
    assert codes.get(1, 0) > DATA_CASES // 2
    with zipfile.ZipFile(io.BytesIO(_npz_bytes({"input": x}, False))):
        pass  # the uncorrupted bytes are a valid archive: the corruptions above are what fails
