"""Torch (and, on CUDA, Triton) implementations of the reference functions.

Same names and semantics as :mod:`balancekv.reference`; only speed and device differ.
"""
from .softmax_attention import attention, weighted_attention

__all__ = ["attention", "weighted_attention"]
