"""Practical blocked BalanceKV (SPEC section 4b), vectorised over heads and blocks (torch / Triton).

Same names and semantics as :mod:`balancekv.reference.blocked_balance` (the
definition). All blocks of all heads run in one batch: the kernel matrices come
from one batched matmul, and the sequential sign loop does one vector step per
token position for every block at once (torch), or one Triton program per block
with the Gram tile and running dots in registers (CUDA, or the interpreter).

Equivalence (SPEC section 11): fed the same uniforms, signs equal the reference's
in float64 except at genuine ties; :func:`blocked_balance` draws its uniforms
from the given NumPy generator exactly as the reference does, so the same
generator state gives the same kept tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from balancekv.reference.blocked_balance import EXP_CLIP, KERNELS, halving_sizes

from balancekv._arrays import host_uniforms, take_rows

from . import _triton as T
from .walk import MAX_TRITON_BLOCK, _as_tensor, balance_walk_loop

__all__ = [
    "blocked_balance",
    "blocked_balance_rounds",
    "blocked_walk_signs",
    "fixed_size_halving",
    "halving_sizes",
    "lockstep",
]


def blocked_kernel_matrix(K, V, weights, valid, *, scale, temp, beta, a2, value_centering, a2_mode="abs"):
    """``kappa (B, blk, blk)`` of SPEC 4b step 3 (float dtype of ``K``), as in the reference."""
    okf = valid.to(K.dtype)
    nv = okf.sum(-1).clamp_min(1.0)
    kbar = torch.einsum("bi,bid->bd", okf, K) / nv[:, None]
    Kc = (K - kbar[:, None, :]) * okf[..., None]
    # in place on one (B, blk, blk) buffer: the kernel matrix is the memory-bound part
    kappa = torch.baddbmm(
        torch.full((), -float(beta), dtype=K.dtype, device=K.device).expand(Kc.shape[0], Kc.shape[1], Kc.shape[1]),
        Kc,
        Kc.transpose(-1, -2),
        alpha=float(temp * scale),
    )
    kappa.clamp_(max=EXP_CLIP).exp_()
    return kappa.mul_(value_factor(V, weights, valid, a2=a2, value_centering=value_centering, a2_mode=a2_mode))


def query_logits(K, probes, *, scale, temp):
    """``temp * scale * <k_i, q_l>`` ``(H, n, L)`` for every token and probe: the rows every round's blocks
    of the query-aware kernel read (one matmul for all rounds)."""
    return float(temp * scale) * (K @ probes.transpose(-1, -2))


def query_kernel_factor(K, probes, valid, *, scale, temp, beta, scores=None):
    """The query-aware key factor ``G_ij / max_i G_ii * e^{-beta}`` ``(B, blk, blk)`` of the reference's
    ``kernel="queries"`` (``phi_l(k_i) = exp(s_li - max_i s_li)``, ``G = phi^T phi``). ``scores``
    (optional): the logits ``temp * scale * <q_l, k_i>`` ``(B, L, blk)`` already computed."""
    ok = valid
    sc = float(temp * scale) * (probes @ K.transpose(-1, -2)) if scores is None else scores  # (B, L, blk)
    # no padding (every block but a round's last; checked on the host only): the masks are the identity
    full = ok.device.type == "cpu" and bool(ok.all())
    if not full:
        sc = sc.masked_fill(~ok[:, None, :], float("-inf"))
    m = sc.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    phi = (sc - m).clamp_min_(-EXP_CLIP).exp_()
    if not full:
        phi = phi * ok[:, None, :].to(phi.dtype)
    G = phi.transpose(-1, -2) @ phi
    gmax = torch.diagonal(G, dim1=-2, dim2=-1).amax(-1)
    tiny = torch.finfo(G.dtype).tiny
    return G.div_(gmax.clamp_min(tiny)[:, None, None]).mul_(float(np.exp(min(-beta, EXP_CLIP))))


def _query_round_kappa(logits, idx, m, Vb, wb, okb, *, beta, a2, value_centering, a2_mode):
    """``kappa (B, blk, blk)`` of one round of the query-aware kernel on the blocks of ``idx (H, nb * blk)`` (the
    first ``m`` slots of each head are tokens, the rest padding): :func:`query_kernel_factor` of the rows
    ``idx`` of ``logits (H, n, L)`` times :func:`value_factor` of the gathered values ``Vb (B, blk, s)``. The same
    numbers, computed in the gathered ``(B, blk, L)`` layout (no transposed copy) and in place on the fresh
    gathered buffers (``Vb`` is overwritten): padding is a slice of each head's last block (never a whole
    block), so it is set instead of masked."""
    H, nbk = idx.shape
    B, blk, _ = Vb.shape
    sc = take_rows(logits, idx)  # (H, nb * blk, L), a fresh buffer
    if m < nbk:
        sc[:, m:] = float("-inf")
    sc = sc.view(B, blk, -1)
    phi = sc.sub_(sc.amax(1, keepdim=True))  # every block holds a token: the maxima are finite
    if phi.dtype == torch.float64:  # float32: exp(-EXP_CLIP) is already 0, the clip changes nothing
        phi.clamp_min_(-EXP_CLIP)
    phi.exp_()
    if m < nbk:
        phi.view(H, nbk, -1)[:, m:] = 0.0
    G = torch.bmm(phi, phi.transpose(1, 2))
    gmax = torch.diagonal(G, dim1=-2, dim2=-1).amax(-1)
    G.div_(gmax.clamp_min(torch.finfo(G.dtype).tiny)[:, None, None])
    if float(np.exp(min(-beta, EXP_CLIP))) != 1.0:
        G.mul_(float(np.exp(min(-beta, EXP_CLIP))))
    if a2_mode != "abs":
        return G.mul_(value_factor(Vb, wb, okb, a2=a2, value_centering=value_centering, a2_mode=a2_mode))
    okf = okb.to(Vb.dtype)
    wv = wb * okf
    if value_centering:
        vbar = torch.einsum("bi,bis->bs", wv, Vb) / wv.sum(-1).clamp_min(torch.finfo(Vb.dtype).tiny)[:, None]
        Vb.sub_(vbar[:, None, :])
    Vp = Vb.mul_(wv[..., None])
    if float(a2) == 0.0:
        vf = torch.bmm(Vp, Vp.transpose(1, 2))
    else:
        vf = torch.baddbmm(
            torch.full((), float(a2), dtype=Vp.dtype, device=Vp.device).expand(B, blk, blk), Vp, Vp.transpose(1, 2)
        )
    return G.mul_(vf)


def value_factor(V, weights, valid, *, a2, value_centering, a2_mode: str = "abs"):
    """``<v'_i, v'_j> + a2`` ``(B, blk, blk)`` with ``v'`` the weighted (optionally centred) values; with
    ``a2_mode="rel"`` the constant is ``a2 * mu_b * w_i w_j`` (``mu_b`` the block's mean squared unweighted
    value norm), as in the reference."""
    okf = valid.to(V.dtype)
    if value_centering:
        wv = weights * okf
        vbar = torch.einsum("bi,bis->bs", wv, V) / wv.sum(-1).clamp_min(torch.finfo(V.dtype).tiny)[:, None]
        U = V - vbar[:, None, :]
    else:
        U = V
    Vp = weights[..., None] * U * okf[..., None]
    if a2_mode == "abs":
        return torch.baddbmm(
            torch.full((), float(a2), dtype=V.dtype, device=V.device).expand(Vp.shape[0], Vp.shape[1], Vp.shape[1]),
            Vp,
            Vp.transpose(-1, -2),
        )
    Uo = U * okf[..., None]
    mu = (Uo * Uo).sum((-1, -2)) / okf.sum(-1).clamp_min(1.0)
    wo = weights * okf
    return torch.baddbmm((float(a2) * mu)[:, None, None] * wo[:, :, None] * wo[:, None, :], Vp, Vp.transpose(-1, -2))


def drift_scale(kappa, valid, gamma_norm: str):
    """``(B, blk)`` factors the running dot is multiplied by (``gamma_norm``, see the reference): 1, or
    ``1 / (2 kappa_ii)`` (``"token"``), or ``1 / (2 max_i kappa_ii)`` (``"diag"``); 1 where that is 0."""
    if gamma_norm == "none":
        return None
    dii = torch.diagonal(kappa, dim1=-2, dim2=-1)
    if gamma_norm == "token":
        d = torch.where(valid & (dii > 0), dii, torch.ones_like(dii))
        return 1.0 / (2.0 * d)
    dmax = torch.where(valid, dii, torch.full_like(dii, -float("inf"))).amax(-1)
    dmax = torch.where(torch.isfinite(dmax) & (dmax > 0), dmax, torch.ones_like(dmax))
    return (1.0 / (2.0 * dmax))[:, None].expand_as(dii)


def _signs(kappa, r, ok, gamma, gamma_norm):
    first = ok & (torch.cumsum(ok.to(torch.int64), dim=-1) == 1)
    xf = balance_walk_loop(kappa, r, gamma, first=first, valid=ok, row_scale=drift_scale(kappa, ok, gamma_norm))
    return xf.to(torch.int8)


class WalkRound(NamedTuple):
    """One round's torch sign loop, deferred so that :func:`lockstep` runs several builds' loops as one:
    the kernel matrices ``kappa (B, blk, blk)``, uniforms and valid mask ``(B, blk)``, the walk's options."""

    kappa: torch.Tensor
    r: torch.Tensor
    valid: torch.Tensor
    gamma: float
    gamma_norm: str


