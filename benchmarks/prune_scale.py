"""How long channel analysis and the prune rewrite take on a ResNet-50-sized graph.

Builds ResNet-50 (bottleneck blocks [3, 4, 6, 3], ~25.6M params, 53 Conv + BN,
random weights) with onnx.helper, then prints the median over a few runs of:
  analysis  passes.channels.analyze(graph)
  rewrite   passes.prune.prune_graph(graph, ratio 0.3 on every prunable group), analysis given
  pipeline  ocomp.pipeline.run_passes(model, ["prune"]) end to end (import, pass, export, checker,
            shape inference, stats), once

Usage: python benchmarks/prune_scale.py [--runs 3] [--ratio 0.3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ocomp.model import infer_shapes, to_graph
from ocomp.passes.channels import analyze
from ocomp.passes.prune import prune_graph
from ocomp.pipeline import run_passes


def resnet50(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def init(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def conv_bn(x: str, name: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> str:
        w = rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32(np.sqrt(2.0 / (cin * k * k)))
        nodes.append(helper.make_node("Conv", [x, init(f"{name}.weight", w)], [f"{name}.out"], name=name,
                                      kernel_shape=[k, k], strides=[stride] * 2, pads=[k // 2] * 4))
        bn = [init(f"{name}.bn.{p}", v) for p, v in (("weight", rng.uniform(0.5, 1.5, cout)),
                                                     ("bias", rng.normal(0, 0.1, cout)),
                                                     ("mean", rng.normal(0, 0.1, cout)),
                                                     ("var", rng.uniform(0.5, 1.5, cout)))]
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.out"] + bn, [f"{name}.bn.out"],
                                      name=f"{name}.bn"))
        y = f"{name}.bn.out"
        if relu:
            nodes.append(helper.make_node("Relu", [y], [f"{name}.relu.out"], name=f"{name}.relu"))
            y = f"{name}.relu.out"
        return y

    x = conv_bn("input", "conv1", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [x], ["pool.out"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1] * 4))
    x, cin = "pool.out", 64
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            stride = 2 if b == 0 and stage > 1 else 1
            y = conv_bn(x, f"{p}.conv1", cin, width, 1)
            y = conv_bn(y, f"{p}.conv2", width, width, 3, stride)
            y = conv_bn(y, f"{p}.conv3", width, width * 4, 1, relu=False)
            sc = conv_bn(x, f"{p}.downsample", cin, width * 4, 1, stride, relu=False) if b == 0 else x
            nodes.append(helper.make_node("Add", [y, sc], [f"{p}.add.out"], name=f"{p}.add"))
            nodes.append(helper.make_node("Relu", [f"{p}.add.out"], [f"{p}.out"], name=f"{p}.relu"))
            x, cin = f"{p}.out", width * 4
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap.out"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap.out"], ["flat.out"], name="flatten", axis=1))
    w = rng.standard_normal((1000, 2048), dtype=np.float32) * np.float32(np.sqrt(1.0 / 2048))
    nodes.append(helper.make_node("Gemm", ["flat.out", init("fc.weight", w), init("fc.bias", np.zeros(1000))],
                                  ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "resnet50", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], inits)
    return infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.3)
    args = parser.parse_args()

    start = time.perf_counter()
    model = resnet50()
    build = time.perf_counter() - start
    params = sum(int(np.prod(i.dims)) for i in model.graph.initializer)
    convs = sum(1 for n in model.graph.node if n.op_type == "Conv")
    print(f"ResNet-50: {params / 1e6:.1f}M params, {convs} Conv, {len(model.graph.node)} nodes (built in {build:.1f}s)")

    analysis_times, rewrite_times, import_times = [], [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        graph = to_graph(model)
        t1 = time.perf_counter()
        analysis = analyze(graph)
        t2 = time.perf_counter()
        ratios = {g.id: args.ratio for g in analysis.groups if g.pinned is None}
        result = prune_graph(graph, ratios, analysis=analysis)
        t3 = time.perf_counter()
        import_times.append(t1 - t0)
        analysis_times.append(t2 - t1)
        rewrite_times.append(t3 - t2)
    pinned = [g.id for g in analysis.groups if g.pinned]
    print(f"groups: {len(analysis.groups)} ({len(ratios)} pruned at {args.ratio}, pinned: {', '.join(pinned)})")
    print(f"channels removed: {sum(g.size - g.kept_count for g in result.groups)} of "
          f"{sum(g.size for g in result.groups)}")
    print(f"graph import (to_graph)  median {statistics.median(import_times):.3f}s")
    print(f"analysis                 median {statistics.median(analysis_times):.3f}s over {args.runs} runs")
    print(f"rewrite (prune_graph)    median {statistics.median(rewrite_times):.3f}s over {args.runs} runs")

    start = time.perf_counter()
    out = run_passes(model, ["prune"], {"prune": {"ratio": args.ratio}})
    total = time.perf_counter() - start
    report = out.reports[0]
    print(f"pipeline (run_passes)    {total:.2f}s; params {report.totals['params_before'] / 1e6:.1f}M -> "
          f"{report.totals['params_after'] / 1e6:.1f}M, MACs {report.totals['macs_before'] / 1e9:.2f}G -> "
          f"{report.totals['macs_after'] / 1e9:.2f}G")


if __name__ == "__main__":
    main()
