"""Bit packing of low-bit codes (SPEC section 6): exact round trips and the documented word layout."""

from __future__ import annotations

import numpy as np
import pytest
from balancekv.reference.quantization import pack, unpack
from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    axis=st.sampled_from([-2, -1]),
    seed=st.integers(0, 2**31),
)
def test_unpack_inverts_pack(bits, lead, rows, cols, axis, seed):
    """unpack(pack(codes)) == codes bit-exactly for every bits, axis and shape (SPEC 6), padding included."""
    shape = tuple(lead) + (rows, cols)
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=shape).astype(np.uint8)
    before = codes.copy()
    p = pack(codes, bits, axis)
    L = shape[axis]
    assert p.dtype == np.int32
    moved = np.moveaxis(codes, axis, -1).shape
    assert p.shape == moved[:-1] + (-(-L * bits // 32),)
    out = unpack(p, bits, axis, L)
    assert out.shape == codes.shape
    np.testing.assert_array_equal(out, codes)
    np.testing.assert_array_equal(codes, before)  # input untouched


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_key_and_value_layouts(bits):
    """Keys (..., T, d) packed along tokens -> (..., d, T*b/32); values along channels -> (..., T, d*b/32)."""
    T, d = 64, 32
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(3, T, d)).astype(np.uint8)
    assert pack(codes, bits, -2).shape == (3, d, T * bits // 32)
    assert pack(codes, bits, -1).shape == (3, T, d * bits // 32)
    # a key word holds consecutive tokens of one channel
    w = pack(codes, bits, -2)[1, 5, 0].view(np.uint32)
    per = 32 // bits
    assert [int((w >> (j * bits)) & (2**bits - 1)) for j in range(per)] == codes[1, :per, 5].tolist()


def test_little_end_first_word_layout():
    """Code j of a word sits at bits [j*b, (j+1)*b): hand-computed words."""
    c2 = np.array([1, 2, 3, 0] + [0] * 11 + [3], np.uint8)  # 16 two-bit codes
    # 1 + 2*4 + 3*16 + 3 * 4**15 = 57 + 3221225472 -> as int32: 57 - 2**30
    assert int(pack(c2, 2, -1)[0]) == 57 + 3 * 4**15 - 2**32
    c4 = np.array([0xA, 0x1, 0, 0, 0, 0, 0, 0x7], np.uint8)
    assert int(pack(c4, 4, -1)[0]) == 0x7000001A
    c8 = np.array([0x01, 0x02, 0x03, 0x04], np.uint8)
    assert int(pack(c8, 8, -1)[0]) == 0x04030201


def test_bad_input():
    with pytest.raises(ValueError, match="codes"):
        pack(np.array([4], np.uint8), 2, -1)
    with pytest.raises(ValueError, match="bits"):
        pack(np.array([1], np.uint8), 3, -1)
    with pytest.raises(TypeError, match="codes"):
        pack(np.array([1.0]), 2, -1)
    with pytest.raises(ValueError, match="length"):
        unpack(np.zeros((2,), np.int32), 2, -1, 33)
    with pytest.raises(TypeError, match="packed"):
        unpack(np.zeros((2,), np.int64), 2, -1, 3)
