"""Helpers shared by the tests of :mod:`balancekv.fast` (not a test module)."""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


@contextlib.contextmanager
def triton_interpreter():
    """Run Triton kernels on CPU tensors: ``TRITON_INTERPRET=1`` for the duration only.

    Kernel modules are (re)decorated by ``balancekv.fast._triton.kernels`` when the setting
    changes, so this neither needs to run before ``import triton`` nor leaks into other tests
    (their ``auto`` dispatch only picks Triton for CUDA tensors).
    """
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


# Triton decides when it is first imported whether its library functions (tl.sum, tl.max, ...)
# are compiled or interpreted. Without CUDA nothing can be compiled anyway, so import it here,
# once, in interpreter mode, and restore the environment: the variable stays unset for every
# other test, whose "auto" dispatch never picks Triton for CPU tensors.
if not HAS_CUDA and "triton" not in sys.modules:
    with triton_interpreter():
        try:
            import triton.language  # noqa: F401
        except ImportError:  # pragma: no cover
            pass


def _interpreter_usable() -> bool:
    try:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(standard.sum, InterpretedFunction)


INTERPRETER_USABLE = _interpreter_usable()
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER_USABLE,
    reason="Triton was imported in compiled mode (CUDA present, or imported before TRITON_INTERPRET=1)",
)


def first_difference(a: np.ndarray, b: np.ndarray):
    """``(row, position)`` of the first differing entry of each row that differs."""
    a, b = np.asarray(a), np.asarray(b)
    out = []
    for row in np.nonzero((a != b).any(axis=-1))[0]:
        out.append((int(row), int(np.argmax(a[row] != b[row]))))
    return out


def slot_table(c, h):
    """Head ``h``'s weighted token set: rows ``(position, total num weight, total den weight)`` over its
    valid slots, slots holding the same token merged (a sampler may store a token twice), sorted."""
    tolist = lambda x: np.asarray(x.tolist() if torch.is_tensor(x) else x, dtype=np.float64)
    pos, nl, dl = tolist(c.positions)[h], tolist(c.num_logw)[h], tolist(c.den_logw)[h]
    ok = np.isfinite(nl) | np.isfinite(dl)
    rows = {}
    for p, a, b in zip(pos[ok], np.exp(nl[ok]), np.exp(dl[ok])):
        ra, rb = rows.get(p, (0.0, 0.0))
        rows[p] = (ra + a, rb + b)
    return np.array([(p, *rows[p]) for p in sorted(rows)])


def captured_eps_search(K, V, eps, **kwargs):
    """``balancekv.compress(K, V, eps, **kwargs)`` with its eps search captured: ``(cache, seen)``, ``seen`` holding
    the search's arguments (``work``, ``name``, ``meth``, ``opts``, ``levels``, ``cv``) and results (``scores``,
    ``builts``)."""
    import balancekv
    from balancekv import budget

    seen = {}
    real = budget.eps_search

    def spy(work, name, meth, opts, levels, cv, e, progress=None):
        seen.update(work=work, name=name, meth=meth, opts=opts, levels=levels, cv=cv)
        out = real(work, name, meth, opts, levels, cv, e, progress)
        seen["scores"], seen["builts"] = out
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(budget, "eps_search", spy)
        c = balancekv.compress(K, V, eps, **kwargs)
    return c, seen


def planted_heavy_hitters(seed=0, H=2, n=512, d=16, planted=8):
    """Keys of norm ~0.3 with ``planted`` middle tokens along one direction that the probes (and the test queries)
    point at: the attention reads those few tokens, the rest is background."""
    rng = np.random.default_rng(seed)
    K = 0.3 * rng.standard_normal((H, n, d))
    V = rng.standard_normal((H, n, d))
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    P = np.sort(rng.choice(np.arange(100, 400), planted, replace=False))
    K[:, P] = 6.0 * u + 0.1 * rng.standard_normal((H, planted, d))
    Qp = 6.0 * u + 0.3 * rng.standard_normal((H, 24, d))
    Qt = 6.0 * u + 0.3 * rng.standard_normal((H, 32, d))
    return K, V, Qp, Qt, P
