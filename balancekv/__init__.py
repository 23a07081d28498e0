"""balancekv: KV-cache compression for transformer attention with provable error bounds.

Quick start::

    import balancekv
    ckv = balancekv.compress(K, V, 0.05)          # BalanceKV, target: 5% mean error on the next queries
    out = ckv.attend(Q)                           # estimated attention
    ckv.nbytes, ckv.ratio, ckv.diagnostics

See ``balancekv.compress`` for methods and options, ``proofs/`` for the theorems.
"""

from . import synthetic  # noqa: F401  (balancekv.synthetic: the data families)
from .api import KeepBudgetWarning, attention, compress
from .compressed import CompressedKV
from .methods import available_methods, get_method

__all__ = ["CompressedKV", "KeepBudgetWarning", "attention", "available_methods", "compress", "get_method"]
__version__ = "0.1.0"
