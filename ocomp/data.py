"""Calibration and evaluation data: .npz, .npy, folders of .npy files and image folders, streamed in batches.

Every format is opened against a model: arrays are matched to the model's inputs by name
(a single-input model also takes a single unnamed array), checked for shape and dtype once
when the data set is opened, and read lazily batch by batch, so memory stays bounded by
the batch size (uncompressed .npz members and .npy files are memory-mapped; compressed
.npz members are decompressed as a stream; image files are decoded a batch at a time).
The sample order is the file order (sorted names), never shuffled.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx

from .errors import OcompError, UsageError
from .model import graph_inputs, input_dims

LABEL_KEYS = ("labels", "label")
# Float data beyond this magnitude is refused like NaN/Inf: no real input is that large, and it turns
# into Inf/NaN in the float32 sums of a calibration pass.
ABSURD_MAGNITUDE = 1e30
_SCAN_ELEMENTS = 1 << 22  # elements per chunk when data is scanned for bad values
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class DataOptions:
    """Batching and image preprocessing. None means "the default" (documented in the CLI help)."""

    batch_size: int = 32
    limit: int | None = None
    size: int | None = None  # images: resize (shorter side) to this; default the model's input H/W
    crop: int | None = None  # images: center crop (square) after resizing; default none
    mean: tuple[float, ...] | None = None  # in --scale units; default 0
    std: tuple[float, ...] | None = None  # default 1
    layout: str | None = None  # "NCHW" / "NHWC"; default guessed from the model's input shape
    scale: str | None = None  # "0-1" (pixels / 255, default) or "0-255"

    @classmethod
    def from_cli(cls, batch_size: int = 32, limit: int | None = None, size: int | None = None,
                 crop: int | None = None, mean: str | None = None, std: str | None = None,
                 layout: str | None = None, scale: str | None = None) -> "DataOptions":
        if layout is not None and layout.upper() not in ("NCHW", "NHWC"):
            raise UsageError(f"--layout: expected NCHW or NHWC, got '{layout}'")
        if scale is not None and scale not in ("0-1", "0-255"):
            raise UsageError(f"--scale: expected 0-1 or 0-255, got '{scale}'")
        std_values = _floats("--std", std)
        if std_values is not None and any(v == 0 for v in std_values):
            raise UsageError("--std: values must be non-zero")
        return cls(batch_size=int(batch_size or 32), limit=limit, size=size, crop=crop,
                   mean=_floats("--mean", mean), std=std_values,
                   layout=layout.upper() if layout else None, scale=scale)


def _floats(flag: str, text: str | Sequence[float] | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    if not isinstance(text, str):
        return tuple(float(v) for v in text)
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated numbers, got '{text}'") from None
    if not values:
        raise UsageError(f"{flag}: expected comma-separated numbers, got '{text}'")
    return values


# ---------------------------------------------------------------- model inputs


@dataclass(frozen=True)
class InputSpec:
    name: str
    dims: tuple  # ints; str/None for symbolic or unknown dimensions
    dtype: np.dtype

    @property
    def fixed_batch(self) -> int | None:
        return self.dims[0] if self.dims and isinstance(self.dims[0], int) else None

    def describe(self, dims: Sequence | None = None) -> str:
        dims = self.dims if dims is None else dims
        return "(" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in dims) + ")"

    def sample_matches(self, shape: Sequence[int]) -> bool:
        """Does one sample (shape without the batch axis) fit dims[1:]?"""
        if len(shape) != len(self.dims) - 1:
            return False
        return all(not isinstance(d, int) or d == s for d, s in zip(self.dims[1:], shape))


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    specs = []
    for value in graph_inputs(model):
        elem = value.type.tensor_type.elem_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else np.dtype(np.float32)
        specs.append(InputSpec(value.name, tuple(input_dims(value)), dtype))
    return specs


# ---------------------------------------------------------------- lazy arrays


class _Rows:
    """A lazily read array: `shape`, `dtype`, `read(start, stop)` (rows along axis 0)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, start: int, stop: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class _InMemory(_Rows):
    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape, self.dtype = tuple(array.shape), array.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[start:stop])


