"""ocomp: an ONNX graph-rewriting compiler that shrinks trained CNNs for on-device inference."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# Installed, ``passes/`` and ``runtime/`` live inside this package as
# ``ocomp.passes`` and ``ocomp.runtime``. Imported straight from a source
# checkout (``python -m ocomp`` run in the repository root puts the checkout
# ahead of site-packages) they are siblings of this directory: extend the
# package path so the same imports resolve there.
_here = _Path(__file__).resolve().parent
_root = _here.parent
if (not (_here / "passes").is_dir() and (_root / "passes" / "__init__.py").is_file()
        and (_root / "pyproject.toml").is_file()):
    __path__.append(str(_root))  # type: ignore[name-defined]  # noqa: F821
del _Path, _here, _root
