"""Data loading: every format, preprocessing, streaming order/limit, and each mismatch error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from ocomp import data as data_mod
from ocomp.data import DataOptions, dataset_from_arrays, open_dataset
from ocomp.errors import OcompError, UsageError


def model_with(*inputs: tuple[str, int, list]) -> onnx.ModelProto:
    """A model with the given inputs (name, elem type, dims), each passed through Identity."""
    values = [helper.make_tensor_value_info(n, t, d) for n, t, d in inputs]
    outs = [helper.make_tensor_value_info(f"{n}_out", t, d) for n, t, d in inputs]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
    return helper.make_model(helper.make_graph(nodes, "g", values, outs), opset_imports=[helper.make_opsetid("", 17)])


GRAY = model_with(("input", TensorProto.FLOAT, ["N", 1, 6, 6]))
RGB = model_with(("input", TensorProto.FLOAT, ["N", 3, 6, 6]))
NHWC = model_with(("input:0", TensorProto.FLOAT, [1, 6, 6, 3]))


def collect(dataset, batch_size: int | None = None):
    feeds, labels = [], []
    for f, lab in dataset.batches(batch_size):
        feeds.append(f)
        labels.append(lab)
    return feeds, labels


# ---------------------------------------------------------------- .npz / .npy


def test_npz_named_arrays_with_labels_in_order(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((10, 1, 6, 6)).astype(np.float32)
    y = np.arange(10) % 3
    np.savez(tmp_path / "d.npz", input=x, labels=y)
    ds = open_dataset(tmp_path / "d.npz", GRAY, DataOptions(batch_size=4))
    assert len(ds) == 10 and ds.has_labels
    feeds, labels = collect(ds)
    assert [len(f["input"]) for f in feeds] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in feeds]), x)
    np.testing.assert_array_equal(np.concatenate(labels), y)
    np.testing.assert_array_equal(ds.labels(), y)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_uint8_images_of_any_name_are_scaled(tmp_path: Path, compressed: bool) -> None:
    images = np.random.default_rng(1).integers(0, 256, (7, 1, 6, 6), dtype=np.uint8)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "d.npz", images=images, labels=np.arange(7))
    ds = open_dataset(tmp_path / "d.npz", GRAY, DataOptions(batch_size=3))
    # stored members are memory-mapped, compressed ones streamed; both read the same rows
    assert (ds.arrays["input"]._memmap is not None) == (not compressed)
    got = np.concatenate([f["input"] for f, _ in ds.batches()])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, images / np.float32(255), rtol=0, atol=1e-7)
    raw = open_dataset(tmp_path / "d.npz", GRAY, DataOptions.from_cli(scale="0-255", mean="128", std="64"))
    got = np.concatenate([f["input"] for f, _ in raw.batches()])
    np.testing.assert_allclose(got, (images.astype(np.float32) - 128) / 64, rtol=0, atol=1e-6)


def test_npz_streams_compressed_rows_out_of_order_reads(tmp_path: Path) -> None:
    x = np.arange(20 * 6 * 6, dtype=np.float32).reshape(20, 1, 6, 6)
    np.savez_compressed(tmp_path / "d.npz", x=x)
    rows = open_dataset(tmp_path / "d.npz", GRAY).arrays["input"]
    np.testing.assert_array_equal(rows.read(5, 9), x[5:9])
    np.testing.assert_array_equal(rows.read(2, 4), x[2:4])  # backwards: the stream is reopened
    np.testing.assert_array_equal(rows.read(15, 20), x[15:20])


def test_multi_input_npz_and_float64_cast(tmp_path: Path) -> None:
    model = model_with(("a", TensorProto.FLOAT, ["N", 2]), ("b", TensorProto.INT64, ["N", 3]))
    a = np.random.default_rng(2).standard_normal((5, 2))  # float64 -> float32
    b = np.arange(15, dtype=np.int32).reshape(5, 3)  # int32 -> int64
    np.savez(tmp_path / "d.npz", a=a, b=b)
    feeds, labels = collect(open_dataset(tmp_path / "d.npz", model))
    assert labels == [None]
    assert feeds[0]["a"].dtype == np.float32 and feeds[0]["b"].dtype == np.int64
    np.testing.assert_allclose(feeds[0]["a"], a.astype(np.float32), rtol=0, atol=0)
    np.testing.assert_array_equal(feeds[0]["b"], b)


def test_single_npy_batch_and_single_sample(tmp_path: Path) -> None:
    x = np.random.default_rng(3).standard_normal((6, 1, 6, 6)).astype(np.float32)
    np.save(tmp_path / "batch.npy", x)
    np.save(tmp_path / "one.npy", x[0])
    feeds, _ = collect(open_dataset(tmp_path / "batch.npy", GRAY, DataOptions(batch_size=5)))
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in feeds]), x)
    feeds, _ = collect(open_dataset(tmp_path / "one.npy", GRAY))
    np.testing.assert_array_equal(feeds[0]["input"], x[:1])


def test_npy_folder_mixes_samples_and_batches_in_sorted_order(tmp_path: Path) -> None:
    x = np.random.default_rng(4).standard_normal((9, 1, 6, 6)).astype(np.float32)
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "b_002.npy", x[4:9])  # a batch of five
    np.save(folder / "a_001.npy", x[0:3])  # a batch of three
    np.save(folder / "a_010.npy", x[3])  # one sample, no batch axis
    ds = open_dataset(folder, GRAY, DataOptions(batch_size=2, limit=8))
    assert len(ds) == 8 and not ds.has_labels
    got = np.concatenate([f["input"] for f, _ in ds.batches()])
    np.testing.assert_array_equal(got, x[:8])


def test_symbolic_batch_takes_any_batch_size_and_fixed_batch_is_kept(tmp_path: Path) -> None:
    x = np.zeros((6, 6, 6, 3), np.float32)
    ds = dataset_from_arrays(NHWC, {"input:0": x}, options=DataOptions(batch_size=4))
    assert ds.batch_size == 1 and [len(f["input:0"]) for f, _ in ds.batches()] == [1] * 6
    ds = dataset_from_arrays(GRAY, np.zeros((6, 1, 6, 6), np.float32))
    assert [len(f["input"]) for f, _ in ds.batches(5)] == [5, 1]
    fixed4 = model_with(("input", TensorProto.FLOAT, [4, 1, 6, 6]))
    with pytest.raises(OcompError, match="fixed batch size of 4; 6 samples"):
        collect(dataset_from_arrays(fixed4, np.zeros((6, 1, 6, 6), np.float32)))


def test_take_is_a_prefix_in_the_same_order() -> None:
    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1) * np.ones((1, 1, 6, 6), np.float32)
    ds = dataset_from_arrays(GRAY, x, labels=np.arange(10))
    sub = ds.take(4)
    assert len(sub) == 4 and len(ds) == 10 and ds.take(None) is ds
    feeds, labels = collect(sub, 3)
    np.testing.assert_array_equal(np.concatenate(labels), [0, 1, 2, 3])
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in feeds])[:, 0, 0, 0], [0, 1, 2, 3])


# ---------------------------------------------------------------- image folders


def write_images(root: Path, classes: int, per_class: int, size=(8, 8), mode="L", seed=0) -> dict[Path, np.ndarray]:
    rng = np.random.default_rng(seed)
    written = {}
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            path = folder / f"img_{i:04d}.png"
            Image.fromarray(pixels, mode).save(path)
            written[path] = pixels
    return written


def test_image_folder_streams_batches_with_labels_limit_and_order(tmp_path: Path, monkeypatch) -> None:
    written = write_images(tmp_path / "imgs", classes=3, per_class=100, size=(6, 6))
    (tmp_path / "imgs" / "class_0" / "._img_0000.png").write_bytes(b"\0\5\26\7")  # macOS fork: skipped
    ds = open_dataset(tmp_path / "imgs", GRAY, DataOptions(batch_size=32, limit=250))
    assert len(ds) == 250 and ds.has_labels and ds.classes == ["class_0", "class_1", "class_2"]
    loaded = []
    real_load = ds._load
    monkeypatch.setattr(ds, "_load", lambda path: loaded.append(path) or real_load(path))
    batches = ds.batches()
    feeds, labels = next(batches)
    assert len(loaded) == 32, "only one batch is decoded at a time"
    assert feeds["input"].shape == (32, 1, 6, 6) and feeds["input"].dtype == np.float32
    rest = list(batches)
    assert len(loaded) == 250 and len(rest) == 7
    assert loaded == sorted(written)[:250]  # class folders and files in sorted order
    all_labels = np.concatenate([labels] + [lab for _, lab in rest])
    np.testing.assert_array_equal(all_labels, [0] * 100 + [1] * 100 + [2] * 50)
    first = sorted(written)[0]
    np.testing.assert_allclose(feeds["input"][0, 0], written[first] / np.float32(255), rtol=0, atol=1e-7)


def test_image_preprocessing_size_crop_mean_std_rgb(tmp_path: Path) -> None:
    written = write_images(tmp_path / "imgs", classes=1, per_class=2, size=(12, 10), mode="RGB")
    options = DataOptions.from_cli(size=8, crop=6, mean="0.5,0.4,0.3", std="0.2,0.25,0.5")
    feeds, _ = collect(open_dataset(tmp_path / "imgs", RGB, options))
    path = sorted(written)[0]
    image = Image.open(path).convert("RGB").resize((10, 8), Image.BILINEAR)  # shorter side (10) -> 8
    left, top = (10 - 6) // 2, (8 - 6) // 2
    pixels = np.asarray(image.crop((left, top, left + 6, top + 6)), np.float32) / 255
    want = ((pixels - [0.5, 0.4, 0.3]) / [0.2, 0.25, 0.5]).transpose(2, 0, 1)
    np.testing.assert_allclose(feeds[0]["input"][0], want, rtol=0, atol=1e-5)


def test_image_default_resize_gray_from_rgb_and_nhwc_layout(tmp_path: Path) -> None:
    written = write_images(tmp_path / "flat", classes=1, per_class=3, size=(9, 7), mode="RGB")
    flat = tmp_path / "only_files"
    flat.mkdir()
    for path in written:
        path.rename(flat / path.name)
    ds = open_dataset(flat, GRAY)  # no class folders: no labels; RGB files -> grayscale
    assert not ds.has_labels and ds.layout == "NCHW"
    feeds, labels = collect(ds)
    first = sorted(flat.iterdir())[0]
    want = np.asarray(Image.open(first).convert("L").resize((6, 6), Image.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(feeds[0]["input"][0, 0], want, rtol=0, atol=1e-7)
    assert labels == [None]
    nhwc = open_dataset(flat, NHWC, DataOptions.from_cli(scale="0-255"))
    assert nhwc.layout == "NHWC"
    feeds, _ = collect(nhwc)
    assert feeds[0]["input:0"].shape == (1, 6, 6, 3)
    want = np.asarray(Image.open(first).convert("RGB").resize((6, 6), Image.BILINEAR), np.float32)
    np.testing.assert_allclose(feeds[0]["input:0"][0], want, rtol=0, atol=0)


# ---------------------------------------------------------------- errors


def test_shape_mismatch_names_input_expected_and_actual(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", input=np.zeros((4, 3, 6, 6), np.float32))
    with pytest.raises(OcompError, match=r"input 'input' expects shape \(N, 1, 6, 6\), the array has \(4, 3, 6, 6\)"):
        open_dataset(tmp_path / "d.npz", GRAY)
    np.save(tmp_path / "d.npy", np.zeros((4, 6, 6), np.float32))
    with pytest.raises(OcompError, match=r"expects shape \(N, 1, 6, 6\), the array has \(4, 6, 6\)"):
        open_dataset(tmp_path / "d.npy", GRAY)


def test_dtype_mismatch(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 1, 6, 6), np.int32))
    with pytest.raises(OcompError, match="input 'input' expects dtype float32, array 'images' is int32"):
        open_dataset(tmp_path / "d.npz", GRAY)
    ids = model_with(("ids", TensorProto.INT64, ["N", 4]))
    with pytest.raises(OcompError, match="input 'ids' expects dtype int64, the array is float32"):
        dataset_from_arrays(ids, {"ids": np.zeros((2, 4), np.float32)})


def test_name_mismatches(tmp_path: Path) -> None:
    model = model_with(("a", TensorProto.FLOAT, ["N", 2]), ("b", TensorProto.FLOAT, ["N", 2]))
    np.savez(tmp_path / "d.npz", a=np.zeros((3, 2)), c=np.zeros((3, 2)))
    with pytest.raises(OcompError, match=r"no array for input 'b' \(model inputs: a, b; arrays: a, c\)"):
        open_dataset(tmp_path / "d.npz", model)
    np.savez(tmp_path / "two.npz", x=np.zeros((3, 1, 6, 6)), y=np.zeros((3, 1, 6, 6)))
    with pytest.raises(OcompError, match="no array named after input 'input' and 2 candidate arrays"):
        open_dataset(tmp_path / "two.npz", GRAY)
    np.save(tmp_path / "one.npy", np.zeros((3, 2)))
    with pytest.raises(OcompError, match="only single-input models"):
        open_dataset(tmp_path / "one.npy", model)


def test_label_and_count_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", input=np.zeros((4, 1, 6, 6), np.float32), labels=np.zeros((4, 2), np.int64))
    with pytest.raises(OcompError, match=r"'labels' must be one integer a sample"):
        open_dataset(tmp_path / "d.npz", GRAY)
    np.savez(tmp_path / "e.npz", input=np.zeros((4, 1, 6, 6), np.float32), labels=np.zeros(5, np.int64))
    with pytest.raises(OcompError, match="different sample counts: input 4, labels 5"):
        open_dataset(tmp_path / "e.npz", GRAY)


def test_file_and_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(OcompError, match="no such file or folder"):
        open_dataset(tmp_path / "missing.npz", GRAY)
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(OcompError, match="unknown data format '.csv'"):
        open_dataset(tmp_path / "d.csv", GRAY)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(OcompError, match="not a readable .npz"):
        open_dataset(tmp_path / "bad.npz", GRAY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OcompError, match="no image files"):
        open_dataset(tmp_path / "empty", GRAY)
    folder = tmp_path / "broken" / "cls"
    folder.mkdir(parents=True)
    (folder / "x.png").write_bytes(b"not a png")
    with pytest.raises(OcompError, match="x.png: not a readable image"):
        collect(open_dataset(tmp_path / "broken", GRAY))


def test_image_geometry_errors(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", classes=1, per_class=1, size=(12, 8))
    with pytest.raises(OcompError, match=r"--crop 4: input 'input' expects 6x6 images"):
        open_dataset(tmp_path / "imgs", GRAY, DataOptions(crop=4))
    with pytest.raises(OcompError, match=r"after resizing the image is 6x9, input 'input' expects 6x6"):
        collect(open_dataset(tmp_path / "imgs", GRAY, DataOptions(size=6)))
    odd = model_with(("input", TensorProto.FLOAT, ["N", 5, 6, 7]))
    with pytest.raises(OcompError, match="cannot tell the channel axis"):
        open_dataset(tmp_path / "imgs", odd)
    with pytest.raises(OcompError, match="--mean: 2 values for input 'input' with 1 channels"):
        collect(open_dataset(tmp_path / "imgs", GRAY, DataOptions.from_cli(mean="0.1,0.2")))


def test_cli_option_parsing() -> None:
    options = DataOptions.from_cli(batch_size=8, mean="0.485, 0.456,0.406", std="0.229,0.224,0.225", layout="nhwc")
    assert options.mean == (0.485, 0.456, 0.406) and options.layout == "NHWC" and options.batch_size == 8
    with pytest.raises(UsageError, match="--mean: expected comma-separated numbers"):
        DataOptions.from_cli(mean="a,b")
    with pytest.raises(UsageError, match="--std: values must be non-zero"):
        DataOptions.from_cli(std="1,0,1")
    assert data_mod.DataOptions().scale is None  # None = the documented default (0-1)


def test_empty_data_set_is_an_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", input=np.zeros((0, 1, 6, 6), np.float32), labels=np.zeros(0, np.int64))
    with pytest.raises(OcompError, match="d.npz: the data set holds no samples"):
        open_dataset(tmp_path / "d.npz", GRAY)


def test_fixed_batch_input_ignores_a_requested_batch_size() -> None:
    fixed2 = model_with(("input", TensorProto.FLOAT, [2, 1, 6, 6]))
    ds = dataset_from_arrays(fixed2, np.zeros((6, 1, 6, 6), np.float32), options=DataOptions(batch_size=32))
    assert [len(f["input"]) for f, _ in ds.batches(4)] == [2, 2, 2]


@pytest.mark.parametrize("arrays,message", [
    ({"input": np.zeros((4, 3, 6, 6), np.float32)},
     "input 'input' expects shape (N, 1, 6, 6), the array has (4, 3, 6, 6)"),
    ({"images": np.zeros((4, 1, 6, 6), np.int32)}, "input 'input' expects dtype float32, array 'images' is int32"),
    ({"a": np.zeros((4, 1, 6, 6), np.float32), "b": np.zeros((4, 1, 6, 6), np.float32)},
     "no array named after input 'input' and 2 candidate arrays (a, b)"),
])
def test_cli_mismatch_is_one_error_line_and_exit_1(tmp_path: Path, arrays: dict, message: str) -> None:
    from click.testing import CliRunner

    from ocomp.cli import main

    onnx.save(GRAY, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", labels=np.arange(4), **arrays)
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- bad values and corrupt files (issue 14)


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("bad,what", [(np.nan, "a non-finite value (nan)"), (np.inf, "a non-finite value (inf)"),
                                      (-np.inf, "a non-finite value (-inf)"),
                                      (1e38, "an absurdly large value (1e+38, above 1e+30 in magnitude)")])
def test_non_finite_or_absurd_data_is_refused_naming_array_and_index(tmp_path: Path, bad: float, what: str,
                                                                     compressed: bool) -> None:
    x = np.random.default_rng(0).standard_normal((9, 1, 6, 6)).astype(np.float32)
    x[7, 0, 2, 3] = bad
    (np.savez_compressed if compressed else np.savez)(tmp_path / "d.npz", images=x, labels=np.arange(9))
    with pytest.raises(OcompError) as info:
        open_dataset(tmp_path / "d.npz", GRAY)
    assert str(info.value) == (f"{tmp_path / 'd.npz'}: array 'images' has {what} at index (7, 0, 2, 3); "
                               "the data must be finite")
    # up to --limit only: the first 7 samples are clean
    assert len(open_dataset(tmp_path / "d.npz", GRAY, DataOptions(limit=7))) == 7


def test_non_finite_data_in_npy_folder_and_arrays_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(3):
        sample = np.zeros((1, 6, 6), np.float32)
        if i == 2:
            sample[0, 5, 5] = np.nan
        np.save(folder / f"{i}.npy", sample)
    with pytest.raises(OcompError, match=r"array 'input' has a non-finite value \(nan\) at index \(2, 0, 5, 5\)"):
        open_dataset(folder, GRAY)
    with pytest.raises(OcompError, match=r"array 'input' has a non-finite value \(inf\) at index \(0, 0, 0, 1\)"):
        values = np.zeros((2, 1, 6, 6))
        values[0, 0, 0, 1] = np.inf
        dataset_from_arrays(GRAY, values)
    # float64 beyond float32's range would become inf after the cast: refused before it
    with pytest.raises(OcompError, match=r"absurdly large value \(1e\+300"):
        dataset_from_arrays(GRAY, np.full((2, 1, 6, 6), 1e300))
    # large but plausible values and uint8 images pass
    assert len(dataset_from_arrays(GRAY, np.full((2, 1, 6, 6), 1e29, np.float32))) == 2


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_member_claiming_more_rows_than_stored_is_named(tmp_path: Path, compressed: bool) -> None:
    import io
    import zipfile

    x = np.ones((4, 1, 6, 6), np.float32)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, x)
    data = buffer.getvalue().replace(b"(4, 1, 6, 6)", b"(9, 1, 6, 6)")  # same header length
    with zipfile.ZipFile(tmp_path / "d.npz", "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as z:
        z.writestr("input.npy", data)
    with pytest.raises(OcompError) as info:
        open_dataset(tmp_path / "d.npz", GRAY)
    assert ("array 'input' claims shape (9, 1, 6, 6) (1296 bytes) but the member stores only 576 bytes; "
            "the file is truncated or corrupt") in str(info.value)


def test_corrupt_compressed_member_is_named(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 255, (40, 1, 6, 6)).astype(np.uint8)
    np.savez_compressed(tmp_path / "d.npz", input=x)
    raw = bytearray((tmp_path / "d.npz").read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 8] = b"\xff" * 8
    (tmp_path / "d.npz").write_bytes(bytes(raw))
    with pytest.raises(OcompError, match=r"d.npz: (array 'input' cannot be read .*the file is corrupt|"
                                         r"member 'input.npy' is not a readable array)"):
        collect(open_dataset(tmp_path / "d.npz", GRAY))


def test_window_is_a_slice_in_the_same_order_with_its_labels(tmp_path: Path) -> None:
    x = np.arange(10 * 36, dtype=np.float32).reshape(10, 1, 6, 6)
    np.savez_compressed(tmp_path / "d.npz", input=x, labels=np.arange(10) + 100)
    ds = open_dataset(tmp_path / "d.npz", GRAY, DataOptions(batch_size=3))
    head, tail = ds.window(0, 8), ds.window(8, 10)
    assert (len(head), len(tail)) == (8, 2)
    np.testing.assert_array_equal(np.concatenate([f["input"] for f, _ in head.batches()]), x[:8])
    feeds, labels = collect(tail)
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in feeds]), x[8:])
    np.testing.assert_array_equal(np.concatenate(labels), [108, 109])
    np.testing.assert_array_equal(tail.labels(), [108, 109])
    np.testing.assert_array_equal(head.take(2).labels(), [100, 101])
    np.testing.assert_array_equal(ds.window(3, 9).window(1, 3).labels(), [104, 105])
    with pytest.raises(ValueError):
        ds.window(5, 5)
