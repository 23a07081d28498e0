"""The two kinds of arrays a cache lives in: NumPy (the reference path) and torch (the fast path).

NumPy input runs the NumPy reference in float64. Torch input stays torch on the
caller's device from validation to the result: the fast path computes in
float32 (float64 when given float64; bf16/fp16 inputs compute in fp32) and
stores kept tokens in the caller's dtype. The only host data on the torch path
is the randomness: uniforms are drawn from a NumPy generator (so both paths see
the same random numbers for the same seed) and moved to the device once per
round. Nothing here writes into the caller's memory.
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


def is_torch_dtype(dtype: Any) -> bool:
    return torch is not None and isinstance(dtype, torch.dtype)


def compute_dtype(dtype: Any):
    """The dtype the fast path computes in for storage ``dtype``: float64 stays, the rest is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Kind:
    """Where an array came from: ``"numpy"`` or ``"torch"`` (with device and dtype)."""

    lib: str
    dtype: Any
    device: Any = None
    #: the values' storage dtype when it differs from the keys' (mixed-precision input keeps both)
    vdtype: Any = None

    @classmethod
    def of(cls, x: Any, values: Any = None) -> Kind:
        vd = None if values is None else values.dtype
        if is_torch(x):
            return cls("torch", x.dtype, x.device, vd if vd != x.dtype else None)
        return cls("numpy", np.asarray(x).dtype, None, vd if vd != np.asarray(x).dtype else None)

    @property
    def value_dtype(self):
        return self.dtype if self.vdtype is None else self.vdtype

    def for_values(self) -> Kind:
        """The kind of the values' stores (their own dtype)."""
        return Kind(self.lib, self.value_dtype, self.device)

    @staticmethod
    def itemsize(dtype) -> int:
        return int(torch.empty((), dtype=dtype).element_size()) if is_torch_dtype(dtype) else np.dtype(dtype).itemsize

    @property
    def is_torch(self) -> bool:
        return self.lib == "torch"

    @property
    def compute(self):
        """The dtype computations run in: float64 for NumPy, :func:`compute_dtype` for torch."""
        return compute_dtype(self.dtype) if self.is_torch else np.float64

    def wrap(self, x: np.ndarray, dtype: Any = None) -> Any:
        """A NumPy array in this kind (copying), in ``dtype`` or this kind's dtype."""
        if self.lib == "numpy":
            return np.array(x, dtype=dtype if dtype is not None else self.dtype, copy=True)
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        return t.to(dtype if dtype is not None else self.dtype)


def to_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """A NumPy copy of ``x`` (NumPy array or torch tensor, any device): the reference path's input."""
    if is_torch(x):
        return x.detach().to("cpu", torch.float64).numpy().astype(dtype, copy=True)
    return np.array(x, dtype=dtype, copy=True)


def like(x: Any, data: Any, dtype: Any = None) -> Any:
    """``data`` (NumPy array or scalar) in ``x``'s kind: a tensor on ``x``'s device, or NumPy."""
    if is_torch(x):
        return torch.as_tensor(np.asarray(data), device=x.device, dtype=dtype)
    return np.asarray(data, dtype=dtype)


def host_uniforms(rng: np.random.Generator, shape: tuple, like_x: Any) -> Any:
    """``rng.random(shape)`` in ``like_x``'s kind and compute dtype (the same numbers on every path)."""
    u = rng.random(shape)
    if is_torch(like_x):
        return torch.from_numpy(u).to(device=like_x.device, dtype=like_x.dtype)
    return u


def cat(arrays, axis: int):
    """Concatenate NumPy arrays or torch tensors along ``axis``."""
    arrays = list(arrays)
    if is_torch(arrays[0]):
        return torch.cat(arrays, dim=axis)
    return np.concatenate(arrays, axis=axis)


def take_rows(X: Any, idx: Any) -> Any:
    """``X[..., idx[..., j], :]`` per leading index: rows ``idx (…, m)`` of ``X (…, n, f)``."""
    if is_torch(X):
        lead, n, f = X.shape[:-2], X.shape[-2], X.shape[-1]
        if X.is_contiguous() and tuple(idx.shape[:-1]) == tuple(lead):
            # whole rows of the flattened (…*n, f) array: several times faster than gather on CPU
            H = int(np.prod(lead, dtype=np.int64))
            off = torch.arange(0, H * n, n, device=idx.device).reshape(*lead, 1)
            rows = X.reshape(H * n, f).index_select(0, (idx + off).reshape(-1))
            return rows.reshape(*idx.shape, f)
        return torch.gather(X, -2, idx[..., None].expand(*idx.shape, X.shape[-1]))
    return np.take_along_axis(X, idx[..., None], axis=-2)


def take_heads(x: Any, idx: Any) -> Any:
    """A copy of rows ``idx`` (host ints, or a tensor on ``x``'s device) of ``x``'s first axis (the heads).

    Always a fresh array (never a view), so what it returns holds only those heads' bytes."""
    if is_torch(x):
        i = idx if is_torch(idx) else torch.as_tensor(np.asarray(idx, np.int64), device=x.device)
        return x.index_select(0, i.to(x.device))
    return np.array(x[np.asarray(idx, np.int64)], copy=True)


def isfinite(x: Any) -> Any:
    return torch.isfinite(x) if is_torch(x) else np.isfinite(x)


def held_nbytes(*roots: Any) -> int:
    """Bytes of every NumPy array and torch tensor reachable from ``roots``, each storage counted once.

    Follows attributes (``__dict__``, ``__slots__``), dataclass fields, lists, tuples, sets and dict
    values. A NumPy view is billed as its base array, a torch view as its whole storage. This is
    the memory a cache object keeps alive, not an accounting formula.
    """
    seen_obj: set[int] = set()
    storages: dict[Any, int] = {}
    stack = list(roots)
    while stack:
        o = stack.pop()
        if o is None or isinstance(o, (str, bytes, int, float, bool, complex, type)) or id(o) in seen_obj:
            continue
        seen_obj.add(id(o))
        if is_torch(o):
            st = o.untyped_storage()
            storages[("t", st.data_ptr(), str(o.device))] = st.nbytes()
        elif isinstance(o, np.ndarray):
            base = o
            while isinstance(base.base, np.ndarray):
                base = base.base
            storages[("n", base.__array_interface__["data"][0])] = base.nbytes
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif isinstance(o, np.random.Generator) or callable(o) and not hasattr(o, "__dict__"):
            continue
        else:
            d = getattr(o, "__dict__", None)
            if d is not None:
                stack.extend(d.values())
            for slot in getattr(type(o), "__slots__", ()):
                stack.append(getattr(o, slot, None))
    return int(sum(storages.values()))