class _ZipMember(_Rows):
    """One .npy member of an .npz: memory-mapped when stored, else decompressed as a stream."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo):
        self.path, self.info = path, info
        with archive.open(info) as handle:
            version = np.lib.format.read_magic(handle)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(handle, max_header_size=1 << 20)
            self.header_size = handle.tell()
        self.shape, self.dtype, self.fortran = tuple(shape), np.dtype(dtype), fortran
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._memmap = None
        self._stream = None
        self._position = 0
        name = info.filename[:-4]
        if dtype.hasobject:
            raise OcompError(f"{path}: array '{name}' holds Python objects; refused")
        claimed = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        stored = info.file_size - self.header_size
        if stored < claimed:
            raise OcompError(f"{path}: array '{name}' claims shape {_shape(self.shape)} ({claimed} bytes) but the "
                             f"member stores only {stored} bytes; the file is truncated or corrupt")
        if info.compress_type == zipfile.ZIP_STORED and not fortran:
            with open(path, "rb") as raw:  # the data starts after the member's local header
                raw.seek(info.header_offset)
                local = raw.read(30)
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
            offset = info.header_offset + 30 + name_len + extra_len + self.header_size
            self._memmap = np.memmap(path, dtype=self.dtype, mode="r", offset=offset, shape=self.shape)
        self._archive = archive

    def read(self, start: int, stop: int) -> np.ndarray:
        try:
            return self._read_rows(start, stop)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
            raise OcompError(f"{self.path}: array '{self.info.filename[:-4]}' cannot be read "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); the file is "
                             "corrupt") from None

    def _read_rows(self, start: int, stop: int) -> np.ndarray:
        if self._memmap is not None:
            return np.array(self._memmap[start:stop])
        if self.fortran:  # rare; rows are not contiguous in the file
            with self._archive.open(self.info) as handle:
                return np.lib.format.read_array(handle)[start:stop]
        if self._stream is None or start < self._position:
            if self._stream is not None:
                self._stream.close()
            self._stream = self._archive.open(self.info)
            self._stream.seek(self.header_size)
            self._position = 0
        if start > self._position:
            self._stream.seek(self.header_size + start * self.row_bytes)
            self._position = start
        data = self._stream.read((stop - start) * self.row_bytes)
        self._position = stop
        return np.frombuffer(data, dtype=self.dtype).reshape((stop - start,) + self.shape[1:]).copy()


class _NpyFolder(_Rows):
    """Sorted .npy files, each one sample (no batch axis) or a batch; read through memory maps."""

    def __init__(self, files: list[Path], spec: InputSpec):
        self.files = files
        self.counts: list[int] = []
        dtypes = set()
        sample_shape = None
        for path in files:
            array = _open_npy(path)
            if spec.sample_matches(array.shape):
                count, shape = 1, tuple(array.shape)
            elif array.ndim >= 1 and spec.sample_matches(array.shape[1:]):
                count, shape = array.shape[0], tuple(array.shape[1:])
            else:
                raise OcompError(f"{path}: input '{spec.name}' expects {spec.describe()} (or one sample "
                                 f"{spec.describe(spec.dims[1:])}), the file holds {_shape(array.shape)}")
            if sample_shape is not None and shape != sample_shape:
                raise OcompError(f"{path}: sample shape {_shape(shape)} differs from the previous files' "
                                 f"{_shape(sample_shape)}")
            sample_shape = shape
            dtypes.add(array.dtype)
            self.counts.append(count)
        if len(dtypes) > 1:
            raise OcompError(f"{files[0].parent}: the .npy files have different dtypes "
                             f"({', '.join(sorted(d.name for d in dtypes))})")
        self.dtype = dtypes.pop()
        self.shape = (sum(self.counts),) + tuple(sample_shape)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def read(self, start: int, stop: int) -> np.ndarray:
        parts = []
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        for index in range(first, len(self.files)):
            lo, hi = int(self.starts[index]), int(self.starts[index + 1])
            if lo >= stop:
                break
            array = _open_npy(self.files[index])
            if self.counts[index] == 1 and array.ndim == len(self.shape) - 1:
                array = array[None]
            parts.append(np.asarray(array[max(start, lo) - lo: min(stop, hi) - lo]))
        return np.concatenate(parts) if parts else np.zeros((0,) + self.shape[1:], self.dtype)


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise OcompError(f"{path}: not a readable .npy file ({str(exc).splitlines()[0]})") from None


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


# ---------------------------------------------------------------- data sets


class Dataset:
    """Samples for a model's inputs, read lazily in batches in a fixed order.

    `batches()` yields `(feeds, labels)`: feeds maps every model input to an array of up to
    `batch_size` samples (dtype of the model input), labels is an int64 array or None.
    """

    def __init__(self, source: str, specs: list[InputSpec], count: int, options: DataOptions):
        self.source = source
        self.specs = specs
        self.options = options
        self._count = count
        self._offset = 0  # first sample of this view (window())

    def __len__(self) -> int:
        return self._count

    @property
    def has_labels(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        fixed = {s.fixed_batch for s in self.specs} - {None}
        return fixed.pop() if fixed else self.options.batch_size

    def take(self, limit: int | None) -> "Dataset":
        """The first `limit` samples (the same order); `self` when limit is None or not smaller."""
        if limit is None or limit >= len(self):
            return self
        subset = object.__new__(type(self))
        subset.__dict__.update(self.__dict__)
        subset._count = max(int(limit), 0)
        return subset

    def window(self, start: int, stop: int) -> "Dataset":
        """Samples start..stop-1 of this data set as a data set (the same order), e.g. a held-back tail."""
        start, stop = max(int(start), 0), min(int(stop), len(self))
        if stop <= start:
            raise ValueError(f"empty window {start}..{stop} of {len(self)} samples")
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._offset = self._offset + start
        view._count = stop - start
        return view

    def batches(self, batch_size: int | None = None) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """`batch_size` overrides --batch-size, except for inputs with a fixed batch size (always fed that)."""
        fixed = {s.fixed_batch for s in self.specs} - {None}
        size = self.batch_size if fixed else (batch_size or self.batch_size)
        if fixed and len(self) % size:
            spec = next(s for s in self.specs if s.fixed_batch)
            raise OcompError(f"{self.source}: input '{spec.name}' has a fixed batch size of {spec.fixed_batch}; "
                             f"{len(self)} samples is not a multiple of it (use --limit)")
        for start in range(self._offset, self._offset + len(self), size):
            yield self._read(start, min(start + size, self._offset + len(self)))

    def labels(self) -> np.ndarray | None:
        """All labels (small: one integer a sample), or None."""
        return None

    def _read(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        raise NotImplementedError  # pragma: no cover - interface


class ArrayDataset(Dataset):
    """Arrays (in memory, memory-mapped or streamed from an .npz) matched to the model inputs."""

    def __init__(self, source: str, specs: list[InputSpec], arrays: dict[str, _Rows],
                 labels: _Rows | None, options: DataOptions):
        counts = {name: rows.shape[0] for name, rows in arrays.items()}
        if labels is not None:
            counts["labels"] = labels.shape[0]
        if len(set(counts.values())) > 1:
            raise OcompError(f"{source}: arrays have different sample counts: "
                             + ", ".join(f"{k} {v}" for k, v in counts.items()))
        super().__init__(source, specs, next(iter(counts.values())), options)
        if self._count == 0:
            raise OcompError(f"{source}: the data set holds no samples")
        self.arrays = arrays
        self._labels = labels
        if options.limit is not None:
            self._count = min(self._count, options.limit)

    @property
    def has_labels(self) -> bool:
        return self._labels is not None

    def labels(self) -> np.ndarray | None:
        if self._labels is None:
            return None
        return _labels(self._labels.read(self._offset, self._offset + len(self)), self.source)

    def _read(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        feeds = {s.name: _convert(self.arrays[s.name].read(start, stop), s, self.options) for s in self.specs}
        labels = None if self._labels is None else _labels(self._labels.read(start, stop), self.source)
        return feeds, labels


class ImageFolder(Dataset):
    """Image files, either in class subfolders (labels = sorted subfolder index) or directly in the folder."""

    def __init__(self, root: Path, spec: InputSpec, options: DataOptions):
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        files: list[Path] = []
        labels: list[int] = []
        if classes:
            for index, name in enumerate(classes):
                found = _image_files(root / name)
                files.extend(found)
                labels.extend([index] * len(found))
        else:
            files = _image_files(root)
        if not files:
            raise OcompError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder or its "
                             "class subfolders")
        super().__init__(str(root), [spec], len(files), options)
        self.files = files
        self.classes = classes
        self._labels = np.asarray(labels, dtype=np.int64) if classes else None
        self.layout, self.height, self.width, self.channels = _image_geometry(spec, options)
        if options.crop is not None and (options.crop, options.crop) != (self.height, self.width):
            raise OcompError(f"--crop {options.crop}: input '{spec.name}' expects "
                             f"{self.height}x{self.width} images, the crop gives {options.crop}x{options.crop}")
        if options.limit is not None:
            self._count = min(self._count, options.limit)

    @property
    def has_labels(self) -> bool:
        return self._labels is not None

    def labels(self) -> np.ndarray | None:
        return None if self._labels is None else self._labels[self._offset: self._offset + len(self)]

    def _read(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        spec = self.specs[0]
        images = np.stack([self._load(path) for path in self.files[start:stop]])  # N, H, W, C (float32)
        if self.layout == "NCHW":
            images = images.transpose(0, 3, 1, 2)
        feeds = {spec.name: np.ascontiguousarray(_normalize(images, spec, self.options, self.layout))}
        return feeds, None if self._labels is None else self._labels[start:stop]

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image = image.convert("L" if self.channels == 1 else "RGB")
                image = self._resize(image)
                pixels = np.asarray(image, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise OcompError(f"{path}: not a readable image ({str(exc).splitlines()[0]})") from None
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if pixels.shape[:2] != (self.height, self.width):
            raise OcompError(f"{path}: after resizing the image is {pixels.shape[0]}x{pixels.shape[1]}, input "
                             f"'{self.specs[0].name}' expects {self.height}x{self.width}; use --crop or --size")
        return pixels

    def _resize(self, image):
        from PIL import Image

        size, crop = self.options.size, self.options.crop
        if size is None and crop is None:
            return image.resize((self.width, self.height), Image.BILINEAR)
        if size is not None:
            width, height = image.size
            short = min(width, height)
            new = (max(1, round(width * size / short)), max(1, round(height * size / short)))
            if new != image.size:
                image = image.resize(new, Image.BILINEAR)
        if crop is not None:
            width, height = image.size
            if crop > min(width, height):
                raise OcompError(f"--crop {crop} is larger than the resized image ({width}x{height}); "
                                 "give a larger --size")
            left, top = (width - crop) // 2, (height - crop) // 2
            image = image.crop((left, top, left + crop, top + crop))
        return image


def _image_files(folder: Path) -> list[Path]:
    # hidden files are skipped: macOS copies leave "._name.png" resource forks next to the images
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _image_geometry(spec: InputSpec, options: DataOptions) -> tuple[str, int, int, int]:
    dims = spec.dims
    if len(dims) != 4:
        raise OcompError(f"input '{spec.name}' has shape {spec.describe()}; image folders need a 4-d image input")
    layout = options.layout
    if layout is None:
        if dims[1] in (1, 3):
            layout = "NCHW"
        elif dims[3] in (1, 3):
            layout = "NHWC"
        else:
            raise OcompError(f"input '{spec.name}' has shape {spec.describe()}: cannot tell the channel axis "
                             "(no dimension of size 1 or 3 at axis 1 or 3); give --layout")
    channels, height, width = (dims[1], dims[2], dims[3]) if layout == "NCHW" else (dims[3], dims[1], dims[2])
    if channels not in (1, 3):
        raise OcompError(f"input '{spec.name}' has shape {spec.describe()}: {layout} means {channels} channels; "
                         "image folders give 1 (grayscale) or 3 (RGB)")
    if not isinstance(height, int) or not isinstance(width, int):
        raise OcompError(f"input '{spec.name}' has shape {spec.describe()}: the image size is not fixed; "
                         f"give --input-shape {spec.name}=...")
    return layout, height, width, channels


def _channel_axis(spec: InputSpec, layout: str | None, ndim: int) -> int | None:
    if ndim != 4:
        return None
    if layout == "NHWC":
        return 3
    if layout == "NCHW":
        return 1
    if spec.dims[1] in (1, 3):
        return 1
    if spec.dims[3] in (1, 3):
        return 3
    return 1


def _normalize(pixels: np.ndarray, spec: InputSpec, options: DataOptions, layout: str | None) -> np.ndarray:
    """uint8 pixels -> the model's dtype: scale (0-1 default), then (x - mean) / std per channel."""
    if not np.issubdtype(spec.dtype, np.floating):
        return pixels.astype(spec.dtype)
    x = pixels.astype(np.float32)
    if (options.scale or "0-1") == "0-1":
        x /= np.float32(255.0)
    if options.mean is None and options.std is None:
        return x.astype(spec.dtype, copy=False)
    axis = _channel_axis(spec, layout, x.ndim)
    channels = x.shape[axis] if axis is not None else 1
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = channels
    for flag, values in (("--mean", options.mean), ("--std", options.std)):
        if values is not None and len(values) not in (1, channels):
            raise OcompError(f"{flag}: {len(values)} values for input '{spec.name}' with {channels} channels")
    mean = np.asarray(options.mean or (0.0,), dtype=np.float32)
    std = np.asarray(options.std or (1.0,), dtype=np.float32)
    mean = mean.reshape(shape) if mean.size == channels and axis is not None else mean.reshape(())
    std = std.reshape(shape) if std.size == channels and axis is not None else std.reshape(())
    return ((x - mean) / std).astype(spec.dtype, copy=False)


