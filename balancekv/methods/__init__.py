"""The method registry: adding a method means one file here and one line below.

Entries name ``module:Class`` and are imported on first use, so a method's
optional dependencies load only when it is asked for.
"""

from __future__ import annotations

import importlib

from .base import Method

REGISTRY: dict[str, str] = {
    "exact": "balancekv.methods.exact:Exact",
    "uniform": "balancekv.methods.uniform:Uniform",
    "subgen": "balancekv.methods.subgen:SubGen",
    "streaming": "balancekv.methods.streaming:Streaming",
    "balance": "balancekv.methods.balance:Balance",
    "uniform-halving": "balancekv.methods.balance:UniformHalving",
    "balance-stream": "balancekv.methods.balance_stream:BalanceStream",
    "quant": "balancekv.methods.quant:Quant",
    "h2o": "balancekv.methods.h2o:H2O",
    "snapkv": "balancekv.methods.snapkv:SnapKV",
    "minikv": "balancekv.methods.minikv:MiniKV",
    "balance+quant": "balancekv.methods.balance_quant:BalanceQuant",
    "auto": "balancekv.auto:Auto",  # per head, the best of several methods (balancekv/auto.py)
    # further methods are added by their issues, one line each
}

_cache: dict[str, Method] = {}


def get_method(name: str) -> Method:
    """The method object registered under ``name``; ``ValueError`` for an unknown name."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}")
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {sorted(REGISTRY)}")
    if name not in _cache:
        module, cls = REGISTRY[name].split(":")
        _cache[name] = getattr(importlib.import_module(module), cls)()
    return _cache[name]


def available_methods() -> list[str]:
    return list(REGISTRY)
