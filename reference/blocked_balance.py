"""Practical blocked BalanceKV, the variant the [BKV] authors ran on real models (SPEC section 4b).

Per head the first ``sink`` and last ``window`` tokens stay exact; the middle is
compressed by ``itrs`` halving rounds. One round:

1. split the current middle tokens (in stream order) into blocks of ``block``
   tokens, padding the last block (padding is never kept);
2. centre the keys of each block: ``k~ = k - mean_block(k)`` (softmax is invariant
   to a common key translation, so this only conditions the kernel);
3. build the kernel ``kappa_ij = exp(temp * scale * <k~_i, k~_j> - beta) * (<v'_i, v'_j> + a2)``
   where ``v'_i = w_i v_i`` (``w_i`` the token's current weight) or, with
   ``value_centering``, ``v'_i = w_i (v_i - vbar)`` with ``vbar = sum w_i v_i / sum w_i``
   over the block's valid tokens; ``a2`` is the joint-balancing constant;
4. walk: ``x = +1`` for the first valid token; then
   ``p_i = clip(1/2 - gamma * sum_{j<i} kappa_ij x_j, 0, 1)`` and ``x_i = +1`` iff ``r_i < p_i``;
5. fixed-size halving: keep exactly half of the block (see :func:`fixed_size_halving`), or with
   ``halving="global"`` (the authors' released code) half of the whole middle, scanning the
   signs of all blocks concatenated.

Options added for issue 12 (defaults keep the previous behaviour bit for bit): ``halving``,
``gamma_norm`` (``"none" | "diag" | "token"``: drift in absolute units, in units of the block's
largest kernel diagonal, or of the token's own), ``a2_mode`` (``"abs" | "rel"``: joint-balancing
constant absolute, or relative to the mean squared value norm and weighted like the values).
The no-query options recommended for ``balance`` are measured in
``benchmarks/balance_default_choice.py`` (``RECOMMENDED``; ``benchmarks/README.md``).

Kept tokens of the halved prefix double their weight, so after ``itrs`` rounds
the weights lie in ``{1, 2, ..., 2^itrs}``. The estimator is single-set
(``num_logw == den_logw``, SPEC section 1).

Why value centring: the attention output is a ratio, so a value component
shared by all tokens cancels; the ratio's error is the discrepancy of
``exp(a_i) w_i (v_i - z(q))``, which the centred kernel balances directly
(SPEC 4b; measured in ``benchmarks/balance_kernel_choice.py``).

``gamma = 0`` gives ``p_i = 1/2``: independent fair signs through the same
procedure, the authors' "uniform" baseline (``uniform-halving``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = [
    "A2_MODES",
    "EXP_CLIP",
    "GAMMA_NORMS",
    "HALVINGS",
    "KERNELS",
    "blocked_balance",
    "blocked_walk_signs",
    "fixed_size_halving",
    "halving_sizes",
]

#: Kernel exponents are clipped above at this value (float64 semantics). Beyond it
#: ``gamma * kappa`` saturates ``p`` at 0 or 1 for any non-negligible value factor, and the
#: clip keeps keys of norm 1e4 from overflowing. Fast paths must apply the same clip.
EXP_CLIP = 300.0

#: Walk kernels: ``keys`` (the authors' key kernel; mirrored by the fast path) and ``queries``
#: (query-aware, reference only).
KERNELS = ("keys", "queries")

#: Walk drift normalisations (``gamma_norm``) and joint-balancing constants (``a2_mode``) of
#: :func:`blocked_walk_signs`; halving scans (``halving``) of :func:`blocked_balance`.
GAMMA_NORMS = ("none", "diag", "token")
A2_MODES = ("abs", "rel")
HALVINGS = ("block", "global")


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
    gamma_norm: str = "none",
    a2_mode: str = "abs",
) -> np.ndarray:
    """One round of SPEC 4b steps 2–4 for ``B`` independent blocks: the walk's signs.

    Parameters
    ----------
    K : ``(B, blk, d)`` keys. V : ``(B, blk, s)`` values. uniforms : ``(B, blk)`` in ``[0, 1)``.
    weights : ``(B, blk)`` current token weights (``None``: all 1), multiplying the values.
    valid : ``(B, blk)`` bool, ``False`` for padding (``None``: all valid).
    scale, gamma, temp, beta, a2, value_centering : as in the module docstring.
    kernel : ``"keys"`` (default, the kernel above) or ``"queries"`` (the query-aware kernel below).
    probes : ``(B, L, d)`` observed queries, required for ``kernel="queries"`` (ignored otherwise).
    gamma_norm : ``"none"`` (default, the authors' absolute drift) or ``"diag"`` (see below).
    a2_mode : ``"abs"`` (default: ``a2`` added as is) or ``"rel"`` (see below).

    Exact definition (float64). With ``V_b`` the valid tokens of block ``b`` and ``n_b = |V_b|``:

    - ``kbar = sum_{i in V_b} k_i / max(n_b, 1)``; ``k~_i = k_i - kbar``;
    - ``v'_i = w_i v_i``; with ``value_centering``, ``v'_i = w_i (v_i - vbar)`` where
      ``vbar = sum_{V_b} w_i v_i / sum_{V_b} w_i``;
    - ``kappa_ij = exp(min(temp * scale * <k~_i, k~_j> - beta, EXP_CLIP)) * (<v'_i, v'_j> + a2)``;
    - scanning ``i = 0 .. blk-1``: padding gets sign 0 and never enters a sum; the first valid
      token gets ``+1``; every later valid token gets ``+1`` iff
      ``r_i < clip(1/2 - gamma * sum_{j<i, j valid} kappa_ij x_j, 0, 1)``, else ``-1``.

    Query-aware kernel (``kernel="queries"``, observed queries ``q_1..q_L`` of the block):
    ``s_li = temp * scale * <q_l, k_i>``, ``m_l = max_{i in V_b} s_li`` (per-query shift, per block),
    ``phi_l(k_i) = exp(s_li - m_l)`` (so ``0 < phi <= 1``), ``G_ij = sum_l phi_l(k_i) phi_l(k_j)``,
    ``kappa_ij = exp(-beta) * G_ij / max_{i in V_b} G_ii * (<v'_i, v'_j> + a2)``.
    The softmax numerator and denominator of query ``q_l`` are sums of ``exp(s_li) v_i`` and
    ``exp(s_li)``, so the signed sum of ``phi_l(k_i) (v'_i, sqrt(a2))`` is exactly the (shifted)
    numerator/denominator discrepancy on ``q_l``: this kernel balances the errors on the observed
    queries, where the ``keys`` kernel balances a key-space proxy for all queries. Dividing by the
    largest diagonal entry keeps ``gamma`` on the same ``O(1)`` scale for any ``L``. (No fast path:
    callers use this reference walk for this kernel.)

    Walk normalisation (``gamma_norm``; the sum runs over valid ``j < i``, ``g_i = sum kappa_ij x_j``):

    - ``"none"`` (default): ``p_i = clip(1/2 - gamma * g_i, 0, 1)``, absolute units (``gamma * kappa``
      is ``O(s e^{scale r^2})``, so for unnormalised values ``p`` saturates at once and the walk is
      greedy whatever ``gamma``);
    - ``"diag"``: ``p_i = clip(1/2 - gamma * g_i / (2 D_b), 0, 1)`` with ``D_b = max_{i in V_b} kappa_ii``
      (1 where it is 0: then the block's kernel is 0), the theory's ``c R^2`` (SPEC 3,
      ``p = 1/2 - g / (2 c R^2)``): ``gamma = 1/c``;
    - ``"token"``: ``p_i = clip(1/2 - gamma * g_i / (2 kappa_ii), 0, 1)`` (1 where ``kappa_ii = 0``):
      the walk's position projected on the token's own feature direction in units of that
      token's length, scale-free per token (kernels whose diagonal spans many orders of
      magnitude, where ``"diag"`` leaves all but the largest tokens on fair coins). A large
      ``gamma`` (e.g. 64) is the greedy rule ``x_i = -sign(g_i)`` except where ``|g_i|`` is below
      ``kappa_ii / gamma`` (there the coin stays close to fair).

    Relative joint balancing (``a2_mode="rel"``): the constant coordinate appended to the
    (centred) values is ``sqrt(a2 * mu_b)`` with ``mu_b = mean_{i in V_b} ||u_i||^2``, ``u_i``
    the unweighted (centred) values, and it is weighted like the values:
    ``kappa_ij = exp(...) * w_i w_j (<u_i, u_j> + a2 mu_b)``. So ``a2`` is the denominator's share
    of the balanced vector relative to the values', whatever the value scale, and tokens of
    weight 2 count double in the denominator too (``"abs"`` adds ``a2`` unweighted).

    Returns ``(B, blk)`` int8 signs in ``{-1, 0, +1}`` (0 exactly on padding).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    K = np.asarray(K, np.float64)
    V = np.asarray(V, np.float64)
    if K.ndim != 3 or V.ndim != 3 or K.shape[:2] != V.shape[:2]:
        raise ValueError(f"K and V must have shapes (B, blk, d) and (B, blk, s), got {K.shape} and {V.shape}")
    B, blk, _ = K.shape
    r = np.asarray(uniforms, np.float64)
    if r.shape != (B, blk):
        raise ValueError(f"uniforms must have shape {(B, blk)}, got {r.shape}")
    w = np.ones((B, blk)) if weights is None else np.asarray(weights, np.float64)
    ok = np.ones((B, blk), bool) if valid is None else np.asarray(valid, bool)
    if w.shape != (B, blk) or ok.shape != (B, blk):
        raise ValueError(f"weights and valid must have shape {(B, blk)}")
    okf = ok.astype(np.float64)
    nv = np.maximum(okf.sum(-1), 1.0)
    kbar = np.einsum("bi,bid->bd", okf, K) / nv[:, None]
    Kc = (K - kbar[:, None, :]) * okf[..., None]
    if value_centering:
        wv = w * okf
        vbar = np.einsum("bi,bis->bs", wv, V) / np.maximum(wv.sum(-1), np.finfo(float).tiny)[:, None]
        Vp = w[..., None] * (V - vbar[:, None, :])
    else:
        Vp = w[..., None] * V
    Vp = Vp * okf[..., None]
    if gamma_norm not in GAMMA_NORMS:
        raise ValueError(f"gamma_norm must be one of {GAMMA_NORMS}, got {gamma_norm!r}")
    if a2_mode not in A2_MODES:
        raise ValueError(f"a2_mode must be one of {A2_MODES}, got {a2_mode!r}")
    if kernel == "keys":
        expo = np.minimum(temp * scale * np.einsum("bid,bjd->bij", Kc, Kc) - beta, EXP_CLIP)
        kk = np.exp(expo)
    else:
        if probes is None:
            raise ValueError("probes (B, L, d) are required for kernel='queries'")
        P = np.asarray(probes, np.float64)
        if P.ndim != 3 or P.shape[0] != B or P.shape[2] != K.shape[2] or P.shape[1] < 1:
            raise ValueError(f"probes must have shape ({B}, L>=1, {K.shape[2]}), got {P.shape}")
        sc = temp * scale * np.einsum("bld,bid->bli", P, K)
        sc = np.where(ok[:, None, :], sc, -np.inf)
        m = sc.max(-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        phi = np.exp(np.maximum(sc - m, -EXP_CLIP)) * okf[:, None, :]
        G = np.einsum("bli,blj->bij", phi, phi)
        gmax = np.max(np.einsum("bii->bi", G), axis=-1)
        kk = G / np.maximum(gmax, np.finfo(float).tiny)[:, None, None] * np.exp(min(-beta, EXP_CLIP))
    if a2_mode == "abs":
        kappa = kk * (np.einsum("bis,bjs->bij", Vp, Vp) + a2)
    else:
        U = (Vp / np.where(w == 0, 1.0, w)[..., None]) * okf[..., None]
        mu = np.einsum("bis,bis->b", U, U) / nv
        wo = w * okf
        kappa = kk * (np.einsum("bis,bjs->bij", Vp, Vp) + a2 * mu[:, None, None] * wo[:, :, None] * wo[:, None, :])
    if gamma_norm == "diag":
        dmax = np.max(np.where(ok, np.einsum("bii->bi", kappa), -np.inf), axis=-1)
        dmax = np.where(np.isfinite(dmax) & (dmax > 0), dmax, 1.0)  # D_b = 0: kappa is 0 on the block
        kappa = kappa / (2.0 * dmax)[:, None, None]
    elif gamma_norm == "token":
        dii = np.einsum("bii->bi", kappa)
        dii = np.where(ok & (dii > 0), dii, 1.0)  # kappa_ii = 0: the row is 0 (PSD); padding rows unused
        kappa = kappa / (2.0 * dii)[:, :, None]
    x = np.zeros((B, blk))
    seen = np.zeros(B, bool)
    for i in range(blk):
        g = np.einsum("bj,bj->b", kappa[:, i, :i], x[:, :i])
        p = np.clip(0.5 - gamma * g, 0.0, 1.0)
        xi = np.where(r[:, i] < p, 1.0, -1.0)
        xi = np.where(seen, xi, 1.0)  # first valid token: +1
        x[:, i] = np.where(ok[:, i], xi, 0.0)
        seen |= ok[:, i]
    return x.astype(np.int8)


def fixed_size_halving(signs, valid=None):
    """SPEC 4b step 5: keep exactly half of each block, given its walk signs.

    For a block with ``n_b`` valid tokens and ``h = ceil(n_b / 2)``: scan the valid tokens in
    order until one sign class first reaches ``h`` members, at position ``c``. Keep the
    valid tokens of the *other* class at positions ``<= c`` (weight x2) and every valid token
    after ``c`` (weight x1, exact). That is ``n_b - h = floor(n_b / 2)`` tokens, i.e. exactly
    ``blk/2`` for a full block. A block with a single valid token keeps it (weight x1).

    Returns ``(keep, doubled)``: two ``(B, blk)`` bool arrays (``doubled`` implies ``keep``).
    """
    x = np.asarray(signs)
    ok = (x != 0) if valid is None else np.asarray(valid, bool)
    B, blk = x.shape
    nv = ok.sum(-1)
    h = (nv + 1) // 2
    cp = np.cumsum((x == 1) & ok, axis=-1)
    cm = np.cumsum((x == -1) & ok, axis=-1)
    hit = ((cp == h[:, None]) | (cm == h[:, None])) & ok
    c = np.where(hit.any(-1), np.argmax(hit, axis=-1), blk)
    full = x[np.arange(B), np.minimum(c, blk - 1)]  # the class that filled first
    pos = np.arange(blk)[None, :]
    prefix = pos <= c[:, None]
    doubled = ok & prefix & (x != full[:, None])
    keep = doubled | (ok & ~prefix)
    single = nv == 1
    keep[single] = ok[single]
    doubled[single] = False
    return keep, doubled


def halving_sizes(n_mid: int, block: int, itrs: int, halving: str = "block") -> list[int]:
    """Middle sizes ``[n_0, n_1, …, n_itrs]`` after each round (deterministic, data-free).

    ``halving="block"``: round ``r`` splits ``n_r`` tokens into blocks of ``min(block, n_r)``; a
    block of ``b >= 2`` valid tokens keeps ``floor(b/2)``, a block of one keeps it.
    ``halving="global"``: ``floor(n_r / 2)``. ``n_r < 2`` stops halving.
    """
    if halving not in HALVINGS:
        raise ValueError(f"halving must be one of {HALVINGS}, got {halving!r}")
    sizes = [int(n_mid)]
    for _ in range(itrs):
        m = sizes[-1]
        if m < 2:
            sizes.append(m)
            continue
        if halving == "global":
            sizes.append(m // 2)
            continue
        blk = min(block, m)
        full, rem = divmod(m, blk)
        sizes.append(full * (blk // 2) + (rem // 2 if rem >= 2 else rem))
    return sizes


def blocked_balance(
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
    walk_signs: Callable | None = None,
    kernel: str = "keys",
    probes=None,
    protect=None,
    halving: str = "block",
    gamma_norm: str = "none",
    a2_mode: str = "abs",
):
    """The full SPEC 4b procedure on ``H`` heads: keys ``(H, n, d)``, values ``(H, n, s)``.

    Randomness: ``uniforms`` (a sequence of ``itrs`` arrays, round ``r`` of shape
    ``(H, nblocks_r, blk_r)``) or ``rng`` (then round ``r`` draws ``rng.random((H, nblocks_r, blk_r))``).
    A round with fewer than 2 middle tokens does nothing (no uniforms drawn). A middle shorter
    than ``block`` forms one block. ``walk_signs`` (default :func:`blocked_walk_signs`) lets a
    fast implementation with identical semantics plug in.

    ``protect`` (optional, ``(H, h)`` distinct middle-token indices per head): tokens kept exactly
    (log-weight 0) and left out of the halving, which then runs on the other ``n_mid - h`` middle
    tokens — the heavy-hitter hybrid of :class:`balancekv.methods.balance.Balance`.

    ``halving`` (SPEC 4b step 5): ``"block"`` (default) applies :func:`fixed_size_halving` to each
    block; ``"global"`` (the authors' released ``src/balanced_walk.py``) runs the walks per block
    as before but applies :func:`fixed_size_halving` once per head to the signs of the whole middle
    concatenated block after block (padding excluded): the scan stops where either class first
    reaches ``ceil(n_r / 2)`` of all ``n_r`` middle tokens; the other class up to there doubles its
    weight, every later token is kept exact; ``floor(n_r / 2)`` tokens survive.

    ``gamma_norm``, ``a2_mode``: walk options of :func:`blocked_walk_signs`; passed to ``walk_signs``
    only when not at their defaults (so a fast walk without them still plugs in for the defaults).

    Returns ``(indices, log_weights)``: ``(H, m)`` sorted kept token indices (equal ``m`` for every
    head, ``m = sink + window + h + halving_sizes(n_mid - h, block, itrs, halving)[-1]``) and their
    log-weights (0 for sink, window and protected tokens).
    """
    if halving not in HALVINGS:
        raise ValueError(f"halving must be one of {HALVINGS}, got {halving!r}")
    K = np.asarray(K, np.float64)
    V = np.asarray(V, np.float64)
    H, n, _ = K.shape
    if (rng is None) == (uniforms is None):
        raise ValueError("give exactly one of rng and uniforms")
    walk = blocked_walk_signs if walk_signs is None else walk_signs
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    extra, wopt = {}, {}
    if gamma_norm != "none":
        wopt["gamma_norm"] = gamma_norm
    if a2_mode != "abs":
        wopt["a2_mode"] = a2_mode
    if kernel == "queries":
        if probes is None:
            raise ValueError("probes (H, L, d) are required for kernel='queries'")
        P = np.asarray(probes, np.float64)
        if P.ndim != 3 or P.shape[0] != H or P.shape[2] != K.shape[2]:
            raise ValueError(f"probes must have shape ({H}, L, {K.shape[2]}), got {P.shape}")
    s0 = min(sink, n)
    w0 = min(window, n - s0)
    cur = np.broadcast_to(np.arange(s0, n - w0), (H, n - s0 - w0)).copy()
    prot = np.zeros((H, 0), np.int64)
    if protect is not None:
        prot = np.sort(np.asarray(protect, np.int64), axis=1)
        if (
            prot.ndim != 2
            or prot.shape[0] != H
            or np.any(prot < s0)
            or np.any(prot >= n - w0)
            or np.any(np.diff(prot, axis=1) == 0)
        ):
            raise ValueError(f"protect must hold ({H}, h) distinct middle indices in [{s0}, {n - w0})")
        rest = np.ones(cur.shape, bool)
        np.put_along_axis(rest, prot - s0, False, axis=1)
        cur = cur[rest].reshape(H, -1)
    logw = np.zeros(cur.shape)
    heads = np.arange(H)[:, None, None]
    for rnd in range(itrs):
        m = cur.shape[1]
        if m < 2:
            continue
        blk = min(block, m)
        nb = -(-m // blk)
        pad = nb * blk - m
        idx = np.concatenate([cur, np.zeros((H, pad), np.int64)], axis=1).reshape(H, nb, blk)
        ok = (np.arange(nb * blk) < m).reshape(1, nb, blk).repeat(H, 0)
        wts = np.concatenate([np.exp(logw), np.ones((H, pad))], axis=1).reshape(H, nb, blk)
        r = rng.random((H, nb, blk)) if uniforms is None else np.asarray(uniforms[rnd], np.float64)
        if r.shape != (H, nb, blk):
            raise ValueError(f"uniforms[{rnd}] must have shape {(H, nb, blk)}, got {r.shape}")
        Kb, Vb = K[heads, idx], V[heads, idx]
        if kernel == "queries":
            extra = {"kernel": "queries", "probes": np.repeat(P, nb, axis=0)}
        signs = walk(
            Kb.reshape(H * nb, blk, -1),
            Vb.reshape(H * nb, blk, -1),
            r.reshape(H * nb, blk),
            weights=wts.reshape(H * nb, blk),
            valid=ok.reshape(H * nb, blk),
            scale=scale,
            gamma=gamma,
            temp=temp,
            beta=beta,
            a2=a2,
            value_centering=value_centering,
            **extra,
            **wopt,
        )
        if halving == "global":
            keep, dbl = fixed_size_halving(np.asarray(signs).reshape(H, nb * blk), ok.reshape(H, nb * blk))
        else:
            keep, dbl = fixed_size_halving(np.asarray(signs).reshape(H * nb, blk), ok.reshape(H * nb, blk))
        keep, dbl = keep.reshape(H, nb * blk), dbl.reshape(H, nb * blk)
        lw = np.concatenate([logw, np.zeros((H, pad))], axis=1) + np.where(dbl, np.log(2.0), 0.0)
        flat = idx.reshape(H, nb * blk)
        new_m = int(keep[0].sum())
        cur = flat[keep].reshape(H, new_m)
        logw = lw[keep].reshape(H, new_m)
    head = np.broadcast_to(np.arange(s0), (H, s0))
    tail = np.broadcast_to(np.arange(n - w0, n), (H, w0))
    out_idx = np.concatenate([head, cur, prot, tail], axis=1)
    out_lw = np.concatenate([np.zeros((H, s0)), logw, np.zeros(prot.shape), np.zeros((H, w0))], axis=1)
    if prot.shape[1]:
        order = np.argsort(out_idx, axis=1, kind="stable")
        out_idx = np.take_along_axis(out_idx, order, axis=1)
        out_lw = np.take_along_axis(out_lw, order, axis=1)
    return out_idx, out_lw