def _convert(array: np.ndarray, spec: InputSpec, options: DataOptions) -> np.ndarray:
    """A batch of array data to the model's dtype (dtype compatibility was checked when opening)."""
    if array.dtype == np.uint8 and np.issubdtype(spec.dtype, np.floating):
        return _normalize(array, spec, options, options.layout)
    return np.ascontiguousarray(array.astype(spec.dtype, copy=False))


def _labels(array: np.ndarray, source: str) -> np.ndarray:
    return np.asarray(array).reshape(-1).astype(np.int64)


def _check_array(source: str, spec: InputSpec, rows: _Rows, key: str) -> _Rows:
    """Shape and dtype of an array against a model input; one sample without a batch axis is accepted."""
    shape = rows.shape
    if shape and spec.sample_matches(shape):  # one sample without the batch axis
        rows = _InMemory(np.asarray(rows.read(0, shape[0]))[None])
        shape = rows.shape
    named = f"array '{key}'" if key != spec.name else "the array"
    if len(shape) != len(spec.dims) or not spec.sample_matches(shape[1:]):
        raise OcompError(f"{source}: input '{spec.name}' expects shape {spec.describe()}, {named} has "
                         f"{_shape(shape)}")
    dtype, want = np.dtype(rows.dtype), spec.dtype
    ok = (np.issubdtype(want, np.floating) and (np.issubdtype(dtype, np.floating) or dtype == np.uint8)) or \
         (np.issubdtype(want, np.integer) and np.issubdtype(dtype, np.integer) and np.can_cast(dtype, want)) or \
         (want == np.bool_ and dtype == np.bool_)
    if not ok:
        raise OcompError(f"{source}: input '{spec.name}' expects dtype {want.name}, {named} is {dtype.name}")
    return rows


