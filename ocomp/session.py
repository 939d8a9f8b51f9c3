"""The one way ocomp makes an onnxruntime session: ocomp's custom ops registered when the runtime library
is built (plain onnxruntime for models without them otherwise), onnxruntime's own log lines silenced
(errors reach the user as one line), and an explicit thread count where figures must not depend on it."""

from __future__ import annotations

from typing import Any

import onnx

from .errors import OcompError
from .graph import CUSTOM_DOMAIN


def uses_ocomp_ops(model: onnx.ModelProto) -> bool:
    """Whether the model has nodes of ocomp's own domain (which need the runtime library)."""
    return any(node.domain == CUSTOM_DOMAIN for node in model.graph.node)


def make_session(model: onnx.ModelProto | bytes, threads: int | None = None, **options: Any):
    """An onnxruntime InferenceSession for `model` (a ModelProto or its bytes).

    threads: intra-op threads (None: onnxruntime's default); `options` set other SessionOptions
    attributes. Raises OcompError when the model needs ocomp's ops and the runtime library is missing.
    """
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else bytes(model)
    settings = {"log_severity_level": 4, **options}  # errors reach the user as exceptions, not log lines
    if threads is not None:
        settings.update(intra_op_num_threads=int(threads), inter_op_num_threads=1)
    try:
        from ocomp.runtime import session
    except ImportError:
        session = None
    if session is not None:
        try:
            return session(data, **settings)
        except RuntimeError as exc:
            if "not found" not in str(exc):  # anything but a missing library is the model's problem
                raise
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(data)
    if uses_ocomp_ops(proto):
        raise OcompError("the model uses ocomp custom ops (Ternary*) but the ocomp runtime library is not "
                         "available; rebuild/reinstall ocomp")
    import onnxruntime as ort

    so = ort.SessionOptions()
    for key, value in settings.items():
        setattr(so, key, value)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
