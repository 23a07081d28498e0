"""An independent count of the memory an object keeps alive (for the nbytes honesty tests).

Written differently from ``balancekv._arrays.held_nbytes`` on purpose: it follows every
reference the garbage collector knows (``gc.get_referents``), not attributes, so a hidden copy
in a closure, a cell or a container the package forgot about is still found. Each NumPy base
buffer and each torch storage is counted once.
"""

from __future__ import annotations

import gc
import types

import numpy as np
import torch

_SKIP = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, str, bytes)


def reachable_array_bytes(root, stop=()) -> int:
    """Bytes of the distinct NumPy buffers and torch storages reachable from ``root``.

    ``stop``: objects not to traverse (e.g. the model a cache was built for).
    """
    stop_ids = {id(o) for o in stop}
    seen, storages, todo = set(), {}, [root]
    while todo:
        o = todo.pop()
        if id(o) in seen or id(o) in stop_ids or isinstance(o, _SKIP):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            storages[("t", st.data_ptr())] = st.nbytes()
            continue
        if isinstance(o, np.ndarray):
            b = o
            while isinstance(b.base, np.ndarray):
                b = b.base
            storages[("n", b.ctypes.data)] = b.nbytes
            continue
        todo.extend(gc.get_referents(o))
    return int(sum(storages.values()))