def _check_values(source: str, key: str, rows: _Rows, limit: int | None) -> None:
    """Refuse float data with NaN, Inf or a magnitude above ABSURD_MAGNITUDE (up to `limit` samples), naming
    the array and the first bad index: such data silently gives a model with NaN weights. Scanned in chunks
    of rows, so memory stays bounded; uint8 images and integer data cannot hold such values."""
    if not np.issubdtype(rows.dtype, np.floating):
        return
    count = rows.shape[0] if limit is None else min(rows.shape[0], limit)
    step = max(1, _SCAN_ELEMENTS // max(1, int(np.prod(rows.shape[1:], dtype=np.int64))))
    for start in range(0, count, step):
        chunk = rows.read(start, min(start + step, count))
        with np.errstate(invalid="ignore", over="ignore"):
            bad = ~np.isfinite(chunk) | (np.abs(chunk) > ABSURD_MAGNITUDE)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            value = chunk[where]
            index = "(" + ", ".join(str(i) for i in (start + where[0],) + where[1:]) + ")"
            what = (f"a non-finite value ({value})" if not np.isfinite(value)
                    else f"an absurdly large value ({float(value):.3g}, above {ABSURD_MAGNITUDE:g} in magnitude)")
            raise OcompError(f"{source}: array '{key}' has {what} at index {index}; the data must be finite")


def _check_labels(source: str, rows: _Rows) -> _Rows:
    if len(rows.shape) != 1 and not (len(rows.shape) == 2 and rows.shape[1] == 1):
        raise OcompError(f"{source}: 'labels' must be one integer a sample, shape (N,); it has {_shape(rows.shape)}")
    if not np.issubdtype(rows.dtype, np.integer):
        raise OcompError(f"{source}: 'labels' must be integers, it is {np.dtype(rows.dtype).name}")
    return rows


def _match(source: str, specs: list[InputSpec], arrays: dict[str, _Rows], options: DataOptions) -> ArrayDataset:
    label_key = next((k for k in LABEL_KEYS if k in arrays), None)
    labels = _check_labels(source, arrays[label_key]) if label_key else None
    data = {k: v for k, v in arrays.items() if k != label_key}
    names = [s.name for s in specs]
    matched: dict[str, _Rows] = {}
    if len(specs) == 1 and specs[0].name not in data:
        if len(data) != 1:
            raise OcompError(f"{source}: no array named after input '{specs[0].name}' and "
                             f"{len(data)} candidate arrays ({', '.join(data) or 'none'}); name it '{specs[0].name}'")
        key = next(iter(data))
        matched[specs[0].name] = _check_array(source, specs[0], data[key], key)
        _check_values(source, key, matched[specs[0].name], options.limit)
    else:
        missing = [n for n in names if n not in data]
        if missing:
            raise OcompError(f"{source}: no array for input '{missing[0]}' (model inputs: {', '.join(names)}; "
                             f"arrays: {', '.join(arrays) or 'none'})")
        for spec in specs:
            matched[spec.name] = _check_array(source, spec, data[spec.name], spec.name)
            _check_values(source, spec.name, matched[spec.name], options.limit)
    return ArrayDataset(source, specs, matched, labels, options)


# ---------------------------------------------------------------- opening


def open_dataset(path: str | os.PathLike, model: onnx.ModelProto, options: DataOptions | None = None) -> Dataset:
    """Open .npz / .npy / a folder of .npy files / an image folder for `model`'s inputs (see module doc)."""
    options = options or DataOptions()
    specs = input_specs(model)
    if not specs:
        raise OcompError("the model has no inputs to feed")
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise OcompError(f"{path}: no such file or folder")
    if path.is_dir():
        npy = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".npy")
        if npy:
            spec = _single(specs, source, "a folder of .npy files")
            rows = _NpyFolder(npy, spec)
            return _match(source, specs, {spec.name: rows}, options)
        spec = _single(specs, source, "an image folder")
        return ImageFolder(path, spec, options)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _match(source, specs, _open_npz(path), options)
    if suffix == ".npy":
        spec = _single(specs, source, "a single .npy file")
        return _match(source, specs, {spec.name: _InMemory(_open_npy(path))}, options)
    if suffix in IMAGE_SUFFIXES:
        raise OcompError(f"{path}: a single image; give the folder that holds the images")
    raise OcompError(f"{path}: unknown data format '{suffix or 'no suffix'}' (expected .npz, .npy, a folder of "
                     ".npy files or an image folder)")


