"""Shared pytest fixtures for the ocomp test suite.

``tests/`` is deliberately *not* a package (no ``__init__.py``).  Instead this
conftest puts the ``tests/`` directory itself on ``sys.path`` so that test
modules (and anything else run under pytest) can simply ``import zoo`` to get
the in-code model zoo (see ``tests/zoo.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))

import onnx  # noqa: E402

import zoo  # noqa: E402

# Repo root is tests/..; the project's shared reference models live beside the
# checkout, in <repo root>/../shared/reference.
SHARED_REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"

_ZOO_MODELS = zoo.all_models()


@pytest.fixture(params=[m for _, m in _ZOO_MODELS], ids=[i for i, _ in _ZOO_MODELS])
def zoo_model(request) -> onnx.ModelProto:
    """Each of the 16 zoo models ("plain", "plain-folded", ...); a fresh copy per test."""
    m = onnx.ModelProto()
    m.CopyFrom(request.param)
    return m


@pytest.fixture
def tmp_model_path(tmp_path):
    """Callable ``write(model, name="model.onnx") -> Path`` saving a model under tmp_path."""

    def write(model: onnx.ModelProto, name: str = "model.onnx") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
        return path

    return write


@pytest.fixture
def shared_dir() -> Path:
    """Path to ../shared/reference (real models); skips the test when absent."""
    if not SHARED_REFERENCE_DIR.is_dir():
        pytest.skip("../shared/reference not found: real-model tests need the project's shared reference models")
    return SHARED_REFERENCE_DIR
