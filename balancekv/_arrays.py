"""Moving arrays between the caller's kind (NumPy or torch) and the reference's NumPy.

The reference implementations compute in float64 NumPy. A caller may hand us
NumPy arrays or torch tensors; results go back in the same kind, on the same
device. Nothing here writes into the caller's memory: conversions copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

try:  # torch is a hard dependency, but keep the reference importable without it
    import torch
except ImportError:  # pragma: no cover - exercised only in torch-less installs
    torch = None


def is_torch(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


@dataclass(frozen=True)
class Kind:
    """Where an array came from: ``"numpy"`` or ``"torch"`` (with device and dtype)."""

    lib: str
    dtype: Any
    device: Any = None

    @classmethod
    def of(cls, x: Any) -> "Kind":
        if is_torch(x):
            return cls("torch", x.dtype, x.device)
        return cls("numpy", np.asarray(x).dtype)

    @property
    def is_torch(self) -> bool:
        return self.lib == "torch"

    def wrap(self, x: np.ndarray, dtype: Any = None) -> Any:
        """A NumPy array in this kind (copying), in ``dtype`` or this kind's float dtype."""
        if self.lib == "numpy":
            return np.array(x, dtype=dtype if dtype is not None else self.dtype, copy=True)
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        return t.to(dtype if dtype is not None else self.dtype)

    def wrap_float(self, x: np.ndarray) -> Any:
        """Weights and outputs: float64 for NumPy; float32 (or float64) for torch."""
        if self.lib == "numpy":
            return np.array(x, dtype=np.float64, copy=True)
        dt = torch.float64 if self.dtype == torch.float64 else torch.float32
        return torch.from_numpy(np.ascontiguousarray(x)).to(device=self.device, dtype=dt)


def to_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """A float64 NumPy copy of ``x`` (NumPy array or torch tensor, any device)."""
    if is_torch(x):
        return x.detach().to("cpu", torch.float64).numpy().astype(dtype, copy=True)
    return np.array(x, dtype=dtype, copy=True)
