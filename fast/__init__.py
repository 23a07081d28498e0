"""Torch (and, on CUDA, Triton) implementations of the reference functions.

Same names and semantics as :mod:`balancekv.reference`; only speed and device differ (one exception:
``weighted_attention`` masks by ``key_positions`` / ``query_positions``, not by the reference's boolean ``mask``).
"""

from .blocked_balance import blocked_balance, blocked_walk_signs, fixed_size_halving
from .decode_attention import Packed, attend_parts, decode_attention
from .quantization import dequantize, pack, quantize, quantize_pack, unpack
from .selection import h2o_scores, select_top, snapkv_scores
from .softmax_attention import attention, weighted_attention
from .subgen import greedy_k_center, online_clusters, subgen_offline, subgen_stream
from .walk import gram_walk_signs

__all__ = [
    "Packed",
    "attend_parts",
    "attention",
    "blocked_balance",
    "blocked_walk_signs",
    "decode_attention",
    "dequantize",
    "fixed_size_halving",
    "gram_walk_signs",
    "h2o_scores",
    "pack",
    "quantize",
    "quantize_pack",
    "select_top",
    "snapkv_scores",
    "unpack",
    "weighted_attention",
]
__all__ += ["greedy_k_center", "online_clusters", "subgen_offline", "subgen_stream"]
