"""Choosing an implementation: NumPy reference, torch, or Triton (SPEC section 10).

Methods ask for an algorithm by its reference name, e.g.
``resolve("blocked_walk_signs", ctx.backend)``; this returns the function from
:mod:`balancekv.reference` or the same-named one from :mod:`balancekv.fast`.
``"auto"`` means Triton for CUDA tensors, torch otherwise; the reference stays
the definition and the fallback when a fast version does not exist yet.
"""

from __future__ import annotations

import importlib


def resolve(name: str, backend: str = "reference"):
    """The function ``name`` for ``backend`` (``reference``, ``torch``, ``triton``, ``auto``)."""
    if backend in ("torch", "triton", "auto"):
        fast = importlib.import_module("balancekv.fast")
        impl = getattr(fast, name, None)
        if impl is not None:
            return impl
        if backend != "auto":
            raise ValueError(f"backend {backend!r} has no implementation of {name!r} yet")
    ref = importlib.import_module("balancekv.reference")
    return getattr(ref, name)
