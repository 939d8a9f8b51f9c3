"""Which `--prune-multiple` should be the default: kept channel counts rounded to 1, 4, 8, 16.

    python benchmarks/prune_multiple.py            # resnet20 and ppocr_cls -> benchmarks/PRUNE_MULTIPLE.md

For each multiple M, prune 0.3 with kept counts rounded up to a multiple of M, three ways: float (+ bnrecal),
+ ternary + bnrecal (float-activation TernaryConv), + ternary + bnrecal + w2a8 (the W2A8 kernels). Accuracy,
size and latency at batch 1 (1 and 2 threads) side by side in one run against the original and onnxruntime's
int8 QDQ model, measured by benchmarks/real_models.py's machinery (same data, same interleaved latency
subprocess, same table). The figures decide the default: the rounding costs size and gains accuracy; what it
does to latency depends on the kernel (onnxruntime's float convolutions block channels by 8 or 16; the W2A8
kernels compute 16 output channels per panel and read input channels 4 at a time).
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
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_models as rm  # noqa: E402

MULTIPLES = (1, 4, 8, 16)


def configs(multiples=MULTIPLES, ratio: float = 0.3) -> list[tuple]:
    rows = [rm.BASE_CONFIGS[0], rm.BASE_CONFIGS[1]]  # the original and ORT int8 U8S8
    for passes, text in (("prune,bnrecal,foldbn", "bnrecal"), ("prune,ternary,bnrecal,foldbn", "ternary + bnrecal"),
                         ("prune,ternary,bnrecal,foldbn,w2a8", "ternary + bnrecal + w2a8")):
        for m in multiples:
            rows.append((f"prune {ratio} (multiple {m}) + {text}", "ocomp", passes,
                         {"prune": {"ratio": ratio, "multiple": m}}))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet20,ppocr_cls", help="comma-separated subset of "
                        f"{', '.join(rm.MODELS)}")
    parser.add_argument("--limit", type=int, default=None, help="evaluation samples per model (default: all)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved latency rounds")
    parser.add_argument("--reps", type=int, default=5, help="runs per configuration per round")
    parser.add_argument("--threads", default="1,2", help="thread counts")
    parser.add_argument("--shared", default=str(rm.DEFAULT_SHARED), help="the shared reference folder")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "PRUNE_MULTIPLE.md"))
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",")]
    args.quick, args.verbose = False, False
    names = args.models.split(",")
    unknown = [n for n in names if n not in rm.MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}")
    from tqdm import tqdm

    rows = configs()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ocomp-multiple-") as tmp, \
            tqdm(total=len(names) * (len(rows) + len(args.threads)), unit="step") as bar:
        models = [rm.bench_model(n, Path(args.shared), Path(tmp), args, bar, rows) for n in names]
    command = "python benchmarks/prune_multiple.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"machine": rm.machine(), "command": command.strip(), "seconds": time.perf_counter() - start,
              "threads": args.threads, "rounds": args.rounds, "reps": args.reps, "models": models,
              "notes": [line for model in models for line in verdict(model, args.threads)]}
    rm.write_markdown(result, Path(args.out), title="prune: kept channel counts rounded to a multiple")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
    return 0


def verdict(model: dict, threads: list[int]) -> list[str]:
    """Per model and pipeline, each multiple's latency relative to multiple 1 and its size/accuracy cost."""
    by = {r["config"]: r for r in model["rows"] if "error" not in r}
    lines = []
    for text in ("bnrecal", "ternary + bnrecal", "ternary + bnrecal + w2a8"):
        base = next((r for c, r in by.items() if c.endswith(f"(multiple 1) + {text}")), None)
        if base is None:
            continue
        parts = []
        for c, r in by.items():
            if not c.endswith(f") + {text}") or r is base:
                continue
            m = c.split("(multiple ")[1].split(")")[0]
            lat = ", ".join(f"{t}T {r[f'latency_ms_{t}t'] / base[f'latency_ms_{t}t']:.2f}x"
                            for t in threads if r.get(f"latency_ms_{t}t") and base.get(f"latency_ms_{t}t"))
            quality = ("top1" if "top1" in r else "agreement")
            dq = 100 * (r.get(quality, 0) - base.get(quality, 0))
            parts.append(f"multiple {m}: latency {lat} of multiple 1's, {quality} {dq:+.2f} pt, "
                         f"file {r['file_bytes'] / base['file_bytes']:.2f}x")
        lines.append(f"{model['model']}, prune 0.3 + {text}: " + "; ".join(parts))
    return lines


if __name__ == "__main__":
    sys.exit(main())