def _lockstep_signs(rounds: list[WalkRound]) -> list[torch.Tensor]:
    """The signs of several deferred rounds from one sign loop: blocks padded to the largest ``blk``
    (padding is invalid: sign 0, and every step of the loop is elementwise per block, so each block's
    signs are those of its own loop, bit for bit)."""
    if len(rounds) == 1:
        w = rounds[0]
        return [_signs(w.kappa, w.r, w.valid, w.gamma, w.gamma_norm)]
    bmax = max(w.kappa.shape[-1] for w in rounds)
    F = torch.nn.functional
    pad = lambda x, b, v: F.pad(x, (0, bmax - b), value=v) if b < bmax else x
    kap = torch.cat([F.pad(w.kappa, (0, bmax - w.kappa.shape[-1]) * 2) for w in rounds])
    r = torch.cat([pad(w.r, w.r.shape[-1], 1.0) for w in rounds])
    ok = torch.cat([pad(w.valid, w.valid.shape[-1], False) for w in rounds])
    x = _signs(kap, r, ok, rounds[0].gamma, rounds[0].gamma_norm)
    out, at = [], 0
    for w in rounds:
        B, blk = w.r.shape
        out.append(x[at : at + B, :blk])
        at += B
    return out


def lockstep(gens: list) -> list:
    """Run round generators (:func:`blocked_balance_rounds`) together and return their results in order.

    Each step, the deferred sign loops of every build still running (one round each) run as one loop
    (per walk option and dtype): the loop's cost is its sequential steps, so ``k`` builds in lockstep
    cost about one build's steps, not ``k``. Every build draws its own uniforms and computes its own
    kernel matrices, so its result is the one it has alone."""
    results: list = [None] * len(gens)
    waiting: dict[int, WalkRound] = {}

    def advance(i, sent):
        try:
            waiting[i] = gens[i].send(sent)
        except StopIteration as stop:
            results[i] = stop.value
            waiting.pop(i, None)

    for i in range(len(gens)):
        advance(i, None)
    while waiting:
        groups: dict = {}
        for i, w in waiting.items():
            groups.setdefault((w.gamma, w.gamma_norm, w.kappa.dtype, w.kappa.device), []).append(i)
        for ids in groups.values():
            for i, x in zip(ids, _lockstep_signs([waiting[i] for i in ids])):
                advance(i, x)
    return results


