"""SubGen [SUB] (arXiv 2402.06082) in torch: nearest-centre assignment and sampler updates, batched over heads.

Same names and semantics as :mod:`balancekv.reference.subgen` (the definition; SPEC
sections 5, 10, 11): :func:`greedy_k_center`, :func:`online_clusters`,
:func:`subgen_stream`, :func:`subgen_offline`, fed the same uniforms in the same layout.
The two SubGen functions return the reference's :class:`~balancekv.reference.subgen.SubGenState`
(NumPy), so reading the sketch (``entries``, ``padded``, ``estimate``) and continuing the
stream during decoding are the reference's code.

How the stream is computed without a per-token, per-head loop
--------------------------------------------------------------
The reference updates every head token by token. Only the clustering is sequential;
given it, every random choice is a comparison of one uniform with a probability known
in closed form:

* **clustering** (deterministic): tokens are processed in blocks for all heads at once;
  a block's distances to the existing centres are one batched operation, then the block
  is scanned event by event: the first token whose nearest centre is farther than the
  threshold becomes a centre, and only the block's later tokens are compared with it.
  The loop runs once per block and once per new centre, not once per token.
* **reservoirs**: token ``j`` is the ``r_j``-th member of its cluster, so slot ``i`` takes
  it iff ``U[j, h, i] < 1 / r_j``; a slot ends holding the *last* member that took it
  (a scatter-max over tokens).
* **numerator**: ``mu_j`` is the running sum of ``||v||^2`` (a sequential cumulative sum,
  the reference's order); slot ``i`` takes token ``j`` iff ``||v_j||^2 > 0`` and
  ``U[j, h, t_max + i] < ||v_j||^2 / mu_j``; again the last taker is kept.

Equivalence (float64, CPU): distances are bit-identical to the reference's
``np.linalg.norm(..., axis=-1)`` -- the squared differences are summed in NumPy's pairwise
order (:func:`_pairwise_sum`) and the square root is NumPy's (torch's vectorised float64
``sqrt`` on CPU is not always correctly rounded) -- so centres, assignments, distances and
radii are identical, and so are the reservoir slots (their probabilities ``1 / r`` are exact).
``||v||^2`` is summed by torch, which may differ from the reference's BLAS dot in the last
bit: numerator slots then differ only at genuine ties (``|u - ||v||^2 / mu|`` at rounding
level) and the weights ``log(mu / (s_num ||v||^2))`` agree to about ``1e-15``. For float32
(or float16/bfloat16) input the geometry runs in float32 while every sampling decision stays
in float64 (a uniform rounded to float32 may become 1); results agree with the reference
statistically.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from balancekv.reference import subgen as rs

__all__ = ["greedy_k_center", "online_clusters", "subgen_offline", "subgen_stream"]

#: tokens per block of the clustering scan
BLOCK = 256
#: elements of the largest temporary (``(H, block, centres, d)`` differences, ``(H, tokens, slots)`` flags)
MAX_ELEMS = 1 << 22


# ---------------------------------------------------------------------- helpers
def _as_tensor(x, name):
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
        arr = np.asarray(x)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        return torch.as_tensor(arr)
    raise TypeError(f"{name} must be a torch tensor or NumPy array, got {type(x).__name__}")


def _float(x: torch.Tensor, name: str) -> torch.Tensor:
    """Float64 stays float64; any other float (or integer) input computes in float32."""
    if x.dtype == torch.float64:
        return x
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be real, got {x.dtype}")
    return x.to(torch.float32)


def _check_finite(x: torch.Tensor, name: str) -> None:
    # a finite sum proves every entry finite (NaN and inf propagate); only an overflowing sum needs the full check
    if x.numel() and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite (no NaN or inf)")


def _pairwise_sum(a: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis in NumPy's pairwise order (``pairwise_sum`` in ``loops_utils.h``).

    Fewer than 8 terms: left to right. Up to 128: eight running sums over strides of 8,
    combined as ``((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))``, then the remainder left to right.
    More: split at ``n/2`` rounded down to a multiple of 8 and recurse. Reproducing the
    order makes float64 distances bit-identical to ``np.linalg.norm(x, axis=-1)``.
    """
    n = a.shape[-1]
    if n < 8:
        res = torch.zeros(a.shape[:-1], dtype=a.dtype, device=a.device)
        for i in range(n):
            res = res + a[..., i]
        return res
    if n <= 128:
        n8 = n - n % 8
        r = a[..., :8]
        for i in range(8, n8, 8):
            r = r + a[..., i : i + 8]
        res = ((r[..., 0] + r[..., 1]) + (r[..., 2] + r[..., 3])) + ((r[..., 4] + r[..., 5]) + (r[..., 6] + r[..., 7]))
        for i in range(n8, n):
            res = res + a[..., i]
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_sum(a[..., :n2]) + _pairwise_sum(a[..., n2:])


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.to(torch.float64)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root (as NumPy's), in torch.

    torch's vectorised float64 ``sqrt`` on CPU can be off by one ulp; we correct it with the exact
    residual ``r = x - y^2`` (Dekker's product): the correctly rounded ``y`` satisfies
    ``-(y u_- - u_-^2/4) <= r <= y u_+ + u_+^2/4`` (``u_±`` the gaps to the neighbours).
    CUDA's double sqrt is correctly rounded already.
    """
    y = torch.sqrt(x)
    if x.device.type != "cpu" or x.dtype != torch.float64:
        return y
    c = 134217729.0 * y  # Veltkamp split: y = hi + lo exactly
    hi = c - (c - y)
    lo = y - hi
    p = y * y
    e = ((hi * hi - p) + 2.0 * hi * lo) + lo * lo  # y^2 = p + e exactly
    r = (x - p) - e
    inf = torch.full_like(y, float("inf"))
    up_n = torch.nextafter(y, inf)
    dn_n = torch.nextafter(y, -inf)
    up, dn = up_n - y, y - dn_n
    y = torch.where(r > y * up + 0.25 * up * up, up_n, y)
    y = torch.where(r < -(y * dn) + 0.25 * dn * dn, dn_n, y)
    return torch.where(torch.isfinite(x) & (x > 0), y, torch.sqrt(x))


def _dist(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``||A - B||`` over the last axis (broadcast), exactly as ``np.linalg.norm(A - B, axis=-1)``."""
    D = A - B.contiguous()  # a broadcast operand with a stride-0 axis takes a slow path on CPU
    return _sqrt(_pairwise_sum(D * D))


def _single_thread(device: torch.device):
    """Small per-step operations: on CPU, intra-op thread fork/join costs more than the arithmetic."""

    class _Ctx:
        def __enter__(self):
            self.n = torch.get_num_threads()
            if device.type == "cpu":
                torch.set_num_threads(1)

        def __exit__(self, *exc):
            torch.set_num_threads(self.n)

    return _Ctx()


def _points(X, name="X"):
    """``(tensor (H, n, d), batched, was_numpy)`` for ``X (n, d)`` or ``(H, n, d)``."""
    was_numpy = not isinstance(X, torch.Tensor)
    Xt = _float(_as_tensor(X, name), name)
    if Xt.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (n, d) or (H, n, d), got {tuple(Xt.shape)}")
    batched = Xt.ndim == 3
    if not batched:
        Xt = Xt[None]
    if Xt.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row")
    _check_finite(Xt, name)
    return Xt, batched, was_numpy


def _out(tensors, batched, was_numpy):
    if not batched:
        tensors = [t[0] for t in tensors]
    if was_numpy:
        return tuple(t.cpu().numpy() for t in tensors)
    return tuple(tensors)


# ---------------------------------------------------------------------- clustering cores
def _greedy_core(X: torch.Tensor, m: int):
    """:func:`_greedy_heads` on all heads at once (CUDA) or head by head (CPU: one head's keys stay in cache)."""
    if X.device.type != "cpu" or X.shape[0] == 1:
        return _greedy_heads(X, m)
    parts = [_greedy_heads(X[h : h + 1], m) for h in range(X.shape[0])]
    return tuple(torch.cat(p, dim=0) for p in zip(*parts))


def _greedy_heads(X: torch.Tensor, m: int):
    """Greedy farthest-point k-centre on every head of ``X (H, n, d)``.

    Returns ``(centres (H, min(m, n)) with -1 padding, k (H,), assign (H, n), dist (H, n))``.
    Each new centre moves only the tokens it is closer to; those are found with squared
    distances from one batched matrix-vector product (error below ``e``, see
    :func:`_nearest_centre`), and only tokens within ``32 e`` of moving get the exact
    (reference-identical) distance and the strict comparison.
    """
    H, n, d = X.shape
    kmax = min(m, n)
    dev = X.device
    cent = torch.full((H, kmax), -1, dtype=torch.int64, device=dev)
    cent[:, 0] = 0
    k = torch.ones(H, dtype=torch.int64, device=dev)
    dist = _dist(X, X[:, :1])
    assign = torch.zeros((H, n), dtype=torch.int64, device=dev)
    active = torch.ones(H, dtype=torch.bool, device=dev)
    X64 = _f64(X)  # the filter runs in float64 (no TF32); the margin covers the exact path's dtype
    xx = _pairwise_sum(X64 * X64)  # (faster on CPU than torch's sum over a short last axis)
    u = torch.finfo(X.dtype).eps / 2
    for it in range(1, kmax):
        far = torch.argmax(dist, dim=1)  # first maximum: lowest index on ties
        active &= dist.gather(1, far[:, None])[:, 0] > 0.0
        if not bool(active.any()):
            break
        hs = active.nonzero()[:, 0]
        f = far[hs]
        Xa = X if hs.numel() == H else X[hs]  # (a gather would copy every key)
        c = Xa[torch.arange(hs.numel(), device=dev), f]  # (k, d)
        cc = xx[hs, f][:, None]
        Xa64 = X64 if hs.numel() == H else X64[hs]
        A2 = xx[hs] + cc - 2.0 * torch.bmm(Xa64, _f64(c)[:, :, None])[..., 0]
        cur = dist[hs].to(torch.float64)
        cur2 = cur * cur
        maybe = (A2 < cur2 + 32.0 * (d + 8) * u * (xx[hs] + cc + cur2)) | ~torch.isfinite(A2)
        hi, ji = maybe.nonzero(as_tuple=True)
        dn = _dist(Xa[hi, ji], c[hi])  # token minus centre, as the reference
        closer = dn < dist[hs][hi, ji]  # strict: the lower centre keeps a tie
        hc, jc = hs[hi[closer]], ji[closer]
        dist[hc, jc] = dn[closer]
        assign[hc, jc] = it
        cent[hs, it] = f
        k[hs] += 1
    return cent, k, assign, dist


def _nearest_centre(Xc: torch.Tensor, C: torch.Tensor, k: torch.Tensor):
    """Nearest existing centre of every token of ``Xc (H, w, d)`` among ``C[h, :k[h]]``: ``(dist, index)``.

    Distances come out exactly as the reference's ``np.linalg.norm(C - x, axis=-1)`` with its
    ``argmin`` (lowest centre on ties), but only few are computed that way: the squared distances
    ``||x||^2 + ||c||^2 - 2 <x, c>`` (one batched matmul, in float64 whatever the dtype, so no
    TF32) are within ``e = (d + 8) u (||x||^2 + ||c||^2)`` of the true ones (``u`` the unit roundoff
    of the computing dtype, which also bounds the exact path's own rounding; dot products in any
    order), so every centre whose exact distance can be the minimum, or tie with it after
    rounding, lies within ``2e`` of the smallest approximate value; we keep those within ``32 e``
    as candidates. A token
    with one candidate needs one exact distance; a token with several (near ties) gets all of them.
    Heads with ``k = 0`` get ``inf``.
    """
    H, w, d = Xc.shape
    dev, dt = Xc.device, Xc.dtype
    M = int(k.max())
    if M == 0:
        return torch.full((H, w), float("inf"), dtype=dt, device=dev), torch.zeros(
            (H, w), dtype=torch.int64, device=dev
        )
    Cm = C[:, :M]
    ok = torch.arange(M, device=dev)[None, :] < k[:, None]  # (H, M)
    X64, C64 = _f64(Xc), _f64(Cm)  # the filter runs in float64 (no TF32); the margin covers dtype dt
    xx = _pairwise_sum(X64 * X64)
    cc = torch.where(ok, _pairwise_sum(C64 * C64), 0.0)
    A2 = xx[:, :, None] + cc[:, None, :] - 2.0 * torch.bmm(X64, C64.transpose(1, 2))
    A2 = torch.where(ok[:, None, :], A2, float("inf"))
    amin = A2.min(dim=-1).values
    u = torch.finfo(dt).eps / 2
    marg = 32.0 * (d + 8) * u * (xx + cc.max(dim=1).values[:, None])
    cand = A2 <= (amin + marg)[:, :, None]
    idx = torch.argmax(cand.to(torch.uint8), dim=-1)  # first candidate
    hr = torch.arange(H, device=dev)[:, None]
    best = _dist(Cm[hr, idx], Xc)  # centre minus token, as the reference
    multi = (cand.sum(dim=-1) > 1) | ~torch.isfinite(amin)  # near ties (or overflowing squares)
    if bool(multi.any()):  # every centre, exactly
        hm, jm = multi.nonzero(as_tuple=True)
        Dm = _dist(Cm[hm], Xc[hm, jm][:, None, :])  # (P, M)
        Dm = torch.where(ok[hm], Dm, float("inf"))
        vm, im = Dm.min(dim=-1)  # first minimum: lowest centre on ties
        best[hm, jm] = vm
        idx[hm, jm] = im
    return best, idx


def _online_core(X: torch.Tensor, thr: torch.Tensor, block: int | None = None):
    """Online threshold clustering of every head of ``X (H, n, d)``, threshold ``thr (H,)``.

    Returns ``(centres (H, cap) token index per centre, -1 padding, k (H,), assign (H, n), dist (H, n))``.
    """
    H, n, d = X.shape
    dev, dt = X.device, X.dtype
    block = BLOCK if block is None else block
    cap = 16
    C = X.new_zeros((H, cap, d))
    cidx = torch.full((H, cap), -1, dtype=torch.int64, device=dev)
    k = torch.zeros(H, dtype=torch.int64, device=dev)
    assign = torch.zeros((H, n), dtype=torch.int64, device=dev)
    dist = X.new_zeros((H, n))
    inf = torch.tensor(float("inf"), dtype=dt, device=dev)
    thr = thr.to(dt)[:, None]
    a = 0
    while a < n:
        # block of tokens: its (H, w, centres) distance table stays below MAX_ELEMS
        w = max(16, min(block, MAX_ELEMS // max(1, H * int(k.max()))))
        b = min(n, a + w)
        w = b - a
        Xc = X[:, a:b]
        best, arg = _nearest_centre(Xc, C, k)
        loc = torch.arange(w, device=dev)
        last = torch.full((H,), -1, dtype=torch.int64, device=dev)
        while True:  # new centres inside the block, in token order
            cand = ((best > thr) | (k == 0)[:, None]) & (loc[None, :] > last[:, None])
            has = cand.any(dim=1)
            if not bool(has.any()):
                break
            hs = has.nonzero()[:, 0]
            e = torch.argmax(cand[hs].to(torch.uint8), dim=1)  # first candidate
            if int(k.max()) >= cap:
                cap *= 2
                C = torch.cat([C, X.new_zeros((H, cap - C.shape[1], d))], dim=1)
                cidx = torch.cat([cidx, torch.full((H, cap - cidx.shape[1]), -1, dtype=torch.int64, device=dev)], 1)
            x = Xc[hs, e]
            kh = k[hs]
            C[hs, kh] = x
            cidx[hs, kh] = a + e
            lo = int(e.min())
            dn = _dist(x[:, None, :], Xc[hs, lo:])  # (heads, w - lo); the centre itself gets 0
            dn = torch.where(loc[None, lo:] >= e[:, None], dn, inf)
            cur = best[hs, lo:]
            closer = dn < cur  # strict: the older centre keeps a tie
            best[hs, lo:] = torch.where(closer, dn, cur)
            arg[hs, lo:] = torch.where(closer, kh[:, None], arg[hs, lo:])
            k[hs] += 1
            last[hs] = e
        assign[:, a:b] = arg
        dist[:, a:b] = best
        a = b
    return cidx, k, assign, dist


# ---------------------------------------------------------------------- public clustering
def greedy_k_center(X, m: int):
    """Greedy farthest-point k-centre; see :func:`balancekv.reference.subgen.greedy_k_center`.

    ``X (n, d)``: returns ``(centres (k,), assign (n,), dist (n,))`` exactly as the reference.
    ``X (H, n, d)``: every head at once; ``centres (H, min(m, n))`` padded with ``-1``.
    NumPy in, NumPy out; torch in, torch out (on the input's device).
    """
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"m must be an integer >= 1, got {m!r}")
    Xt, batched, was_numpy = _points(X)
    with _single_thread(Xt.device):
        cent, k, assign, dist = _greedy_core(Xt, int(m))
    cent = cent[:, : int(k.max())]
    return _out([cent, assign, dist], batched, was_numpy)


def online_clusters(X, threshold):
    """The streaming clustering alone; see :func:`balancekv.reference.subgen.online_clusters`.

    ``X (n, d)``: ``(centres (k,), assign (n,), dist (n,))`` exactly as the reference.
    ``X (H, n, d)`` with ``threshold`` a float or ``(H,)``: every head at once, ``centres``
    padded with ``-1`` to the largest count.
    """
    Xt, batched, was_numpy = _points(X)
    thr = _thresholds(threshold, Xt.shape[0], Xt.device)
    with _single_thread(Xt.device):
        cidx, k, assign, dist = _online_core(Xt, thr)
    cent = cidx[:, : int(k.max())]
    return _out([cent, assign, dist], batched, was_numpy)


def _thresholds(threshold, H, device):
    thr = (
        np.broadcast_to(np.asarray(threshold, dtype=np.float64), (H,))
        if not isinstance(threshold, torch.Tensor)
        else np.broadcast_to(
            np.asarray(threshold.detach().double().reshape(-1).tolist()).reshape(threshold.shape), (H,)
        )
    )
    if not bool(np.all(thr >= 0)):  # also rejects NaN
        raise ValueError(f"threshold must be >= 0, got {thr.tolist()}")
    return torch.as_tensor(thr.copy(), device=device)


# ---------------------------------------------------------------------- samplers
def _ranks(assign: torch.Tensor, M: int):
    """``(rank (H, n) 1-based position of each token in its cluster, counts (H, M), order, starts)``."""
    H, n = assign.shape
    dev = assign.device
    order = torch.argsort(assign, dim=1, stable=True)  # members of each cluster in token order
    counts = torch.zeros((H, M), dtype=torch.int64, device=dev).scatter_add_(1, assign, torch.ones_like(assign))
    starts = torch.cumsum(counts, dim=1) - counts
    rs_sorted = torch.arange(n, device=dev)[None, :] - starts.gather(1, assign.gather(1, order)) + 1
    rank = torch.empty_like(assign).scatter_(1, order, rs_sorted)
    return rank, counts, order, starts


def _last_taker(U: torch.Tensor, p: torch.Tensor, group: torch.Tensor, groups: int, slots_ok: torch.Tensor):
    """Last token ``j`` with ``U[j, h, i] < p[h, j]`` per ``(head, group[h, j], slot i)``; -1 if none.

    ``U (n, H, S)`` float64, ``p (H, n)`` float64 (NaN never takes), ``group (H, n)``,
    ``slots_ok (H, S)`` masks the slots a head does not have. Returns ``(H, groups, S)``.
    Takes are rare (about ``log n`` per slot, probabilities ``1 / rank`` and ``||v||^2 / mu``),
    so one comparison pass over ``U`` is followed by a scatter-max over the takes only.
    """
    n, H, S = U.shape
    dev = p.device
    out = torch.full((H * groups * S,), -1, dtype=torch.int64, device=dev)
    step = max(1, MAX_ELEMS // max(1, H * S))
    for a in range(0, n, step):
        b = min(n, a + step)
        take = U[a:b] < p[:, a:b].T[:, :, None]
        if not bool(slots_ok.all()):
            take &= slots_ok[None]
        j, h, i = take.nonzero(as_tuple=True)
        j = j + a
        out.scatter_reduce_(0, (h * groups + group[h, j]) * S + i, j, reduce="amax", include_self=True)
    return out.reshape(H, groups, S)


def _sq_norms(Vt: torch.Tensor, unit=1.0) -> torch.Tensor:
    """``||v / unit||^2`` per token in float64 (``unit`` a power of two per head: exact, no overflow)."""
    V64 = Vt.to(torch.float64)
    u = torch.as_tensor(unit, dtype=torch.float64, device=Vt.device).reshape(-1)
    if bool((u != 1.0).any()):
        V64 = V64 / u.expand(V64.shape[0])[:, None, None]
    return _pairwise_sum(V64 * V64)


def _kv(K, V):
    Kt = _float(_as_tensor(K, "K"), "K")
    Vt = _float(_as_tensor(V, "V"), "V")
    if Kt.ndim != 3 or Vt.ndim != 3 or Kt.shape[:2] != Vt.shape[:2]:
        raise ValueError(
            f"K and V must have shapes (H, n, d) and (H, n, s), got {tuple(Kt.shape)} and {tuple(Vt.shape)}"
        )
    Vt = Vt.to(device=Kt.device)
    _check_finite(Kt, "K")
    _check_finite(Vt, "V")
    return Kt, Vt


def _folded64(Xf: torch.Tensor, K, scale: float) -> np.ndarray:
    """``scale * K`` in float64 NumPy, as the reference folds it (reusing ``Xf`` when it is that already)."""
    if Xf.dtype == torch.float64 and Xf.device.type == "cpu":
        return Xf.numpy()
    return float(scale) * _np64(K)


def _np64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _assemble(
    K64, V64, Xf64, ts, s_num, thr, scale, cent, k, counts, radius, slot_pos, order, starts, mu, num_pos, sq, n_seen,
    estimator="l2", unit=1.0,
):  # fmt: skip
    """The reference's :class:`SubGenState` from the per-head arrays (all NumPy)."""
    H, n, d = K64.shape
    s = V64.shape[-1]
    heads = []
    for h in range(H):
        t = ts[h]
        head = rs.SubGenHead(d, s, t, s_num, float(thr[h]), scale, estimator, np.broadcast_to(unit, (H,))[h])
        Kh, Vh = K64[h], V64[h]
        for c in range(int(k[h])):
            nc = int(counts[h, c])
            mem = order[h, starts[h, c] : starts[h, c] + nc]
            pick = slot_pos[h, c, :t].astype(np.int64)
            members = [(int(i), Kh[i].copy(), Vh[i].copy()) for i in mem] if nc <= t else None
            head.clusters.append(
                rs._Cluster(
                    Xf64[h, cent[h, c]].copy(), nc, float(radius[h, c]), pick, Kh[pick].copy(), Vh[pick].copy(), members
                )
            )
        head._C = Xf64[h, cent[h, : int(k[h])]].reshape(-1, d).copy()
        head.mu = float(mu[h])
        if head.mu > 0.0 and s_num:
            p = num_pos[h].astype(np.int64)
            head.num_pos[:] = p
            head.num_k[:], head.num_v[:], head.num_sq[:] = Kh[p], Vh[p], sq[h, p]
        head.n_seen = int(n_seen)
        heads.append(head)
    return rs.SubGenState(heads)


# ---------------------------------------------------------------------- SubGen
def _state_out(K, V, Kt, Vt, Xf, ts, s_num, thr, scale, cent, k, counts, radius, slot_pos, order, starts, mu,
               num_pos, sq, n, estimator, unit):  # fmt: skip
    """The finished state in the input's kind: a device-native state for torch input, the reference's
    state (NumPy float64) for NumPy input."""
    if isinstance(K, torch.Tensor):  # torch in: the state stays on the device
        return _torch_state(Kt, Vt, ts, s_num, thr, scale, cent, k, counts, radius, slot_pos, order, starts, mu,
                            num_pos, sq, n, estimator, unit)  # fmt: skip
    host = lambda t: t.cpu().numpy()
    return _assemble(
        _np64(K), _np64(V), _folded64(Xf, K, scale), ts, s_num, host(thr), scale, host(cent), host(k), host(counts),
        host(radius), host(slot_pos), host(order), host(starts), host(mu), host(num_pos), host(sq), n, estimator, unit,
    )  # fmt: skip


def subgen_stream(
    K,
    V,
    *,
    t,
    s_num: int,
    threshold,
    scale: float,
    rng: np.random.Generator | None = None,
    uniforms=None,
    estimator: str = "l2",
    unit=1.0,
):
    """Streaming SubGen; see :func:`balancekv.reference.subgen.subgen_stream` (same arguments, same state).

    ``K (H, n, d)``, ``V (H, n, s)`` (NumPy or torch, any device), uniforms ``(n, H, max(t) + s_num)``
    or drawn from ``rng`` in that layout. Returns the reference's ``SubGenState``.
    """
    Kt, Vt = _kv(K, V)
    H, n, d = Kt.shape
    ts = rs._per_head(t, H, "t")
    if isinstance(s_num, bool) or not isinstance(s_num, (int, np.integer)) or s_num < (estimator == "l2"):
        raise ValueError(f"s_num must be an integer >= 1, got {s_num!r}")
    t_max = max(ts)
    if uniforms is None:
        if rng is None:
            raise ValueError("give rng or uniforms")
        uniforms = rng.random((n, H, t_max + s_num))  # = SubGenState.draw_uniforms
    U = _as_tensor(uniforms, "uniforms").to(device=Kt.device, dtype=torch.float64)
    if tuple(U.shape) != (n, H, t_max + s_num):
        raise ValueError(f"uniforms must have shape {(n, H, t_max + s_num)}, got {tuple(U.shape)}")
    dev = Kt.device
    thr = _thresholds(threshold, H, dev)
    Xf = float(scale) * Kt
    _check_finite(Xf, "scale * K")
    with _single_thread(dev):
        if n:
            cent, k, assign, dist = _online_core(Xf, thr)
        else:
            cent = torch.zeros((H, 0), dtype=torch.int64, device=dev)
            k = torch.zeros(H, dtype=torch.int64, device=dev)
            assign = torch.zeros((H, 0), dtype=torch.int64, device=dev)
            dist = Xf.new_zeros((H, 0))
        M = max(1, int(k.max()))
        rank, counts, order, starts = _ranks(assign, M)
        radius = torch.zeros((H, M), dtype=torch.float64, device=dev).scatter_reduce_(
            1, assign, dist.to(torch.float64), reduce="amax", include_self=True
        )
        tt = torch.as_tensor(ts, device=dev)
        res_ok = torch.arange(t_max, device=dev)[None, :] < tt[:, None]
        slot_pos = _last_taker(U[:, :, :t_max], 1.0 / rank.to(torch.float64), assign, M, res_ok)
        sq = _sq_norms(Vt, unit)
        mu_run = torch.cumsum(sq, dim=1)  # sequential: the reference's running mu
        p_num = torch.where(sq > 0.0, sq / torch.where(mu_run > 0.0, mu_run, 1.0), float("nan"))
        num_ok = torch.ones((H, s_num), dtype=torch.bool, device=dev)
        num_pos = _last_taker(U[:, :, t_max:], p_num, torch.zeros_like(assign), 1, num_ok)[:, 0]
        mu = mu_run[:, -1] if n else torch.zeros(H, dtype=torch.float64, device=dev)
    return _state_out(K, V, Kt, Vt, Xf, ts, s_num, thr, scale, cent, k, counts, radius, slot_pos, order, starts,
                      mu, num_pos, sq, n, estimator, unit)  # fmt: skip


def subgen_offline(
    K,
    V,
    *,
    t,
    s_num: int,
    m: int,
    scale: float,
    rng: np.random.Generator | None = None,
    uniforms=None,
    estimator: str = "l2",
    unit=1.0,
):
    """Offline SubGen; see :func:`balancekv.reference.subgen.subgen_offline` (same arguments, same state).

    Greedy k-centre for every head at once; reservoir picks ``floor(U_res[h, c, j] * n_c)`` among the
    members in token order; numerator by inverse CDF of ``U_num`` (a batched ``searchsorted``).
    """
    Kt, Vt = _kv(K, V)
    H, n, d = Kt.shape
    ts = rs._per_head(t, H, "t")
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    if isinstance(s_num, bool) or not isinstance(s_num, (int, np.integer)) or s_num < (estimator == "l2"):
        raise ValueError(f"s_num must be an integer >= 1, got {s_num!r}")
    if n < 1:
        raise ValueError("K must have at least one token")
    t_max = max(ts)
    if uniforms is None:
        if rng is None:
            raise ValueError("give rng or uniforms")
        uniforms = (rng.random((H, m, t_max)), rng.random((H, s_num)))
    dev = Kt.device
    U_res, U_num = (_as_tensor(u, "uniforms").to(device=dev, dtype=torch.float64) for u in uniforms)
    if tuple(U_res.shape) != (H, m, t_max) or tuple(U_num.shape) != (H, s_num):
        raise ValueError(
            f"uniforms must have shapes {(H, m, t_max)} and {(H, s_num)}, "
            f"got {tuple(U_res.shape)} and {tuple(U_num.shape)}"
        )
    Xf = float(scale) * Kt
    _check_finite(Xf, "scale * K")
    with _single_thread(dev):
        cent, k, assign, dist = _greedy_core(Xf.contiguous(), int(m))
        kmax = cent.shape[1]
        _, counts, order, starts = _ranks(assign, kmax)
        radius = torch.zeros((H, kmax), dtype=torch.float64, device=dev).scatter_reduce_(
            1, assign, dist.to(torch.float64), reduce="amax", include_self=True
        )
        nc = counts.to(torch.float64)[:, :, None]
        idx = (U_res[:, :kmax] * nc).to(torch.int64)  # floor (u * n_c >= 0), as numpy's astype
        idx = torch.minimum(idx, (counts - 1).clamp(min=0)[:, :, None])
        slot_pos = order.gather(1, (starts[:, :, None] + idx).clamp(max=n - 1).reshape(H, -1)).reshape(H, kmax, t_max)
        sq = _sq_norms(Vt, unit)
        cum = torch.cumsum(sq, dim=1)
        mu = cum[:, -1]
        num_pos = torch.searchsorted(cum, U_num * mu[:, None], right=True)
        ar = torch.arange(n, device=dev)
        last = torch.where(sq > 0.0, ar[None, :], -1).max(dim=1).values  # last nonzero value
        num_pos = torch.minimum(num_pos, last[:, None])
        thr = dist.to(torch.float64).max(dim=1).values
    return _state_out(K, V, Kt, Vt, Xf, ts, s_num, thr, scale, cent, k, counts, radius, slot_pos, order, starts,
                      mu, num_pos, sq, n, estimator, unit)  # fmt: skip


# ---------------------------------------------------------------------- device-native state
class TorchSubGenState:
    """SubGen's state over ``H`` heads as tensors on one device (the torch path's ``SubGenState``).

    Same state as :class:`balancekv.reference.subgen.SubGenState`, batched over heads:

    - ``C (H, cap, d)`` folded centres, ``k (H,)`` clusters per head, ``counts``/``radius (H, cap)``;
    - ``tok_pos (H, cap, t_max)``, ``tok_k``, ``tok_v``: while a cluster has ``n_c <= t`` members,
      its members in token order; once it outgrows ``t``, its ``t`` reservoir slots. While the
      members are kept, slot ``i`` is a member index ``slot_idx[h, c, i]`` (the reservoir runs
      alongside, as in the reference), materialised when the cluster outgrows ``t``;
    - numerator slots ``num_pos``/``num_k``/``num_v``/``num_sq (H, s_num)`` and ``mu (H,)`` (float64),
      squared norms of ``v / unit`` (``unit`` a power of two per head, exact).

    ``append(K, V, positions, rng)`` streams tokens (same uniform layout as the reference); ``padded()``
    reads the sketch as one padded segment (tokens held by several slots stored once, weights summed).
    """

    def __init__(self, *, H, d, s, ts, s_num, thr, scale, estimator, unit, dtype, device, cap=16):
        self.H, self.d, self.s, self.s_num = int(H), int(d), int(s), int(s_num)
        self.ts = [int(t) for t in ts]
        self.t_max = max(self.ts)
        self.scale, self.estimator = float(scale), estimator
        self.dtype, self.device = dtype, device
        self.thr = thr.to(device=device, dtype=torch.float64)
        self.tt = torch.as_tensor(self.ts, device=device)
        self.inv_unit = (1.0 / torch.as_tensor(unit, dtype=torch.float64, device=device)).expand(H).clone()
        i64 = dict(dtype=torch.int64, device=device)
        f = dict(dtype=dtype, device=device)
        self.C = torch.zeros((H, cap, d), **f)
        self.k = torch.zeros(H, **i64)
        self.counts = torch.zeros((H, cap), **i64)
        self.radius = torch.zeros((H, cap), dtype=torch.float64, device=device)
        self.tok_pos = torch.full((H, cap, self.t_max), -1, **i64)
        self.tok_k = torch.zeros((H, cap, self.t_max, d), **f)
        self.tok_v = torch.zeros((H, cap, self.t_max, s), **f)
        self.slot_idx = torch.zeros((H, cap, self.t_max), **i64)
        self.mu = torch.zeros(H, dtype=torch.float64, device=device)
        self.num_pos = torch.full((H, s_num), -1, **i64)
        self.num_k = torch.zeros((H, s_num, d), **f)
        self.num_v = torch.zeros((H, s_num, s), **f)
        self.num_sq = torch.zeros((H, s_num), dtype=torch.float64, device=device)
        self.n_seen = 0

    @property
    def cap(self) -> int:
        return int(self.C.shape[1])

    def hold_tokens_as(self, key_dtype: torch.dtype, value_dtype: torch.dtype) -> None:
        """Hold the sampled keys and values (``tok_k``/``num_k``, ``tok_v``/``num_v``) in storage dtypes (a model's
        fp16/bf16); the centres, weights and every computation stay in the compute dtype ``self.dtype``."""
        self.tok_k, self.num_k = self.tok_k.to(key_dtype), self.num_k.to(key_dtype)
        self.tok_v, self.num_v = self.tok_v.to(value_dtype), self.num_v.to(value_dtype)

    def remap_positions(self, where: torch.Tensor) -> None:
        """Per head, stored position ``i`` becomes ``where[h, i]`` (``where (H, n_seen)`` ints; see
        :meth:`balancekv.reference.subgen.SubGenHead.remap_positions`)."""
        where = where.to(device=self.device, dtype=torch.int64)

        def f(p):
            g = torch.gather(where, 1, p.clamp(min=0).reshape(self.H, -1)).reshape(p.shape)
            return torch.where(p >= 0, g, p)

        self.tok_pos, self.num_pos = f(self.tok_pos), f(self.num_pos)

    def _grow(self, need: int) -> None:
        # small steps: the state's memory is billed, and new clusters are rare once the stream is clustered
        cap = max(need, self.cap + max(1, self.cap // 8))
        for name in ("C", "counts", "radius", "tok_pos", "tok_k", "tok_v", "slot_idx"):
            x = getattr(self, name)
            fill = -1 if name == "tok_pos" else 0
            y = torch.full((x.shape[0], cap) + tuple(x.shape[2:]), fill, dtype=x.dtype, device=x.device)
            y[:, : x.shape[1]] = x
            setattr(self, name, y)

    # ------------------------------------------------------------------ update
    def draw_uniforms(self, rng: np.random.Generator, T: int) -> torch.Tensor:
        u = rng.random((T, self.H, self.t_max + self.s_num))  # = SubGenState.draw_uniforms
        return torch.from_numpy(u).to(self.device)

    def append(self, K, V, positions, rng=None, uniforms=None):
        """Stream tokens ``K (H, T, d)``, ``V (H, T, s)`` at ``positions (T,)`` (the reference's order)."""
        T = int(K.shape[1])
        U = self.draw_uniforms(rng, T) if uniforms is None else uniforms.to(self.device, torch.float64)
        pos = positions.tolist() if isinstance(positions, torch.Tensor) else list(np.asarray(positions).reshape(-1))
        with _single_thread(self.device):
            for j in range(T):
                self._update(K[:, j].to(self.dtype), V[:, j].to(self.dtype), int(pos[j]), U[j])
        return self

    def _update(self, k, v, pos, u):
        H, dev = self.H, self.device
        ks, vs = k.to(self.tok_k.dtype), v.to(self.tok_v.dtype)  # what the slots hold (hold_tokens_as)
        hr = torch.arange(H, device=dev)
        x = self.scale * k
        M = int(self.k.max())
        if M:
            dc = _dist(self.C[:, :M], x[:, None, :])  # centre minus token, as the reference
            ok = torch.arange(M, device=dev)[None, :] < self.k[:, None]
            dc = torch.where(ok, dc, torch.full_like(dc, float("inf")))
            dmin, c = dc.min(dim=1)  # first minimum: lowest centre on ties
            new = ~(dmin.to(torch.float64) <= self.thr)
        else:
            c = torch.zeros(H, dtype=torch.int64, device=dev)
            dmin = torch.zeros(H, dtype=self.dtype, device=dev)
            new = torch.ones(H, dtype=torch.bool, device=dev)
        if int((self.k + new).max()) > self.cap:  # a new cluster needs room
            self._grow(self.cap + 1)
        c = torch.where(new, self.k, c)
        dist = torch.where(new, torch.zeros_like(dmin), dmin).to(torch.float64)
        nh = new.nonzero()[:, 0]
        if nh.numel():
            self.C[nh, self.k[nh]] = x[nh]
        self.k += new.to(torch.int64)
        self.counts[hr, c] += 1
        cnt = self.counts[hr, c]
        self.radius[hr, c] = torch.maximum(self.radius[hr, c], dist)
        th = self.tt
        trans = (cnt == th + 1).nonzero()[:, 0]  # clusters outgrowing t: the slots become tokens
        if trans.numel():
            ct = c[trans]
            idx = self.slot_idx[trans, ct]  # (n, t_max) member index per slot
            for name in ("tok_pos", "tok_k", "tok_v"):
                X = getattr(self, name)
                src = X[trans, ct]
                g = idx if src.ndim == 2 else idx[..., None].expand(-1, -1, src.shape[-1])
                X[trans, ct] = torch.gather(src, 1, g)
        mem = (cnt <= th).nonzero()[:, 0]  # member kept: written at index n_c - 1
        if mem.numel():
            cm, jm = c[mem], cnt[mem] - 1
            self.tok_pos[mem, cm, jm] = pos
            self.tok_k[mem, cm, jm] = ks[mem]
            self.tok_v[mem, cm, jm] = vs[mem]
        slots_ok = torch.arange(self.t_max, device=dev)[None, :] < th[:, None]
        take = (u[:, : self.t_max] < 1.0 / cnt.to(torch.float64)[:, None]) & slots_ok  # (H, t_max)
        in_mem = (cnt <= th)[:, None]
        ht, it = (take & in_mem).nonzero(as_tuple=True)
        if ht.numel():
            self.slot_idx[ht, c[ht], it] = cnt[ht] - 1
        ht, it = (take & ~in_mem).nonzero(as_tuple=True)
        if ht.numel():
            self.tok_pos[ht, c[ht], it] = pos
            self.tok_k[ht, c[ht], it] = ks[ht]
            self.tok_v[ht, c[ht], it] = vs[ht]
        vu = v.to(torch.float64) * self.inv_unit[:, None]
        sq = _pairwise_sum(vu * vu)
        self.mu += sq
        if self.s_num:
            take = (sq > 0.0)[:, None] & (u[:, self.t_max :] < (sq / torch.where(self.mu > 0, self.mu, 1.0))[:, None])
            hn, jn = take.nonzero(as_tuple=True)
            if hn.numel():
                self.num_pos[hn, jn] = pos
                self.num_k[hn, jn] = ks[hn]
                self.num_v[hn, jn] = vs[hn]
                self.num_sq[hn, jn] = sq[hn]
        self.n_seen += 1

    # ------------------------------------------------------------------ read
    @property
    def m(self) -> list[int]:
        return self.k.tolist()

    def cluster_radius(self) -> list[float]:
        return self.radius.amax(dim=1).tolist()

    def _head_entries(self, h: int):
        """Candidate slots of head ``h``: ``(pos, K, V, num_logw, den_logw)`` before merging duplicates."""
        t = self.ts[h]
        M = int(self.k[h])
        cnt = self.counts[h, :M]
        small = cnt <= t
        j = torch.arange(t, device=self.device)
        member = small[:, None] & (j[None, :] < cnt[:, None])  # members of small clusters
        slot = ~small[:, None] & torch.ones_like(member)  # slots of large clusters
        sel = member | slot
        lw = torch.where(
            small, torch.zeros_like(cnt, dtype=torch.float64), torch.log(cnt.to(torch.float64)) - math.log(t)
        )
        dl = lw[:, None].expand(M, t)[sel]
        pos = self.tok_pos[h, :M, :t][sel]
        K = self.tok_k[h, :M, :t][sel]
        Vv = self.tok_v[h, :M, :t][sel]
        if self.estimator == "cluster":
            return pos, K, Vv, dl, dl
        ninf = torch.full_like(dl, float("-inf"))
        mu = float(self.mu[h])
        if mu > 0.0 and self.s_num:
            ok = self.num_pos[h] >= 0
            nl = math.log(mu) - math.log(self.s_num) - torch.log(self.num_sq[h][ok])
            pos = torch.cat([self.num_pos[h][ok], pos])
            K = torch.cat([self.num_k[h][ok], K])
            Vv = torch.cat([self.num_v[h][ok], Vv])
            dl, nl = torch.cat([torch.full_like(nl, float("-inf")), dl]), torch.cat([nl, ninf])
        else:
            nl = ninf
        return pos, K, Vv, nl, dl

    def entries(self):
        """Per head ``(pos, K, V, num_logw, den_logw)``: distinct tokens by position, weights summed."""
        out = []
        for h in range(self.H):
            pos, K, Vv, nl, dl = self._head_entries(h)
            up, inv = torch.unique(pos, sorted=True, return_inverse=True)
            first = torch.full(up.shape, pos.numel(), dtype=torch.int64, device=self.device)
            first.scatter_reduce_(0, inv, torch.arange(pos.numel(), device=self.device), reduce="amin")
            out.append(
                (up, K[first], Vv[first], _logsumexp_by(nl, inv, up.numel()), _logsumexp_by(dl, inv, up.numel()))
            )
        return out

    def padded(self):
        """``pos (H, w)`` (-1 pad), ``K (H, w, d)``, ``V``, ``num_logw``, ``den_logw`` (``-inf`` pad), torch."""
        ents = self.entries()
        w = max(1, max(int(e[0].numel()) for e in ents))
        dev = self.device
        pos = torch.full((self.H, w), -1, dtype=torch.int64, device=dev)
        K = torch.zeros((self.H, w, self.d), dtype=self.dtype, device=dev)
        Vv = torch.zeros((self.H, w, self.s), dtype=self.dtype, device=dev)
        wdt = self.dtype
        nl = torch.full((self.H, w), float("-inf"), dtype=wdt, device=dev)
        dl = torch.full((self.H, w), float("-inf"), dtype=wdt, device=dev)
        for h, (p, k, v, a, b) in enumerate(ents):
            r = int(p.numel())
            pos[h, :r], K[h, :r], Vv[h, :r], nl[h, :r], dl[h, :r] = p, k, v, a.to(wdt), b.to(wdt)
        return pos, K, Vv, nl, dl

    def views(self, offset: int = 0, guard: float = 1e-12):
        """The sketch as segment arrays that *share* the state's storage (no copy of any key or value).

        Returns a list of ``(K, V, num_logw, den_logw, positions)``: the cluster part (``(H, cap * t_max)``
        slots, views of ``tok_k``/``tok_v``; members weight 1, reservoir slots ``n_c / t``; a token held
        by several slots contributes once per slot, which is the same estimate as one slot with the
        summed weight) and, for the ``l2`` estimator, the numerator slots (views of ``num_k``/``num_v``).
        Numerator tokens absent from the cluster part enter the denominator with the guard weight
        ``guard / s_num`` (relative bias ``<= guard``; bounds ``|z|``, so no overflow at any key norm).
        """
        H, cap, tm = self.H, self.cap, self.t_max
        dev = self.device
        j = torch.arange(tm, device=dev)[None, None, :]
        cnt = self.counts[:, :, None]
        tt = self.tt[:, None, None]
        small = cnt <= tt
        live = (torch.arange(cap, device=dev)[None, :] < self.k[:, None])[..., None]
        valid = live & torch.where(small, j < cnt, j < tt)
        lw = torch.where(small, 0.0, torch.log(cnt.to(torch.float64).clamp(min=1)) - torch.log(tt.to(torch.float64)))
        lw = torch.where(valid, lw, float("-inf")).to(self.dtype).reshape(H, cap * tm)
        pos = torch.where(valid, self.tok_pos + offset, -1).reshape(H, cap * tm)
        K = self.tok_k.reshape(H, cap * tm, self.d)
        Vv = self.tok_v.reshape(H, cap * tm, self.s)
        if self.estimator == "cluster":
            return [(K, Vv, lw, lw, pos)]
        out = [(K, Vv, torch.full_like(lw, float("-inf")), lw, pos)]
        ok = (self.num_pos >= 0) & (self.mu[:, None] > 0)
        if self.s_num and bool(ok.any()):
            sq = torch.where(ok, self.num_sq, 1.0)
            nl = torch.log(torch.where(self.mu > 0, self.mu, 1.0))[:, None] - math.log(self.s_num) - torch.log(sq)
            nl = torch.where(ok, nl, float("-inf")).to(self.dtype)
            npos = torch.where(ok, self.num_pos + offset, -1)
            covered = torch.stack([torch.isin(npos[h], pos[h][pos[h] >= 0]) for h in range(H)])
            gw = math.log(guard / self.s_num) if guard > 0 else float("-inf")
            dl = torch.full_like(nl, float("-inf")).masked_fill_(ok & ~covered, gw)
            out.append((self.num_k, self.num_v, nl, dl, npos))
        return out

    def estimate(self, Q, shift: float = 0.0):
        """``(N^ (H, mq, s), Z^ (H, mq))`` times ``e^{-shift}`` from the sketch (NumPy in, NumPy out)."""
        was_numpy = not isinstance(Q, torch.Tensor)
        Qt = torch.as_tensor(np.asarray(Q) if was_numpy else Q, device=self.device).to(torch.float64)
        _, K, Vv, nl, dl = self.padded()
        a = self.scale * Qt @ K.to(torch.float64).transpose(1, 2) - shift
        N = torch.exp(a + nl.to(torch.float64)[:, None, :]) @ Vv.to(torch.float64)
        Z = torch.exp(a + dl.to(torch.float64)[:, None, :]).sum(-1)
        if was_numpy:
            return np.asarray(N.cpu().tolist()), np.asarray(Z.cpu().tolist())
        return N, Z

    def stored_floats(self) -> list[int]:
        per_tok = self.d + self.s
        return [
            int(self.s_num * (per_tok + 1) + 1 + int(self.k[h]) * (self.d + 2 + self.ts[h] * per_tok))
            for h in range(self.H)
        ]


def _logsumexp_by(x: torch.Tensor, inv: torch.Tensor, n: int) -> torch.Tensor:
    """``log sum exp`` of ``x`` grouped by ``inv`` (``-inf`` for groups of only ``-inf``)."""
    x = x.to(torch.float64)
    m = torch.full((n,), float("-inf"), dtype=x.dtype, device=x.device).scatter_reduce(0, inv, x, reduce="amax")
    ms = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, inv, torch.exp(x - ms[inv]))
    return torch.where(torch.isfinite(m), ms + torch.log(s), m)


def _torch_state(Kt, Vt, ts, s_num, thr, scale, cent, k, counts, radius, slot_pos, order, starts, mu, num_pos, sq,
                 n_seen, estimator, unit):  # fmt: skip
    """A :class:`TorchSubGenState` from the batched prefill arrays (every array stays on the device)."""
    H, n, d = Kt.shape
    s = Vt.shape[-1]
    M = max(1, int(k.max()))
    st = TorchSubGenState(
        H=H, d=d, s=s, ts=ts, s_num=s_num, thr=thr, scale=scale, estimator=estimator, unit=unit,
        dtype=Kt.dtype, device=Kt.device, cap=M,
    )  # fmt: skip
    dev = Kt.device
    hr = torch.arange(H, device=dev)[:, None]
    Xf = scale * Kt
    cm = cent[:, :M].clamp(min=0)
    st.C[:, :M] = Xf[hr, cm] * (torch.arange(M, device=dev)[None, :] < k[:, None])[..., None]
    st.k[:] = k
    st.counts[:, :M] = counts[:, :M]
    st.radius[:, :M] = radius[:, :M]
    tm = st.t_max
    tt = st.tt[:, None, None]
    cnt = counts[:, :M, None]
    j = torch.arange(tm, device=dev)[None, None, :]
    # members (first min(n_c, t) of each cluster, token order) of small clusters; slots of large ones
    midx = (starts[:, :M, None] + j).clamp(max=n - 1)
    mem_tok = torch.gather(order, 1, midx.reshape(H, -1)).reshape(H, M, tm)
    small = cnt <= tt
    sp = slot_pos[:, :M].clamp(min=0)
    tok = torch.where(small, mem_tok, sp)
    valid = torch.where(small, j < cnt, j < tt)
    st.tok_pos[:, :M] = torch.where(valid, tok, -1)
    g = tok.reshape(H, -1)
    st.tok_k[:, :M] = Kt[hr, g].reshape(H, M, tm, d)
    st.tok_v[:, :M] = Vt[hr, g].reshape(H, M, tm, s)
    # while the members are kept, a slot is the rank (0-based) of its member within the cluster
    st.slot_idx[:, :M] = torch.where(small & (j < tt), _member_rank(order, starts, counts, sp, M), 0)
    st.mu[:] = mu
    if s_num:
        p = num_pos.clamp(min=0)
        st.num_pos[:] = torch.where(mu[:, None] > 0, num_pos, -1)
        st.num_k[:] = Kt[hr, p]
        st.num_v[:] = Vt[hr, p]
        st.num_sq[:] = torch.gather(sq, 1, p)
    st.n_seen = int(n_seen)
    return st


def _member_rank(order, starts, counts, slot_pos, M):
    """0-based rank of token ``slot_pos[h, c, i]`` among the members of cluster ``c`` (token order)."""
    H, n = order.shape
    inv = torch.empty_like(order)
    inv.scatter_(1, order, torch.arange(n, device=order.device)[None, :].expand(H, n).contiguous())
    where = torch.gather(inv, 1, slot_pos.reshape(H, -1)).reshape(slot_pos.shape)  # index in sorted order
    return where - starts[:, :M, None]
