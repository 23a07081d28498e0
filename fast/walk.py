"""The [ALS] self-balancing walk on Gram matrices, vectorised over problems (torch / Triton).

Same semantics as :func:`balancekv.reference.walk.gram_walk_signs` (the definition):
step ``i`` of problem ``b`` computes ``g = sum_{j<i} G[b,i,j] x_j``; FAIL iff ``|g| > c``
(the problem's signs are 0 from that step on and ``failed_at[b] = i``); otherwise
``x_i = +1`` iff ``r_i < 1/2 - g/(2c)``. The sequential loop runs once for all ``B``
problems (torch: one vector operation per step; Triton: one program per problem,
running dots in registers). Signs agree with the reference for the same uniforms
except at genuine ties (``|r_i - p_i|`` at rounding level; SPEC section 11).
"""

from __future__ import annotations

import numpy as np
import torch

from . import _triton as T

__all__ = ["balance_walk_loop", "gram_walk_signs", "walk_loop"]

#: largest block the Triton kernels keep in registers (larger problems run the torch loop)
MAX_TRITON_BLOCK = 256


def _as_tensor(x, name, dtype=None, device=None):
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
        t = torch.as_tensor(np.asarray(x))
    else:
        raise TypeError(f"{name} must be a torch tensor or NumPy array, got {type(x).__name__}")
    if dtype is not None or device is not None:
        t = t.to(dtype=dtype or t.dtype, device=device or t.device)
    return t


def walk_loop(
    G: torch.Tensor,
    r: torch.Tensor,
    threshold_fn,
    *,
    forced_first: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    symmetric: bool = False,
    row_scale: torch.Tensor | None = None,
):
    """Sequential sign loop shared by the torch walks, vectorised over the leading axis.

    ``G (B, n, n)`` (row ``i``, columns ``j < i`` are read through running dots; ``symmetric``: ``G``
    is symmetric, so its rows serve as its columns), ``row_scale (B, n)`` (optional): step ``i`` sees
    the running dot times ``row_scale[:, i]`` (a row-normalised kernel without building it),
    ``r (B, n)`` uniforms; ``threshold_fn(g) -> (p, fail)`` gives the probability of
    ``+1`` and (optionally) a FAIL flag per problem. Invalid steps get sign 0 and do
    not move the walk. Returns ``(x (B, n) float, failed_at (B,) int64)``.
    """
    B, n, _ = G.shape
    # column i of G (the update of every later running dot) as a contiguous row: a strided
    # column read per step would touch one cache line per element
    # (the kernel matrices of the balancing walks are symmetric: then G itself is that layout)
    Gc = G if symmetric else G.transpose(1, 2).contiguous()
    x = torch.zeros((B, n), dtype=G.dtype, device=G.device)
    run = torch.zeros((B, n), dtype=G.dtype, device=G.device)
    failed_at = torch.full((B,), -1, dtype=torch.int64, device=G.device)
    alive = torch.ones(B, dtype=torch.bool, device=G.device)
    one = torch.ones((), dtype=G.dtype, device=G.device)
    zero = torch.zeros((), dtype=G.dtype, device=G.device)
    step = torch.full((B,), 0, dtype=torch.int64, device=G.device)
    # each step's operations are small ((B, n) at most): on CPU, intra-op thread fork/join costs
    # more than the arithmetic (30x on a loaded 2-core machine), so the loop runs on one thread
    threads = torch.get_num_threads()
    if G.device.type == "cpu":
        torch.set_num_threads(1)
    state = [failed_at, alive]
    try:
        _steps(n, run, r, x, Gc, threshold_fn, forced_first, valid, one, zero, step, state, row_scale)
    finally:
        torch.set_num_threads(threads)
    return x, state[0]


