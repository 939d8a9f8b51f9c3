"""README.md's two commands stay true: CI runs the test command verbatim, and the main command works."""

from __future__ import annotations

import shlex
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from ocomp.cli import main

ROOT = Path(__file__).resolve().parents[1]


def readme_text() -> str:
    return (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    text = readme_text()
    return [line.strip() for line in text.splitlines() if line.startswith("    python3 -m venv .venv")]


def test_readme_has_the_two_commands_and_ci_runs_the_test_one() -> None:
    commands = readme_commands()
    assert len(commands) == 2, commands
    main_command, test_command = commands
    assert "ocomp compress examples/" in main_command
    assert test_command.endswith("pytest -q")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci], "the test command in .ci/run differs from README.md"


def test_readme_main_command_runs(tmp_path: Path) -> None:
    main_command = readme_commands()[0]
    args = shlex.split(main_command.split("&& .venv/bin/ocomp ", 1)[1])
    out = tmp_path / "small.onnx"
    args[args.index("-o") + 1] = str(out)
    args = [str(ROOT / a) if a.startswith("examples/") else a for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "== summary" in result.output
    assert "top-1" in result.output
    # the example passes the accuracy guard on the 500 bundled test images, with the figures README quotes
    import re

    quoted = re.search(r"top-1 (\d+\.\d)% -> (\d+\.\d)% on the\s+500\s+bundled test images", readme_text())
    assert quoted, "README's Quick start quotes the example's top-1 before and after"
    assert "accuracy guard: passed on 500 --eval samples ('logits' top-1 agreement" in result.output
    assert f"top-1 {quoted.group(1)}% -> {quoted.group(2)}%)" in result.output, result.output
    assert "latency (batch 1, default threads)*" in result.output
    original = (ROOT / "examples" / "fashion_cnn.onnx").stat().st_size
    assert out.stat().st_size * 4 < original, "the example should shrink several times"
    assert any(n.domain == "ocomp" for n in onnx.load(out).graph.node)


@pytest.mark.parametrize("name", ["fashion_cnn.onnx", "fashion_test.npz", "fashion_calib.npz"])
def test_example_files_ship(name: str) -> None:
    assert (ROOT / "examples" / name).is_file()


def test_readme_accuracy_guard_example_is_what_compress_prints(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    quoted = next(line.strip() for line in text.splitlines() if line.startswith("    error: accuracy guard:"))
    out = tmp_path / "small.onnx"
    result = CliRunner().invoke(main, ["compress", str(ROOT / "examples" / "fashion_cnn.onnx"), "-o", str(out),
                                       "--passes", "prune,bnrecal", "--prune-ratio", "0.9", "--calib",
                                       str(ROOT / "examples" / "fashion_calib.npz"), "--no-latency", "-q"])
    assert result.exit_code == 3 and not out.exists()
    assert result.stderr.strip() == quoted
