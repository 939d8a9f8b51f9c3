"""Calibration cost at ImageNet sizes (issue #11): does `prune,ternary,bnrecal` stay linear in depth?

Builds the models itself (no downloads): ResNet-50/101/152-style bottleneck networks at 224x224 (25.6M /
44.5M / 60.2M params, He-initialised weights, BatchNorm kept) and a YOLO-style detector at 416x416
(Conv-BN-LeakyReLU backbone, two detection heads joined by Resize + Concat). Each model is compressed in
its own subprocess (so its peak memory is its own), with random calibration images: this benchmark
measures time and memory, which do not depend on the pixel values; accuracy is measured on real data by
benchmarks/real_models.py.

    python benchmarks/calib_scale.py                         # resnet50, resnet101, resnet152, detector416
    python benchmarks/calib_scale.py --models resnet50 --images 64
    python benchmarks/calib_scale.py --budget-demo           # bnrecal under a budget smaller than one layer

Prints per model: wall time of each pass, peak RSS, bnrecal's sweep figures, and a least-squares fit of
bnrecal's per-layer seconds against the layer's MACs (linear in depth means: total time ~ sum of per-layer
costs, no term growing with the layer's position).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}


class _Net:
    def __init__(self, seed: int = 0):
        self.nodes, self.inits = [], []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, act: str | None = "Relu",
             gamma: float = 1.0) -> str:
        std = np.sqrt(2.0 / (cin * k * k))
        w = self.const("w", self.rng.normal(0, std, (cout, cin, k, k)))
        y = self.name("conv")
        self.nodes.append(helper.make_node("Conv", [x, w], [y], name=y, kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[k // 2] * 4))
        bn = self.name("bn")
        params = [self.const("g", np.full(cout, gamma)), self.const("b", self.rng.normal(0, 0.05, cout)),
                  self.const("m", np.zeros(cout)), self.const("v", np.ones(cout))]
        self.nodes.append(helper.make_node("BatchNormalization", [y] + params, [bn], name=bn))
        if act is None:
            return bn
        out = self.name(act.lower())
        attrs = {"alpha": 0.1} if act == "LeakyRelu" else {}
        self.nodes.append(helper.make_node(act, [bn], [out], name=out, **attrs))
        return out

    def op(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def model(self, x_shape, outputs: list[tuple[str, list]]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "net", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                    x_shape)],
                                  [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
                                  self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        return onnx.shape_inference.infer_shapes(model)


def resnet(blocks: tuple[int, ...]) -> onnx.ModelProto:
    net = _Net()
    x = net.conv("input", 3, 64, 7, 2)
    x = net.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, count in enumerate(blocks):
        width = 64 * 2 ** stage
        for i in range(count):
            stride = 2 if i == 0 and stage > 0 else 1
            h = net.conv(x, cin, width, 1)
            h = net.conv(h, width, width, 3, stride)
            h = net.conv(h, width, 4 * width, 1, act=None, gamma=0.2)
            short = net.conv(x, cin, 4 * width, 1, stride, act=None) if i == 0 else x
            x = net.op("Relu", [net.op("Add", [h, short])])
            cin = 4 * width
    pooled = net.op("Flatten", [net.op("GlobalAveragePool", [x])])
    fc_w = net.const("fc_w", net.rng.normal(0, np.sqrt(1.0 / cin), (1000, cin)))
    fc_b = net.const("fc_b", np.zeros(1000))
    logits = net.op("Gemm", [pooled, fc_w, fc_b], transB=1)
    return net.model(["N", 3, 224, 224], [(logits, ["N", 1000])])


def detector416() -> onnx.ModelProto:
    """YOLOv3-tiny-like: 416x416 -> heads at 13x13 and 26x26 (255 channels each)."""
    net = _Net(1)
    x, c = "input", 3
    skip = None
    for i, width in enumerate((16, 32, 64, 128, 256, 512)):
        x = net.conv(x, c, width, 3, act="LeakyRelu")
        c = width
        if i == 4:
            skip = x  # 26x26x256
        if i < 5:
            x = net.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = net.conv(x, 512, 1024, 3, act="LeakyRelu")
    x = net.conv(x, 1024, 256, 1, act="LeakyRelu")
    head1 = net.conv(x, 256, 512, 3, act="LeakyRelu")
    w = net.const("head1_w", net.rng.normal(0, np.sqrt(1.0 / 512), (255, 512, 1, 1)))
    out1 = net.op("Conv", [head1, w], kernel_shape=[1, 1])
    up = net.conv(x, 256, 128, 1, act="LeakyRelu")
    scales = net.const("scales", np.array([1, 1, 2, 2]))
    up = net.op("Resize", [up, "", scales], mode="nearest")
    cat = net.op("Concat", [up, skip], axis=1)
    head2 = net.conv(cat, 384, 256, 3, act="LeakyRelu")
    w2 = net.const("head2_w", net.rng.normal(0, np.sqrt(1.0 / 256), (255, 256, 1, 1)))
    out2 = net.op("Conv", [head2, w2], kernel_shape=[1, 1])
    return net.model(["N", 3, 416, 416], [(out1, ["N", 255, 13, 13]), (out2, ["N", 255, 26, 26])])


MODELS = {"resnet50": lambda: resnet(RESNET_BLOCKS["resnet50"]),
          "resnet101": lambda: resnet(RESNET_BLOCKS["resnet101"]),
          "resnet152": lambda: resnet(RESNET_BLOCKS["resnet152"]),
          "detector416": detector416}
SIZES = {"detector416": 416}


def _worker(spec: dict) -> dict:
    """Compress one model in this process; returns the figures."""
    sys.path.insert(0, str(REPO))
    from ocomp.api import compress
    from ocomp.metrics import model_stats

    work = Path(spec["workdir"])
    src = work / f"{spec['model']}.onnx"
    model = MODELS[spec["model"]]()
    onnx.save(model, src)
    size = SIZES.get(spec["model"], 224)
    rng = np.random.default_rng(0)
    calib = work / f"{spec['model']}_calib.npy"
    np.save(calib, rng.normal(0, 1, (spec["images"], 3, size, size)).astype(np.float32))
    options = {"bnrecal": {"samples": spec["images"]}}
    if spec.get("memory") is not None:
        options["bnrecal"]["memory"] = spec["memory"]
    start = time.perf_counter()
    result = compress(src, work / "out.onnx", spec["passes"], options, calib=calib, threads=spec["threads"])
    wall = time.perf_counter() - start
    stats = model_stats(model)
    bn = next((r for r in result.reports if r.pass_name == "bnrecal"), None)
    return {"model": spec["model"], "params": stats.params, "macs": stats.macs, "images": spec["images"],
            "passes": {r.pass_name: round(r.seconds, 2) for r in result.reports}, "wall": round(wall, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "sweep": bn.details.get("sweep") if bn else None,
            "steps": bn.details.get("step_seconds") if bn else None}


def _linear_fit(steps: list) -> str:
    """bnrecal's cumulative time against the step index: a straight line is linear in depth."""
    if not steps:
        return "-"
    seconds = np.array([s for _, s in steps])
    idx = np.arange(len(seconds))
    half = len(seconds) // 2
    first, second = seconds[:half].sum(), seconds[half:].sum()
    slope = np.polyfit(idx, seconds, 1)[0]
    return (f"{len(seconds)} steps, mean {seconds.mean() * 1000:.0f} ms/step, first half {first:.1f} s, second "
            f"half {second:.1f} s, per-step trend {slope * 1000:+.2f} ms/step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,resnet101,resnet152,detector416")
    parser.add_argument("--images", type=int, default=None, help="calibration images (default 256; detector 64)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", default="prune,ternary,bnrecal")
    parser.add_argument("--budget-demo", action="store_true", help="resnet50 bnrecal with a 64 MiB budget")
    parser.add_argument("--out", default=None, help="also write the output to this file (e.g. benchmarks/CALIB.md)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    flags = ""
    try:
        flags = " ".join(sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags")
                                 for f in line.split(":")[1].split() if f.startswith(("avx", "amx", "fma"))}))
    except OSError:
        pass
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"# calib_scale: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"threads {args.threads}; CPU flags: {flags}")
    say(f"command: python benchmarks/calib_scale.py {' '.join(sys.argv[1:])}".rstrip())
    models = ["resnet50"] if args.budget_demo else args.models.split(",")
    scaling = []  # (GMACs x images, bnrecal seconds) of the ResNets, for the across-depth fit
    for name in models:
        images = args.images or (64 if name.startswith("detector") else 256)
        with tempfile.TemporaryDirectory() as work:
            spec = dict(model=name, images=images, threads=args.threads, passes=args.passes, workdir=work,
                        memory=64 if args.budget_demo else None)
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                  text=True)
            if done.returncode:
                say(f"{name}: failed\n{done.stderr[-2000:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
        budget = " (bnrecal --bnrecal-memory 64 MiB)" if args.budget_demo else ""
        say(f"{name}: {r['params'] / 1e6:.1f}M params, {r['macs'] / 1e9:.2f} GMACs, {images} images{budget}: "
            f"wall {r['wall']:.1f} s, passes {r['passes']}, peak RSS {r['peak_rss_mb']:.0f} MB")
        if r["sweep"]:
            say(f"  sweep: {r['sweep']}")
            say(f"  bnrecal per layer: {_linear_fit(r['steps'])}")
            if name.startswith("resnet") and "bnrecal" in r["passes"]:
                scaling.append((name, r["macs"] / 1e9 * images, r["passes"]["bnrecal"]))
    if len(scaling) >= 2:
        work = np.array([w for _, w, _ in scaling])
        secs = np.array([t for _, _, t in scaling])
        slope, offset = np.polyfit(work, secs, 1)
        fitted = ", ".join(f"{n} {t:.1f} s (fit {slope * w + offset:.1f})" for n, w, t in scaling)
        say(f"across depth: bnrecal seconds = {slope * 1000:.2f} ms x (GMACs x images) + {offset:.1f} s: {fitted}")
    if args.out:
        Path(args.out).write_text("```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