def balance_walk_loop(G, r, gamma: float, *, first, valid, row_scale=None):
    """The signs ``(B, n)`` (float) of :func:`walk_loop` for the balancing walk of a symmetric ``G``: step ``i``
    gives ``+1`` iff ``r_i < clip(1/2 - gamma s_i g_i, 0, 1)`` (``s = row_scale``, 1 when ``None``), ``+1`` at the
    ``first`` valid step, 0 at invalid steps (no FAIL). The same test with fewer operations per step: the clip is
    dropped (``r`` lies in ``[0, 1)``, so the comparison is the same) and the test is rewritten as
    ``g_i < t_i = (1/2 - r_i) / (gamma s_i)`` with the thresholds ``t`` computed before the loop (``gamma s_i > 0``;
    ``gamma = 0`` gives ``t = +-inf``, or NaN at ``r_i = 1/2``, where the comparison is false as ``r_i < 1/2``
    is: the same signs). Up to the rounding of the two forms (a flip needs ``r_i`` within an ulp of the
    threshold) the signs are the reference's. The sign of a valid step comes from precomputed ``(n, B)`` tables
    (``+1`` / ``-1`` or ``+1`` at the first step / ``0``) in one ``where`` written in place; a step is three
    operations (compare, select, update)."""
    B, n, _ = G.shape
    dt, dev = G.dtype, G.device
    one = torch.ones((), dtype=dt, device=dev)
    zero = torch.zeros((), dtype=dt, device=dev)
    pos = torch.where(valid, one, zero).T.contiguous()  # sign where g_i < t_i
    neg = torch.where(first, one, torch.where(valid, -one, zero)).T.contiguous()  # sign otherwise
    den = float(gamma) if row_scale is None else float(gamma) * row_scale.to(dt)
    thr = ((0.5 - r.to(dt)) / den).T.contiguous()  # (n, B)
    x = torch.zeros((n, B), dtype=dt, device=dev)
    run = torch.zeros((B, n), dtype=dt, device=dev)
    # every per-step view made once (unbind)
    cols, rows = run.unbind(1), G.unbind(1)
    xs, xc = x.unbind(0), x[:, :, None].unbind(0)
    tt, pp, nn = thr.unbind(0), pos.unbind(0), neg.unbind(0)
    lt, where, update = torch.lt, torch.where, run.addcmul_
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)  # as in walk_loop: the steps are too small for intra-op threads
    try:
        for i in range(n):
            where(lt(cols[i], tt[i]), pp[i], nn[i], out=xs[i])
            update(rows[i], xc[i])
    finally:
        torch.set_num_threads(threads)
    return x.T


def _steps(n, run, r, x, Gc, threshold_fn, forced_first, valid, one, zero, step, state, row_scale=None):
    failed_at, alive = state
    for i in range(n):
        g = run[:, i] if row_scale is None else run[:, i] * row_scale[:, i]
        p, fail = threshold_fn(g)
        if fail is not None:
            new_fail = alive & fail
            failed_at = torch.where(new_fail, step.fill_(i), failed_at)
            alive = alive & ~fail
        xi = torch.where(r[:, i] < p, one, -one)
        if forced_first is not None:
            xi = torch.where(forced_first[:, i], one, xi)
        ok = alive if valid is None else alive & valid[:, i]
        xi = torch.where(ok, xi, zero)
        x[:, i] = xi
        run.addcmul_(Gc[:, i], xi[:, None])
    state[0], state[1] = failed_at, alive


def gram_walk_signs(G, uniforms, c, *, backend: str = "auto"):
    """``(signs (B, n) int8, failed_at (B,) int64)`` of the [ALS] walk; see the reference.

    Accepts NumPy arrays (results as NumPy) or torch tensors (results as torch on the
    input's device). Computes in float64 for float64 input, else float32.
    """
    if not isinstance(G, torch.Tensor):
        x, f = gram_walk_signs(_as_tensor(G, "G"), uniforms, c, backend=backend)
        return x.cpu().numpy(), f.cpu().numpy()
    Gt = G
    if Gt.ndim != 3 or Gt.shape[1] != Gt.shape[2]:
        raise ValueError(f"G must have shape (B, n, n), got {tuple(Gt.shape)}")
    if not torch.is_floating_point(Gt):
        raise TypeError(f"G must be a floating tensor, got {Gt.dtype}")
    B, n, _ = Gt.shape
    dt = torch.float64 if Gt.dtype == torch.float64 else torch.float32
    Gt = Gt.to(dt)
    r = _as_tensor(uniforms, "uniforms", device=Gt.device)
    if tuple(r.shape) != (B, n):
        raise ValueError(f"uniforms must have shape {(B, n)}, got {tuple(r.shape)}")
    if not bool(((r >= 0) & (r < 1)).all()):
        raise ValueError("uniforms must lie in [0, 1)")
    r = r.to(dt)
    cc = torch.broadcast_to(_as_tensor(c, "c", dtype=dt, device=Gt.device), (B,)).contiguous()
    if not bool((cc > 0).all()):
        raise ValueError("c must be > 0")
    if n <= MAX_TRITON_BLOCK and T.use_triton(backend, Gt):
        ker = T.kernels("kernels_walk")
        X = torch.empty((B, n), dtype=torch.int8, device=Gt.device)
        F = torch.empty((B,), dtype=torch.int32, device=Gt.device)
        ker.gram_walk_kernel[(B,)](
            Gt,
            r.contiguous(),
            cc,
            X,
            F,
            n,
            Gt.stride(0),
            Gt.stride(1),
            Gt.stride(2),
            F64=dt == torch.float64,
            BLOCK=max(16, T.next_pow2(n)),
        )
        return X, F.to(torch.int64)
    x, failed_at = walk_loop(Gt, r, lambda g: (0.5 - g / (2 * cc), g.abs() > cc))
    return x.to(torch.int8), failed_at
