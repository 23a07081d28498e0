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
    # torch's vectorised float64 sqrt on CPU can be off by one ulp; NumPy's is correctly rounded
    # (CUDA's double sqrt is correctly rounded too)
    if x.device.type == "cpu" and x.dtype == torch.float64:
        return torch.from_numpy(np.sqrt(x.contiguous().numpy()))
    return torch.sqrt(x)


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
        else np.broadcast_to(threshold.detach().cpu().double().numpy(), (H,))
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


def _sq_norms(Vt: torch.Tensor) -> torch.Tensor:
    V64 = Vt.to(torch.float64)
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
    K64, V64, Xf64, ts, s_num, thr, scale, cent, k, counts, radius, slot_pos, order, starts, mu, num_pos, sq, n_seen
):
    """The reference's :class:`SubGenState` from the per-head arrays (all NumPy)."""
    H, n, d = K64.shape
    s = V64.shape[-1]
    heads = []
    for h in range(H):
        t = ts[h]
        head = rs.SubGenHead(d, s, t, s_num, float(thr[h]), scale)
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
        if head.mu > 0.0:
            p = num_pos[h].astype(np.int64)
            head.num_pos[:] = p
            head.num_k[:], head.num_v[:], head.num_sq[:] = Kh[p], Vh[p], sq[h, p]
        head.n_seen = int(n_seen)
        heads.append(head)
    return rs.SubGenState(heads)


# ---------------------------------------------------------------------- SubGen
def subgen_stream(
    K, V, *, t, s_num: int, threshold, scale: float, rng: np.random.Generator | None = None, uniforms=None
) -> rs.SubGenState:
    """Streaming SubGen; see :func:`balancekv.reference.subgen.subgen_stream` (same arguments, same state).

    ``K (H, n, d)``, ``V (H, n, s)`` (NumPy or torch, any device), uniforms ``(n, H, max(t) + s_num)``
    or drawn from ``rng`` in that layout. Returns the reference's ``SubGenState``.
    """
    Kt, Vt = _kv(K, V)
    H, n, d = Kt.shape
    ts = rs._per_head(t, H, "t")
    if isinstance(s_num, bool) or not isinstance(s_num, (int, np.integer)) or s_num < 1:
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
        sq = _sq_norms(Vt)
        mu_run = torch.cumsum(sq, dim=1)  # sequential: the reference's running mu
        p_num = torch.where(sq > 0.0, sq / torch.where(mu_run > 0.0, mu_run, 1.0), float("nan"))
        num_ok = torch.ones((H, s_num), dtype=torch.bool, device=dev)
        num_pos = _last_taker(U[:, :, t_max:], p_num, torch.zeros_like(assign), 1, num_ok)[:, 0]
        mu = mu_run[:, -1] if n else torch.zeros(H, dtype=torch.float64, device=dev)
    Xf64 = _folded64(Xf, K, scale)
    return _assemble(
        _np64(K),
        _np64(V),
        Xf64,
        ts,
        s_num,
        thr.cpu().numpy(),
        scale,
        cent.cpu().numpy(),
        k.cpu().numpy(),
        counts.cpu().numpy(),
        radius.cpu().numpy(),
        slot_pos.cpu().numpy(),
        order.cpu().numpy(),
        starts.cpu().numpy(),
        mu.cpu().numpy(),
        num_pos.cpu().numpy(),
        sq.cpu().numpy(),
        n,
    )


def subgen_offline(
    K, V, *, t, s_num: int, m: int, scale: float, rng: np.random.Generator | None = None, uniforms=None
) -> rs.SubGenState:
    """Offline SubGen; see :func:`balancekv.reference.subgen.subgen_offline` (same arguments, same state).

    Greedy k-centre for every head at once; reservoir picks ``floor(U_res[h, c, j] * n_c)`` among the
    members in token order; numerator by inverse CDF of ``U_num`` (a batched ``searchsorted``).
    """
    Kt, Vt = _kv(K, V)
    H, n, d = Kt.shape
    ts = rs._per_head(t, H, "t")
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    if isinstance(s_num, bool) or not isinstance(s_num, (int, np.integer)) or s_num < 1:
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
        sq = _sq_norms(Vt)
        cum = torch.cumsum(sq, dim=1)
        mu = cum[:, -1]
        num_pos = torch.searchsorted(cum, U_num * mu[:, None], right=True)
        ar = torch.arange(n, device=dev)
        last = torch.where(sq > 0.0, ar[None, :], -1).max(dim=1).values  # last nonzero value
        num_pos = torch.minimum(num_pos, last[:, None])
        thr = dist.to(torch.float64).max(dim=1).values
    Xf64 = _folded64(Xf, K, scale)
    return _assemble(
        _np64(K),
        _np64(V),
        Xf64,
        ts,
        s_num,
        thr.cpu().numpy(),
        scale,
        cent.cpu().numpy(),
        k.cpu().numpy(),
        counts.cpu().numpy(),
        radius.cpu().numpy(),
        slot_pos.cpu().numpy(),
        order.cpu().numpy(),
        starts.cpu().numpy(),
        mu.cpu().numpy(),
        num_pos.cpu().numpy(),
        sq.cpu().numpy(),
        n,
    )
