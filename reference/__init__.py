"""NumPy reference implementations: the definitions every fast path is checked against.

Nothing here imports torch or triton.
"""
from .softmax_attention import attention, relative_error, weighted_attention
from .sampling import uniform_sample_indices

__all__ = ["attention", "relative_error", "uniform_sample_indices", "weighted_attention"]
