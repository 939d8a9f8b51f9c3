"""ocomp runtime: the onnxruntime custom-op library with the add-only ternary kernels.

The C++ library ``libocomp_runtime.so`` (built by CMake from this directory,
installed next to this file by ``pip install``) registers domain ``ocomp``
with TernaryConv, TernaryGemm and TernaryMatMul.

    import ocomp.runtime as rt
    sess = rt.session("model.ternary.onnx", intra_op_num_threads=1)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["DOMAIN", "LIBRARY_ENV", "ISA_ENV", "library_path", "session_options", "session", "w2a8_path"]

DOMAIN = "ocomp"
LIBRARY_ENV = "OCOMP_RUNTIME_LIBRARY"
ISA_ENV = "OCOMP_ISA"  # forces a W2A8 path (scalar, avx2, avxvnni, avxvnni-evex, avx512vnni, neon, neon-dot)

if sys.platform == "darwin":
    _LIBRARY_NAME = "libocomp_runtime.dylib"
elif sys.platform == "win32":
    _LIBRARY_NAME = "ocomp_runtime.dll"
else:
    _LIBRARY_NAME = "libocomp_runtime.so"


def _candidate_dirs() -> list[Path]:
    # __path__ holds more than this file's directory in scikit-build-core
    # editable installs (the built library lives in site-packages there).
    dirs = [Path(__file__).resolve().parent]
    for entry in globals().get("__path__", []) or []:
        path = Path(entry).resolve()
        if path not in dirs:
            dirs.append(path)
    return dirs


def _installed_library() -> str | None:
    # Imported from a source checkout (which holds no built library), fall back
    # to the library of the installed ocomp distribution, if there is one.
    try:
        from importlib.metadata import PackageNotFoundError, distribution
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        dist = distribution("ocomp")
    except PackageNotFoundError:
        return None
    for entry in dist.files or []:
        if entry.name == _LIBRARY_NAME:
            path = Path(str(dist.locate_file(entry))).resolve()
            if path.is_file():
                return str(path)
    return None


def library_path() -> str:
    """Absolute path of the custom-op library.

    ``$OCOMP_RUNTIME_LIBRARY`` overrides; otherwise the library installed next to
    this module. Raises RuntimeError, saying how to build it, when it is missing.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise RuntimeError(f"{LIBRARY_ENV}={override} does not point to a file")
        return str(path.resolve())
    for directory in _candidate_dirs():
        path = directory / _LIBRARY_NAME
        if path.is_file():
            return str(path)
    installed = _installed_library()
    if installed is not None:
        return installed
    searched = ", ".join(str(d) for d in _candidate_dirs())
    raise RuntimeError(
        f"{_LIBRARY_NAME} not found (searched {searched}). Build it with "
        "`pip install .` (or `pip install --no-build-isolation -e .`) in the ocomp checkout, "
        "or build standalone with `cmake -S runtime -B build && cmake --build build` "
        f"and set {LIBRARY_ENV}=build/{_LIBRARY_NAME}."
    )


def w2a8_path() -> str:
    """Name of the W2A8 (int8 activation) kernel path this process runs.

    The library decides once per process from CPUID / HWCAP, or from $OCOMP_ISA.
    Raises RuntimeError when $OCOMP_ISA names a path this build or CPU cannot run.
    """
    import ctypes

    lib = ctypes.CDLL(library_path())
    fn = lib.OcompW2A8Path
    fn.restype = ctypes.c_char_p
    answer = fn().decode()
    if answer.startswith("error: "):
        raise RuntimeError(answer[len("error: "):])
    return answer


_REGISTERED_KEY = "session.ocomp_runtime_registered"


def _register(options: Any) -> None:
    # Once per SessionOptions: a config entry marks the options (pybind11
    # objects take no attributes, and ids are reused after garbage collection).
    key = _REGISTERED_KEY
    try:
        if options.get_session_config_entry(key) == "1":
            return
    except RuntimeError:  # onnxruntime raises when the entry is absent
        pass
    options.register_custom_ops_library(library_path())
    options.add_session_config_entry(key, "1")


def session_options(**kwargs: Any):
    """onnxruntime.SessionOptions with the ocomp library registered.

    Keyword arguments set SessionOptions attributes, e.g. intra_op_num_threads=1.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    for name, value in kwargs.items():
        if not hasattr(options, name):
            raise TypeError(f"onnxruntime.SessionOptions has no attribute {name!r}")
        setattr(options, name, value)
    _register(options)
    return options


def session(model: Any, sess_options: Any = None, providers: Any = None, **options: Any):
    """An onnxruntime.InferenceSession that can run the ocomp ops.

    ``model`` is a path, serialized bytes or an onnx.ModelProto. ``sess_options``
    (a SessionOptions) gets the library registered if it lacks it; otherwise the
    keyword arguments build one (see session_options).
    """
    import onnxruntime as ort

    if sess_options is None:
        sess_options = session_options(**options)
    else:
        for name, value in options.items():
            setattr(sess_options, name, value)
        _register(sess_options)
    if isinstance(model, (str, os.PathLike)):
        source: Any = os.fspath(model)
    elif isinstance(model, (bytes, bytearray, memoryview)):
        source = bytes(model)
    elif hasattr(model, "SerializeToString"):
        source = model.SerializeToString()
    else:
        raise TypeError(f"model must be a path, bytes or onnx.ModelProto, not {type(model).__name__}")
    return ort.InferenceSession(source, sess_options=sess_options, providers=providers or ["CPUExecutionProvider"])