def dataset_from_arrays(model: onnx.ModelProto, arrays: dict[str, np.ndarray] | np.ndarray,
                        labels: np.ndarray | None = None, options: DataOptions | None = None,
                        source: str = "arrays") -> ArrayDataset:
    """A data set from in-memory arrays (same rules as an .npz: names, uint8 images, labels)."""
    specs = input_specs(model)
    if isinstance(arrays, np.ndarray):
        arrays = {_single(specs, source, "one array").name: arrays}
    rows: dict[str, _Rows] = {k: _InMemory(np.asarray(v)) for k, v in arrays.items()}
    if labels is not None:
        rows["labels"] = _InMemory(np.asarray(labels))
    return _match(source, specs, rows, options or DataOptions())


def _single(specs: list[InputSpec], source: str, what: str) -> InputSpec:
    if len(specs) != 1:
        raise OcompError(f"{source}: {what} can feed only single-input models; this model has inputs "
                         f"{', '.join(s.name for s in specs)} (use an .npz with one array per input)")
    return specs[0]


def _open_npz(path: Path) -> dict[str, _Rows]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise OcompError(f"{path}: not a readable .npz file ({exc})") from None
    arrays: dict[str, _Rows] = {}
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            continue
        try:
            arrays[info.filename[:-4]] = _ZipMember(path, archive, info)
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise OcompError(f"{path}: member '{info.filename}' is not a readable array ({exc})") from None
    if not arrays:
        raise OcompError(f"{path}: the .npz holds no arrays")
    return arrays


def describe(dataset: Dataset) -> dict[str, Any]:
    return {"source": dataset.source, "samples": len(dataset), "labels": dataset.has_labels}
