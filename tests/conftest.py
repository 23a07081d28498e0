"""Shared fixtures: deterministic data factories seeded by the problem size (goodpoints-style)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import settings

from balancekv.synthetic import make_kv


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture
def kv_factory():
    """``make(family, heads, n, d, ...)`` -> (K, V, Q) float64, reproducible for given arguments."""
    return make_kv


@pytest.fixture
def small_kv():
    return make_kv("gaussian", heads=3, n=96, d=8, q=5, seed=11)


def naive_attention(Q, K, V, scale, bias=None):
    """Textbook softmax attention via scipy, independent of the package's stable-exponential code."""
    from scipy.special import softmax

    a = scale * np.einsum("...qd,...nd->...qn", Q, K)
    if bias is not None:
        a = a + bias[..., None, :]
    return softmax(a, axis=-1) @ V


# Hypothesis profiles: "ci" (default; derandomized so CI is reproducible, bounded in time) and
# "nightly" (HYPOTHESIS_PROFILE=nightly: many more examples). Tests that pin max_examples in their
# own @settings keep it; the fuzz suite (tests/test_fuzz.py) takes the profile's.
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("nightly", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
