"""ocomp: an ONNX graph-rewriting compiler that shrinks trained CNNs for on-device inference."""

__version__ = "0.1.0"
