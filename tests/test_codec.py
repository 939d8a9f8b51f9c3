"""The 2-bit ternary codec: Python round trip, and the C++ decoder (runtime/packing.h)
held to the Python one (passes/ternary.py) through the ops themselves."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocomp.passes.ternary import pack_ternary, unpack_ternary

from test_runtime import expect_ort_error, require_library, run_ternary, ternary_node_model


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=4), st.integers(0, 2**31))
def test_round_trip(shape, seed):
    t = np.random.default_rng(seed).integers(-1, 2, size=shape).astype(np.int8)
    packed = pack_ternary(t)
    assert packed.dtype == np.uint8 and packed.size == (t.size + 3) // 4
    np.testing.assert_array_equal(unpack_ternary(packed, t.shape), t)


def test_bit_layout():
    # weight i -> byte i // 4, bits 2*(i % 4); 0b01 = +1, 0b10 = -1, padding codes 0
    assert pack_ternary(np.array([1, -1, 0, 1], np.int8)).tolist() == [0b01_00_10_01]
    assert pack_ternary(np.array([-1, 0, 0, 0, 1], np.int8)).tolist() == [0b10, 0b01]
    with pytest.raises(ValueError):
        unpack_ternary(np.array([0b11], np.uint8), (1,))
    with pytest.raises(ValueError):
        unpack_ternary(np.array([0, 0], np.uint8), (4,))


def _decode_with_gemm(packed: np.ndarray, n: int, kin: int) -> np.ndarray:
    """T as the C++ decoder sees it: TernaryGemm of the identity, alpha 1, no bias -> Y = T^T."""
    model = ternary_node_model("TernaryGemm", packed, np.ones(n, np.float32), None, weight_shape=[n, kin])
    y = run_ternary(model, {"X": np.eye(kin, dtype=np.float32)})
    return y.T


def test_cpp_decoder_every_valid_byte():
    """All 81 bytes without a 0b11 code, as 81 outputs of 4 weights each."""
    require_library()
    valid = [b for b in range(256) if all((b >> s) & 3 != 3 for s in (0, 2, 4, 6))]
    assert len(valid) == 81
    packed = np.array(valid, np.uint8)
    decoded = _decode_with_gemm(packed, 81, 4)
    np.testing.assert_array_equal(decoded, unpack_ternary(packed, (81, 4)))


@pytest.mark.parametrize("n,kin", [(1, 1), (3, 5), (7, 33), (20, 70)])
def test_cpp_decoder_matches_python_gemm(n, kin):
    """Odd sizes: the last byte is partly padding; M = kin covers both GEMM paths."""
    require_library()
    t = np.random.default_rng(n * kin).integers(-1, 2, size=(n, kin)).astype(np.int8)
    np.testing.assert_array_equal(_decode_with_gemm(pack_ternary(t), n, kin), t)


@pytest.mark.parametrize("weight_shape", [(5, 3, 1, 1), (4, 2, 3, 3), (3, 3, 2, 5), (2, 1, 7, 7)])
def test_cpp_decoder_matches_python_conv(weight_shape):
    """TernaryConv on one-hot images of exactly the kernel size reveals each weight
    in the conv layout (K, C/group, kH, kW): Y[n, k] = T[k].flat[n]."""
    require_library()
    k, c, kh, kw = weight_shape
    t = np.random.default_rng(sum(weight_shape)).integers(-1, 2, size=weight_shape).astype(np.int8)
    rows = c * kh * kw
    x = np.eye(rows, dtype=np.float32).reshape(rows, c, kh, kw)
    model = ternary_node_model("TernaryConv", pack_ternary(t), np.ones(k, np.float32), None,
                               weight_shape=list(weight_shape))
    y = run_ternary(model, {"X": x})
    assert y.shape == (rows, k, 1, 1)
    np.testing.assert_array_equal(y[:, :, 0, 0].T.reshape(weight_shape), t)


@pytest.mark.parametrize("position", list(itertools.product(range(3), range(4))))
def test_cpp_decoder_rejects_invalid_code(position):
    """A 0b11 code at any byte/slot of a 10-weight (3-byte) tensor is an error."""
    require_library()
    byte, slot = position
    packed = pack_ternary(np.zeros(10, np.int8))
    packed[byte] |= 0b11 << (2 * slot)
    model = ternary_node_model("TernaryGemm", packed, np.ones(2, np.float32), None, weight_shape=[2, 5])
    expect_ort_error(model, {"X": np.ones((1, 5), np.float32)}, "0b11")
