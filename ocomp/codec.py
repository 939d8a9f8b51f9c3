"""The 2-bit ternary codec, defined here for Python and in runtime/packing.h for C++
(tests/test_codec.py holds the two to each other).

Encoding: weights are flattened in the op's canonical weight layout (row-major; TernaryConv: ONNX Conv
layout (K, C/group, kH, kW); TernaryGemm/TernaryMatMul: (N, K), one row per output). Weight i goes into
byte i // 4 at bits 2*(i % 4) .. 2*(i % 4)+1 (least significant pair first). Codes: 0b00 -> 0,
0b01 -> +1, 0b10 -> -1; 0b11 is invalid. Padding codes in the last byte are 0.
"""

from __future__ import annotations

import numpy as np

CODE_ZERO = 0b00
CODE_PLUS = 0b01
CODE_MINUS = 0b10


def pack_ternary(ternary: np.ndarray) -> np.ndarray:
    """Pack an array of {-1, 0, +1} into uint8, four 2-bit codes a byte."""
    flat = np.asarray(ternary).reshape(-1)
    if flat.size and not np.isin(flat, (-1, 0, 1)).all():
        raise ValueError("pack_ternary: values must be -1, 0 or +1")
    codes = np.where(flat > 0, CODE_PLUS, np.where(flat < 0, CODE_MINUS, CODE_ZERO)).astype(np.uint8)
    padded = np.zeros(((codes.size + 3) // 4) * 4, dtype=np.uint8)
    padded[: codes.size] = codes
    quads = padded.reshape(-1, 4)
    return (quads[:, 0] | (quads[:, 1] << 2) | (quads[:, 2] << 4) | (quads[:, 3] << 6)).astype(np.uint8)


def unpack_ternary(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of pack_ternary: int8 array of {-1, 0, +1} with the given shape."""
    count = int(np.prod(shape, dtype=np.int64))
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != (count + 3) // 4:
        raise ValueError(f"unpack_ternary: {packed.size} bytes cannot hold {count} weights")
    codes = np.stack([(packed >> s) & 0b11 for s in (0, 2, 4, 6)], axis=1).reshape(-1)[:count]
    if (codes == 0b11).any():
        raise ValueError("unpack_ternary: invalid code 0b11")
    values = np.zeros(count, dtype=np.int8)
    values[codes == CODE_PLUS] = 1
    values[codes == CODE_MINUS] = -1
    return values.reshape(shape)
