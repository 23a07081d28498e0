"""Where Triton kernels come from, and when they may run.

Triton kernels live in modules ``balancekv.fast.kernels_*``, imported lazily so
that ``import balancekv`` never imports Triton. ``@triton.jit`` decides at
*decoration* time whether a kernel is compiled for the GPU or run by the
CPU interpreter (``TRITON_INTERPRET=1``), so :func:`kernels` re-imports a kernel
module when the interpreter setting changed since it was imported. Triton's own
library functions (``tl.sum``, ``tl.max``, ...) are decorated once, when ``triton``
is first imported: interpreted kernels need ``TRITON_INTERPRET=1`` at that moment
(``tests/_fast_helpers.py`` arranges it on machines without CUDA).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_importable() -> bool:
    """Whether Triton is installed (checked without importing it: importing decides, once per
    process, whether Triton's own library functions are compiled or interpreted)."""
    return importlib.util.find_spec("triton") is not None


def can_run(*tensors: torch.Tensor) -> bool:
    """True when a Triton kernel can run on these tensors (CUDA tensors, or CPU under the interpreter)."""
    if not triton_importable():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in tensors)


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """The dispatch rule of SPEC section 10 for one call.

    ``"triton"``: Triton if it can run (CUDA tensors, or the interpreter on CPU),
    else a ``ValueError``; ``"auto"``: Triton on CUDA tensors, torch on CPU;
    ``"torch"``: never Triton.
    """
    if backend == "torch":
        return False
    if backend == "triton":
        if not can_run(*tensors):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors)")
        return True
    if backend == "auto":
        return all(t.is_cuda for t in tensors) and triton_importable()
    raise ValueError(f"backend must be one of 'auto', 'torch', 'triton', got {backend!r}")


def kernels(name: str):
    """The kernel module ``balancekv.fast.<name>``, (re)built for the current interpreter setting."""
    mod = importlib.import_module(f"balancekv.fast.{name}")
    if getattr(mod, "_INTERPRETED", None) != interpreting():
        mod = importlib.reload(mod)
    return mod


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()