def blocked_walk_signs(
    K,
    V,
    uniforms,
    *,
    weights=None,
    valid=None,
    scale: float,
    gamma: float = 4.0,
    temp: float = 1.0,
    beta: float = 0.0,
    a2: float = 0.025,
    value_centering: bool = True,
    kernel: str = "keys",
    probes=None,
    scores=None,
    gamma_norm: str = "none",
    a2_mode: str = "abs",
    backend: str = "auto",
    _defer: bool = False,
):
    """Signs ``(B, blk)`` int8 of one SPEC 4b round for ``B`` blocks; see the reference.

    Accepts NumPy arrays (returned as NumPy) or torch tensors (returned as torch on the
    same device). Computes in float64 for float64 keys, else float32. ``kernel="keys"`` runs the
    Triton kernel on CUDA (Gram tile and running dots in registers); ``kernel="queries"`` (the
    query-aware kernel, ``probes (B, L, d)``) builds its kernel matrix with batched matmuls and
    runs the torch sign loop on every device. ``_defer`` (torch input, for :func:`lockstep`): return
    the :class:`WalkRound` instead of running the torch sign loop (the Triton walk still runs here).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    numpy_in = not isinstance(K, torch.Tensor)
    Kt = _as_tensor(K, "K")
    if Kt.ndim != 3:
        raise ValueError(f"K must have shape (B, blk, d), got {tuple(Kt.shape)}")
    if not torch.is_floating_point(Kt):
        raise TypeError(f"K must be floating, got {Kt.dtype}")
    dt = torch.float64 if Kt.dtype == torch.float64 else torch.float32
    dev = Kt.device
    Kt = Kt.to(dt)
    Vt = _as_tensor(V, "V", dtype=dt, device=dev)
    if Vt.ndim != 3 or Vt.shape[:2] != Kt.shape[:2]:
        raise ValueError(
            f"K and V must have shapes (B, blk, d) and (B, blk, s), got {tuple(Kt.shape)} and {tuple(Vt.shape)}"
        )
    B, blk, d = Kt.shape
    s = Vt.shape[-1]
    r = _as_tensor(uniforms, "uniforms", dtype=dt, device=dev)
    if tuple(r.shape) != (B, blk):
        raise ValueError(f"uniforms must have shape {(B, blk)}, got {tuple(r.shape)}")
    w = (
        torch.ones((B, blk), dtype=dt, device=dev)
        if weights is None
        else _as_tensor(weights, "weights", dtype=dt, device=dev)
    )
    ok = (
        torch.ones((B, blk), dtype=torch.bool, device=dev)
        if valid is None
        else _as_tensor(valid, "valid", device=dev).to(torch.bool)
    )
    if tuple(w.shape) != (B, blk) or tuple(ok.shape) != (B, blk):
        raise ValueError(f"weights and valid must have shape {(B, blk)}")
    if kernel == "queries":
        P = None
        if scores is None:
            if probes is None:
                raise ValueError("probes (B, L, d) are required for kernel='queries'")
            P = _as_tensor(probes, "probes", dtype=dt, device=dev)
            if P.ndim != 3 or P.shape[0] != B or P.shape[2] != d or P.shape[1] < 1:
                raise ValueError(f"probes must have shape ({B}, L>=1, {d}), got {tuple(P.shape)}")
        kappa = query_kernel_factor(Kt, P, ok, scale=scale, temp=temp, beta=beta, scores=scores)
        kappa = kappa * value_factor(Vt, w, ok, a2=a2, value_centering=value_centering, a2_mode=a2_mode)
        if _defer:
            return WalkRound(kappa, r, ok, float(gamma), gamma_norm)
        x = _signs(kappa, r, ok, gamma, gamma_norm)
    elif blk <= MAX_TRITON_BLOCK and gamma_norm == "none" and a2_mode == "abs" and T.use_triton(backend, Kt):
        ker = T.kernels("kernels_walk")
        X = torch.empty((B, blk), dtype=torch.int8, device=dev)
        ker.blocked_walk_kernel[(B,)](
            Kt,
            Vt,
            r.contiguous(),
            w.contiguous(),
            ok.to(torch.int8).contiguous(),
            X,
            blk,
            d,
            s,
            float(temp * scale),
            float(beta),
            float(gamma),
            float(a2),
            float(EXP_CLIP),
            Kt.stride(0),
            Kt.stride(1),
            Kt.stride(2),
            Vt.stride(0),
            Vt.stride(1),
            Vt.stride(2),
            CENTER_V=bool(value_centering),
            F64=dt == torch.float64,
            BLOCK=max(16, T.next_pow2(blk)),
            BLOCK_D=max(16, T.next_pow2(d)),
            BLOCK_S=max(16, T.next_pow2(s)),
        )
        x = X
    else:
        kappa = blocked_kernel_matrix(
            Kt, Vt, w, ok, scale=scale, temp=temp, beta=beta, a2=a2, value_centering=value_centering, a2_mode=a2_mode
        )
        if _defer:
            return WalkRound(kappa, r, ok, float(gamma), gamma_norm)
        x = _signs(kappa, r, ok, gamma, gamma_norm)
    return x.cpu().numpy() if numpy_in else x


def fixed_size_halving(signs, valid=None):
    """SPEC 4b step 5 in torch: ``(keep, doubled)`` bool ``(B, blk)``; see the reference."""
    x = signs
    ok = (x != 0) if valid is None else valid.to(torch.bool)
    B, blk = x.shape
    nv = ok.sum(-1)
    h = (nv + 1) // 2
    cp = torch.cumsum((x == 1) & ok, dim=-1)
    cm = torch.cumsum((x == -1) & ok, dim=-1)
    hit = ((cp == h[:, None]) | (cm == h[:, None])) & ok
    anyhit = hit.any(-1)
    c = torch.where(anyhit, hit.to(torch.int8).argmax(-1), torch.full_like(nv, blk))
    full = x.gather(1, c.clamp_max(blk - 1)[:, None])[:, 0]
    pos = torch.arange(blk, device=x.device)[None, :]
    prefix = pos <= c[:, None]
    doubled = ok & prefix & (x != full[:, None])
    keep = doubled | (ok & ~prefix)
    single = (nv == 1)[:, None]
    keep = torch.where(single, ok, keep)
    doubled = doubled & ~single
    return keep, doubled


def blocked_balance(K, V, **kw):
    """The SPEC 4b procedure on ``H`` heads, on torch tensors; see the reference for the contract.

    ``K (H, n, d)``, ``V (H, n, s)``; torch in, torch out on the same device (NumPy in, NumPy
    out, computing in float64). Uniforms come from ``rng`` in the reference's order (round ``r``:
    ``rng.random((H, nblocks_r, blk_r))``, drawn on the host and moved once) or are given;
    ``kernel``, ``probes (H, L, d)`` and ``protect (H, h)`` as in the reference. ``dtype``
    (default: float64 for NumPy/float64 input, else float32) is the compute dtype.
    Returns ``(indices (H, m) int64, log_weights (H, m))``. Several builds run together with
    :func:`lockstep` over :func:`blocked_balance_rounds` (each gives the same result as here).
    """
    idx, lw = lockstep([blocked_balance_rounds(K, V, **kw)])[0]
    if not isinstance(K, torch.Tensor):
        return idx.cpu().numpy(), lw.cpu().numpy()
    return idx, lw


def blocked_balance_rounds(
    K,
    V,
    *,
    itrs: int,
    block: int = 128,
    sink: int = 32,
    window: int = 32,
    scale: float,
    rng: np.random.Generator | None = None,
    uniforms=None,
    gamma: float = 4.0,
    temp: float = 1.0,
    beta: float = 0.0,
    a2: float = 0.025,
    value_centering: bool = True,
    kernel: str = "keys",
    probes=None,
    protect=None,
    halving: str = "block",
    gamma_norm: str = "none",
    a2_mode: str = "abs",
    backend: str = "auto",
    dtype=None,
    logits=None,
):
    """:func:`blocked_balance` as a generator of its rounds: yields each round's deferred sign loop
    (:class:`WalkRound`), is sent its signs, and returns ``(indices, log_weights)`` (torch tensors);
    :func:`lockstep` drives it. ``logits`` (``kernel="queries"``, optional): :func:`query_logits` of
    ``K`` and ``probes``, when several builds share them (computed here otherwise)."""
    if (rng is None) == (uniforms is None):
        raise ValueError("give exactly one of rng and uniforms")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    numpy_in = not isinstance(K, torch.Tensor)
    Kt = _as_tensor(K, "K")
    if dtype is None:
        dtype = torch.float64 if (numpy_in or Kt.dtype == torch.float64) else torch.float32
    Kt = Kt.to(dtype)
    dev = Kt.device
    Vt = _as_tensor(V, "V", dtype=dtype, device=dev)
    H, n, d = Kt.shape
    P = None
    if kernel == "queries":
        if probes is None:
            raise ValueError("probes (H, L, d) are required for kernel='queries'")
        P = _as_tensor(probes, "probes", dtype=dtype, device=dev)
        if P.ndim != 3 or P.shape[0] != H or P.shape[2] != d:
            raise ValueError(f"probes must have shape ({H}, L, {d}), got {tuple(P.shape)}")
        if logits is None:
            logits = query_logits(Kt, P, scale=scale, temp=temp)
    s0 = min(sink, n)
    w0 = min(window, n - s0)
    cur = torch.arange(s0, n - w0, device=dev).expand(H, n - s0 - w0)
    prot = torch.zeros((H, 0), dtype=torch.int64, device=dev)
    if protect is not None:
        prot = torch.sort(_as_tensor(protect, "protect", device=dev).to(torch.int64), dim=1).values
        if (
            prot.ndim != 2
            or prot.shape[0] != H
            or bool((prot < s0).any())
            or bool((prot >= n - w0).any())
            or bool((prot.diff(dim=1) == 0).any())
        ):
            raise ValueError(f"protect must hold ({H}, h) distinct middle indices in [{s0}, {n - w0})")
        rest = torch.ones(cur.shape, dtype=torch.bool, device=dev)
        rest.scatter_(1, prot - s0, False)
        cur = cur[rest].reshape(H, -1)
    logw = torch.zeros(cur.shape, dtype=dtype, device=dev)
    log2 = float(np.log(2.0))
    for rnd in range(itrs):
        m = cur.shape[1]
        if m < 2:
            continue
        blk = min(block, m)
        nb = -(-m // blk)
        pad = nb * blk - m
        idx = torch.cat([cur, torch.zeros((H, pad), dtype=cur.dtype, device=dev)], dim=1)
        ok = (torch.arange(nb * blk, device=dev) < m).expand(H, nb * blk)
        wts = torch.cat([torch.exp(logw), torch.ones((H, pad), dtype=logw.dtype, device=dev)], dim=1)
        if uniforms is None:
            rt = host_uniforms(rng, (H, nb, blk), Kt)
        else:
            rt = _as_tensor(uniforms[rnd], "uniforms", dtype=dtype, device=dev)
            if tuple(rt.shape) != (H, nb, blk):
                raise ValueError(f"uniforms[{rnd}] must have shape {(H, nb, blk)}, got {tuple(rt.shape)}")
        Vb = take_rows(Vt, idx).reshape(H * nb, blk, -1)  # gather: much faster than fancy indexing
        okb = ok.reshape(H * nb, blk)
        wb, rb = wts.reshape(H * nb, blk), rt.reshape(H * nb, blk)
        if P is not None:
            # the query-aware kernel: the blocks' logits are rows of the logits of every token (H, n, L)
            kappa = _query_round_kappa(
                logits, idx, m, Vb, wb, okb, beta=beta, a2=a2, value_centering=value_centering, a2_mode=a2_mode
            )
            signs = WalkRound(kappa, rb, okb, float(gamma), gamma_norm)
        else:
            signs = blocked_walk_signs(
                take_rows(Kt, idx).reshape(H * nb, blk, -1),
                Vb,
                rb,
                weights=wb,
                valid=okb,
                scale=scale,
                gamma=gamma,
                temp=temp,
                beta=beta,
                a2=a2,
                value_centering=value_centering,
                gamma_norm=gamma_norm,
                a2_mode=a2_mode,
                backend=backend,
                _defer=True,
            )
        if isinstance(signs, WalkRound):
            signs = yield signs
        if halving == "global":  # the scan over the whole middle, block after block (the released code)
            keep, dbl = fixed_size_halving(signs.reshape(H, nb * blk), ok.reshape(H, nb * blk))
        else:
            keep, dbl = fixed_size_halving(signs, okb)
        keep, dbl = keep.reshape(H, nb * blk), dbl.reshape(H, nb * blk)
        lw = torch.cat([logw, torch.zeros((H, pad), dtype=logw.dtype, device=dev)], dim=1) + dbl.to(logw.dtype) * log2
        new_m = halving_sizes(m, block, 1, halving)[-1]  # the same count in every head (a deterministic size)
        # the kept slots in order, the same count per head: a stable sort of the keep mask
        sel = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :new_m]
        cur = idx.gather(1, sel)
        logw = lw.gather(1, sel)
    head = torch.arange(s0, device=dev).expand(H, s0)
    tail = torch.arange(n - w0, n, device=dev).expand(H, w0)
    out_idx = torch.cat([head, cur, prot, tail], dim=1)
    zeros = lambda k: torch.zeros((H, k), dtype=dtype, device=dev)
    out_lw = torch.cat([zeros(s0), logw, zeros(prot.shape[1]), zeros(w0)], dim=1)
    if prot.shape[1]:
        order = torch.sort(out_idx, dim=1, stable=True).indices
        out_idx, out_lw = out_idx.gather(1, order), out_lw.gather(1, order)
    return out_idx, out_lw
