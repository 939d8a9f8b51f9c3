#!/usr/bin/env python3
"""Train the bundled example CNN on Fashion-MNIST and export it to ONNX.

This script produces the three example files shipped in ``examples/``:

* ``fashion_cnn.onnx``   -- the trained network (opset 17, BatchNormalization
  nodes kept, input ``input`` float32 (N,1,28,28) with pixels/255, output
  ``logits`` (N,10), symbolic batch dimension ``N``);
* ``fashion_test.npz``   -- the first 500 images of the Fashion-MNIST test
  split (``input`` float32 (500,1,28,28) in [0,1], ``labels`` int64);
* ``fashion_calib.npz``  -- 256 training images held out from training
  (``input`` float32 (256,1,28,28) in [0,1], ``labels`` int64).

PyTorch is needed only here (ocomp itself does not use it)::

    pip install torch            # CPU build is enough

Getting the data
----------------
The full training set (60k images) is in Debian's ``dataset-fashion-mnist``
package. Download it without installing it and unpack it locally::

    mkdir -p /tmp/fmnist && cd /tmp/fmnist
    apt-get download dataset-fashion-mnist
    dpkg-deb -x dataset-fashion-mnist_*.deb x
    # idx files are now in x/usr/share/datasets/fashion-mnist/

(or get the four ``*-ubyte.gz`` files from the upstream Zalando Research
repository). Then::

    python examples/train_example.py --data /tmp/fmnist/x/usr/share/datasets/fashion-mnist \\
        --epochs 5 --out examples/

``--data`` may also be an ``.npz`` with ``images`` (uint8 (N,1,28,28) or
(N,28,28)) and ``labels`` arrays; in that case the test split must be given
with ``--test`` (a directory with the t10k idx files, or an npz of the same
form). When ``--data`` is a directory that holds the t10k files as well,
``--test`` is not needed.

Fashion-MNIST is (c) 2017 Zalando SE and released under the MIT licence.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import sys
import time

import numpy as np

SEED = 0
N_CALIB = 256
N_TEST_BUNDLED = 500


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------

def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    ndim = magic & 0xFF
    if (magic >> 8) != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(directory: str, stem: str) -> str | None:
    for root, _dirs, files in os.walk(directory):
        for name in (stem + ".gz", stem):
            if name in files:
                return os.path.join(root, name)
    return None


def load_split(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N,1,28,28), labels int64 (N,))."""
    if os.path.isdir(path):
        prefix = "train" if split == "train" else "t10k"
        img = _find(path, f"{prefix}-images-idx3-ubyte")
        lab = _find(path, f"{prefix}-labels-idx1-ubyte")
        if img is None or lab is None:
            raise FileNotFoundError(f"no {prefix}-*-idx*-ubyte[.gz] files under {path}")
        images, labels = _read_idx(img), _read_idx(lab)
    else:
        with np.load(path) as d:
            images, labels = d["images"], d["labels"]
    images = np.asarray(images, np.uint8).reshape(-1, 1, 28, 28)
    labels = np.asarray(labels, np.int64).reshape(-1)
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def to_input(images_u8: np.ndarray) -> np.ndarray:
    return (images_u8.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------

def build_model():
    import torch.nn as nn

    def cbr(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    class ResBlock(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(x + y)

    class FashionCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                *cbr(1, 32),             # 32 x 28 x 28
                nn.MaxPool2d(2),         # 32 x 14 x 14
                *cbr(32, 64),            # 64 x 14 x 14
                ResBlock(64),            # 64 x 14 x 14
                nn.MaxPool2d(2),         # 64 x 7 x 7
                *cbr(64, 128),           # 128 x 7 x 7
            )
            self.pool = nn.AdaptiveAvgPool2d(1)  # exported as GlobalAveragePool
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            return self.fc(self.flatten(self.pool(self.features(x))))

    return FashionCNN()


# --------------------------------------------------------------------------
# training / export
# --------------------------------------------------------------------------

def evaluate_torch(model, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    import torch
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = model(torch.from_numpy(x[i:i + batch]))
            correct += int((logits.argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(x)


def export_onnx(model, path: str) -> None:
    import warnings

    import torch
    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    # Legacy TorchScript exporter. TrainingMode.PRESERVE with the model in
    # eval mode exports inference behaviour but skips the eval-mode peephole
    # pass that would fold BatchNormalization into the preceding Conv: the
    # example is meant to show ocomp's own BN handling.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter notice
        torch.onnx.export(
            model, (dummy,), path,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            dynamo=False,
        )


def check_onnx(path: str, x: np.ndarray, y: np.ndarray) -> float:
    import onnx
    import onnxruntime as ort
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    ops = [n.op_type for n in m.graph.node]
    if "BatchNormalization" not in ops:
        raise RuntimeError("exported graph has no BatchNormalization node")
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    preds = np.concatenate([sess.run(["logits"], {"input": x[i:i + 1000]})[0].argmax(1)
                            for i in range(0, len(x), 1000)])
    return float((preds == y).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True,
                    help="directory with Fashion-MNIST idx files, or an npz with images/labels")
    ap.add_argument("--test", default=None,
                    help="test split: directory with t10k idx files or npz (default: --data if a directory)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (one-cycle)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    if args.threads:
        torch.set_num_threads(args.threads)

    test_path = args.test or args.data
    if not os.path.isdir(test_path) and args.test is None:
        ap.error("--test is required when --data is an npz file")

    train_u8, train_y = load_split(args.data, "train")
    test_u8, test_y = load_split(test_path, "test")
    print(f"train: {len(train_u8)} images   test: {len(test_u8)} images", flush=True)

    # Hold out calibration images from training (they are training-split
    # images, never test images).
    rng = np.random.default_rng(SEED)
    perm = rng.permutation(len(train_u8))
    calib_idx, fit_idx = np.sort(perm[:N_CALIB]), perm[N_CALIB:]
    x_fit, y_fit = to_input(train_u8[fit_idx]), train_y[fit_idx]
    x_test, y_test = to_input(test_u8), test_y

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters", flush=True)

    steps_per_epoch = (len(x_fit) + args.batch - 1) // args.batch
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                          nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch)

    xt, yt = torch.from_numpy(x_fit), torch.from_numpy(y_fit)
    g = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(xt), generator=g)
        total, seen = 0.0, 0
        for i in range(0, len(xt), args.batch):
            idx = order[i:i + args.batch]
            xb, yb = xt[idx], yt[idx]
            # light augmentation: random horizontal flip
            flip = torch.rand(len(xb), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(xb)
            seen += len(xb)
        acc = evaluate_torch(model, x_test, y_test)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {total / seen:.4f}  "
              f"test acc {acc:.4f}  ({time.time() - t0:.0f}s)", flush=True)

    os.makedirs(args.out, exist_ok=True)
    onnx_path = os.path.join(args.out, "fashion_cnn.onnx")
    export_onnx(model, onnx_path)

    bundled_x, bundled_y = x_test[:N_TEST_BUNDLED], y_test[:N_TEST_BUNDLED]
    np.savez_compressed(os.path.join(args.out, "fashion_test.npz"),
                        input=bundled_x, labels=bundled_y)
    np.savez_compressed(os.path.join(args.out, "fashion_calib.npz"),
                        input=to_input(train_u8[calib_idx]), labels=train_y[calib_idx])

    acc_bundled = check_onnx(onnx_path, bundled_x, bundled_y)
    acc_full = check_onnx(onnx_path, x_test, y_test)
    print(f"onnxruntime accuracy: {acc_bundled:.4f} on {N_TEST_BUNDLED} bundled test images, "
          f"{acc_full:.4f} on all {len(x_test)} test images")
    for name in ("fashion_cnn.onnx", "fashion_test.npz", "fashion_calib.npz"):
        p = os.path.join(args.out, name)
        print(f"wrote {p} ({os.path.getsize(p) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
