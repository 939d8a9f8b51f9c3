"""Mixed precision under a budget (issue #12 item 3) on the reference classifiers: what `--max-drop` and
`--target-size` reach, measured on the evaluation sets the search never sees.

    python benchmarks/mixed_precision.py                                   # both models, default budgets
    python benchmarks/mixed_precision.py --models ppocr_cls --budgets max-drop=1,target-size=6x

Models and data (from ../shared/reference, as benchmarks/real_models.py uses them):
- resnet20: resnet20_fashion_mnist.onnx; calibration: the first 256 images of fashion_mnist_calib.npz
  (scaled to 0-1, with labels); evaluation: the 10,000 images of fashion_mnist_test.npz;
- ppocr_cls: ppocr_mobile_v2_cls.onnx (input fixed to N,3,48,192); text_direction_lines.npz samples
  0..199 calibration, 200..999 evaluation.
Each row is `ocomp.api.compress(..., --passes ternary,bnrecal,foldbn, calib, max_drop=/target_size=)` with
--force (a budget that is not reached still gives its closest model, and the table says "not reached").
Sizes are the written files' bytes. Model files go to a temporary directory, never into the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # before numpy loads OpenBLAS (its idle threads spin)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared" / "reference"
PASSES = "ternary,bnrecal,foldbn"
DEFAULT_BUDGETS = {"resnet20": ["max-drop=1", "target-size=8x", "target-size=12x"],
                   "ppocr_cls": ["max-drop=1", "target-size=6x", "target-size=4x"]}


def load(name: str, shared: Path) -> dict:
    if name == "resnet20":
        calib = np.load(shared / "fashion_mnist_calib.npz")
        test = np.load(shared / "fashion_mnist_test.npz")
        return dict(file=shared / "resnet20_fashion_mnist.onnx", shapes=None, input="input",
                    calib=calib["images"][:256].astype(np.float32) / 255, calib_labels=calib["labels"][:256],
                    eval=test["images"].astype(np.float32) / 255, labels=test["labels"])
    if name == "ppocr_cls":
        data = np.load(shared / "text_direction_lines.npz")
        x, y = data["x"].astype(np.float32), data["labels"]
        return dict(file=shared / "ppocr_mobile_v2_cls.onnx", shapes={"x": ["N", 3, 48, 192]}, input="x",
                    calib=x[:200], calib_labels=y[:200], eval=x[200:1000], labels=y[200:1000])
    raise SystemExit(f"unknown model {name!r}; known: resnet20, ppocr_cls")


def top1(model, data: dict) -> float:
    from ocomp.data import dataset_from_arrays
    from ocomp.evaluate import evaluate

    return evaluate(model, dataset_from_arrays(model, {data["input"]: data["eval"]}, data["labels"]))["top1"]


def bench(name: str, budgets: list[str], shared: Path, workdir: Path, threads: int | None) -> list[dict]:
    import onnx

    from ocomp.api import compress
    from ocomp.guard import GuardOptions
    from ocomp.model import load_model

    data = load(name, shared)
    calib_path = workdir / f"{name}_calib.npz"
    np.savez(calib_path, **{data["input"]: data["calib"], "labels": data["calib_labels"]})
    original = load_model(data["file"], data["shapes"], require_static=False)
    base = top1(original, data)
    size = data["file"].stat().st_size
    rows = [dict(model=name, config="original fp32", top1=base, size=size)]
    configs = [("ternary,bnrecal,foldbn (no budget)", {})] + [
        (f"--{b.split('=')[0]} {b.split('=')[1]}", {b.split("=")[0].replace("-", "_"): (
            float(b.split("=")[1]) if b.startswith("max-drop") else b.split("=")[1])}) for b in budgets]
    for label, budget in configs:
        out = workdir / f"{name}_{len(rows)}.onnx"
        start = time.perf_counter()
        result = compress(data["file"], out, PASSES, calib=calib_path, input_shapes=data["shapes"],
                          guard=GuardOptions(force=True), threads=threads, **budget)
        seconds = time.perf_counter() - start
        row = dict(model=name, config=label, top1=top1(onnx.load(str(out)), data), size=out.stat().st_size,
                   seconds=seconds)
        mixed = next((r for r in result.reports if r.pass_name == "mixed"), None)
        if mixed is not None:
            forms = [p["form"] for p in mixed.details["plan"]]
            row["plan"] = "/".join(str(forms.count(f)) for f in ("ternary", "int8", "float"))
            row["search"] = mixed.details["chosen"].split(": ", 1)[0]
            row["calib_drop"] = mixed.details["chosen"].rsplit("drop ", 1)[1]
            row["reached"] = "not reached" not in mixed.details
            row["candidates"] = len(mixed.details["tried"])
        rows.append(row)
        print(f"  {name}: {label}: top-1 {100 * row['top1']:.2f}%, {row['size'] / 1000:.1f} KB "
              f"({seconds:.0f} s)", file=sys.stderr, flush=True)
    for row in rows:
        row["drop"] = 100 * (base - row["top1"])
        row["ratio"] = size / row["size"]
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| model | configuration | top-1 (eval) | drop pt | file KB | x smaller | ternary/int8/float | "
             "plan chosen | drop on calib | budget met | candidates | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seconds = f"{r['seconds']:.0f}" if "seconds" in r else ""
        lines.append(f"| {r['model']} | {r['config']} | {100 * r['top1']:.2f}% | {r['drop']:.2f} | "
                     f"{r['size'] / 1000:.1f} | {r['ratio']:.2f} | {r.get('plan', '')} | {r.get('search', '')} | "
                     f"{r.get('calib_drop', '')} | {'' if 'reached' not in r else ('yes' if r['reached'] else 'NO')} | "
                     f"{r.get('candidates', '')} | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,ppocr_cls")
    parser.add_argument("--budgets", default=None, help="comma-separated max-drop=D / target-size=S (default: "
                        "per model, see DEFAULT_BUDGETS)")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ocomp-mixed-") as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            budgets = args.budgets.split(",") if args.budgets else DEFAULT_BUDGETS.get(name, ["max-drop=1"])
            rows.extend(bench(name, budgets, args.shared, Path(tmp), args.threads))
    print(render(rows))


if __name__ == "__main__":
    main()
