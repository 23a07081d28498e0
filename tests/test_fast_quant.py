"""Fast quantization and packing against the NumPy reference (SPEC sections 6 and 11).

Contract: codes, scales and zeros bit-identical to :mod:`balancekv.reference.quantization`
(torch path on any input; Triton fused quantize+pack under the interpreter on small
grids, compiled on CUDA); ``unpack(pack(c)) == c`` and packed words identical.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from _fast_helpers import HAS_CUDA, needs_interpreter, triton_interpreter
from hypothesis import given, settings
from hypothesis import strategies as st

rq = importlib.import_module("balancekv.reference.quantization")
fq = importlib.import_module("balancekv.fast.quantization")


def _same_bits(a, b):
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def _data(seed, shape=(2, 3, 64, 32), dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 3 + rng.normal(size=shape[-1:])).astype(dtype)
    x[0, 0, :32, 5] = 1.25  # a constant key group: scale 0, codes 0
    x[1, 2, 7, :] = -0.5  # a constant value row
    x[0, 1, 3, 0:2] = [0.0, 3.0]  # exact half-way values appear for some groups
    return x


CASES = [
    (b, ax, g, sd)
    for b in (2, 4, 8)
    for ax, g in ((-2, 32), (-1, 16), (-2, 8), (-1, 4))
    for sd in (np.float16, np.float32)
]


@pytest.mark.parametrize("bits,axis,group,sdt", CASES)
def test_torch_quantize_and_pack_bit_identical(bits, axis, group, sdt):
    x = _data(bits * 10 + group)
    c, s, z = rq.quantize(x, bits, group, axis, sdt)
    tc, ts, tz = fq.quantize(torch.from_numpy(x), bits, group, axis, sdt, backend="torch")
    _same_bits(tc.numpy(), c)
    _same_bits(ts.numpy(), s)
    _same_bits(tz.numpy(), z)
    w = fq.pack(tc, bits, axis)
    _same_bits(w.numpy(), rq.pack(c, bits, axis))
    _same_bits(fq.unpack(w, bits, axis, x.shape[axis], backend="torch").numpy(), c)
    wf, sf, zf = fq.quantize_pack(torch.from_numpy(x), bits, group, axis, sdt, backend="torch")
    _same_bits(wf.numpy(), rq.pack(c, bits, axis))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    bits=st.sampled_from([2, 4, 8]),
    axis=st.sampled_from([-2, -1]),
    group=st.sampled_from([1, 2, 3, 4, 8]),
    ngroups=st.integers(1, 4),
    other=st.integers(1, 7),
    mag=st.sampled_from([1e-3, 1.0, 300.0]),
    src=st.sampled_from([np.float16, np.float32, np.float64]),
)
def test_torch_quantize_bit_identical_property(seed, bits, axis, group, ngroups, other, mag, src):
    """Any group size (not only powers of two), magnitudes, input dtypes: bit-identical."""
    rng = np.random.default_rng(seed)
    shape = (2, group * ngroups, other) if axis == -2 else (2, other, group * ngroups)
    x = (rng.normal(size=shape) * mag).astype(src)
    c, s, z = rq.quantize(x, bits, group, axis)
    tc, ts, tz = fq.quantize(torch.from_numpy(x), bits, group, axis, backend="torch")
    _same_bits(tc.numpy(), c)
    _same_bits(ts.numpy(), s)
    _same_bits(tz.numpy(), z)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    bits=st.sampled_from([2, 4, 8]),
    length=st.integers(0, 70),
    axis=st.sampled_from([0, 1, -1]),
)
def test_pack_unpack_roundtrip(seed, bits, length, axis):
    """``unpack(pack(c)) == c`` for every length (partial last word included); words equal the reference (both
    packers, top codes with the sign bit set included)."""
    rng = np.random.default_rng(seed)
    shape = [3, 2, 4]
    shape[axis] = length
    c = rng.integers(0, 2**bits, size=shape).astype(np.uint8)
    w = fq.pack(torch.from_numpy(c), bits, axis)
    _same_bits(w.numpy(), rq.pack(c, bits, axis))
    _same_bits(fq.unpack(w, bits, axis, length, backend="torch").numpy(), c)
    # the quantizer's unchecked packer (what quantize_pack uses on the torch path): the same words
    _same_bits(fq._pack_codes(torch.from_numpy(c), bits, axis).numpy(), rq.pack(c, bits, axis))


def test_numpy_in_numpy_out_and_dequantize():
    x = _data(1)
    c, s, z = fq.quantize(x, 2, 32, -2)
    assert isinstance(c, np.ndarray)
    np.testing.assert_array_equal(
        fq.dequantize(torch.from_numpy(c), torch.from_numpy(s), torch.from_numpy(z), 32, -2).numpy(),
        rq.dequantize(c, s, z, 32, -2),
    )


def test_bad_input_named():
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="bits"):
        fq.quantize(x, 3, 4, -1)
    with pytest.raises(ValueError, match="group"):
        fq.quantize(x, 2, 3, -1)
    with pytest.raises(TypeError, match="x must"):
        fq.quantize(torch.zeros(4, 8, dtype=torch.int32), 2, 4, -1)
    with pytest.raises(ValueError, match="NaN"):
        fq.quantize(torch.full((4, 8), float("nan")), 2, 4, -1)
    with pytest.raises(ValueError, match="codes must lie"):
        fq.pack(torch.full((4, 8), 4, dtype=torch.uint8), 2, -1)
    with pytest.raises(ValueError, match="scale_dtype"):
        fq.quantize(torch.full((4, 8), 1e6), 2, 4, -1)


TRITON_CASES = [
    (2, -2, 32, np.float16),
    (4, -1, 16, np.float16),
    (8, -2, 8, np.float32),
    (2, -1, 4, np.float32),
    (4, -2, 16, np.float32),
    (8, -1, 32, np.float16),
]


@needs_interpreter
@pytest.mark.parametrize("bits,axis,group,sdt", TRITON_CASES)
def test_triton_quantize_pack_bit_identical_interpreter(bits, axis, group, sdt):
    x = _data(bits + group, shape=(2, 3, 64, 32))[:1]
    c, s, z = rq.quantize(x, bits, group, axis, sdt)
    with triton_interpreter():
        w, ts, tz = fq.quantize_pack(torch.from_numpy(x), bits, group, axis, sdt, backend="triton")
        u = fq.unpack(w, bits, axis, x.shape[axis], backend="triton")
    _same_bits(w.numpy(), rq.pack(c, bits, axis))
    _same_bits(ts.numpy(), s)
    _same_bits(tz.numpy(), z)
    _same_bits(u.numpy(), c)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits,axis,group,sdt", CASES)
def test_triton_quantize_pack_bit_identical_gpu(bits, axis, group, sdt):
    """Compiled kernels on real cache shapes (fp16 and bf16 input): bit-identical to the reference."""
    for tdt in (torch.float16, torch.bfloat16):
        xt = (torch.randn(2, 8, 1024, 128, generator=torch.Generator().manual_seed(bits)) * 3).to(tdt)
        x = xt.float().numpy()
        c, s, z = rq.quantize(x, bits, group, axis, sdt)
        w, ts, tz = fq.quantize_pack(xt.cuda(), bits, group, axis, sdt, backend="triton")
        _same_bits(w.cpu().numpy(), rq.pack(c, bits, axis))
        _same_bits(ts.cpu().numpy(), s)
        _same_bits(tz.cpu().numpy(), z)
        _same_bits(fq.unpack(w, bits, axis, x.shape[axis], backend="triton").cpu().numpy(), c)
