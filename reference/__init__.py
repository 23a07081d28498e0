"""NumPy reference implementations: the definitions every fast path is checked against.

Nothing here imports torch or triton.
"""

from .blocked_balance import blocked_balance, blocked_walk_signs, fixed_size_halving
from .merge_reduce import MergeAndReduce
from .quantization import dequantize, pack, quantize, unpack
from .sampling import uniform_sample_indices
from .selection import h2o_scores, pyramid_budgets, select_top, snapkv_scores, streaming_indices
from .softmax_attention import attention, relative_error, weighted_attention
from .softmax_balance import softmax_balance, softmax_balance_signs
from .subgen import SubGenState, greedy_k_center, online_clusters, subgen_offline, subgen_stream
from .walk import WalkFailure, default_threshold, gram_walk_signs, self_balancing_walk

__all__ = ["attention", "relative_error", "uniform_sample_indices", "weighted_attention"]
__all__ += [
    "WalkFailure",
    "default_threshold",
    "gram_walk_signs",
    "self_balancing_walk",
    "softmax_balance",
    "softmax_balance_signs",
    "blocked_balance",
    "blocked_walk_signs",
    "fixed_size_halving",
    "MergeAndReduce",
]

__all__ += [
    "quantize",
    "dequantize",
    "pack",
    "unpack",
    "h2o_scores",
    "snapkv_scores",
    "pyramid_budgets",
    "select_top",
    "streaming_indices",
]

__all__ += ["SubGenState", "greedy_k_center", "online_clusters", "subgen_offline", "subgen_stream"]
