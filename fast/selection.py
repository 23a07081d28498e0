"""H2O and SnapKV attention column-sum scores (SPEC section 7), torch and two-pass Triton.

Same names and semantics as :mod:`balancekv.reference.selection` (the definition):
``h2o_scores`` sums, per KV head, the causal softmax rows of every query of every
query head in its GQA group; ``snapkv_scores`` does the same over the last ``window``
queries and pools the prefix columns. No ``L x L`` matrix is materialised: the torch
path works on blocks of query rows; the Triton path is two launches (row
log-sum-exp, then column sums normalised by it; see :mod:`.kernels_scores`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import _triton as T

__all__ = ["h2o_scores", "select_top", "snapkv_scores"]

POOLS = ("max", "avg")


def _prep(Q, K, group):
    Qt = Q if isinstance(Q, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(Q))
    Kt = K if isinstance(K, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(K))
    if Qt.ndim < 3 or Kt.ndim < 3:
        raise ValueError(
            f"Q and K must have shape (..., heads, tokens, d), got {tuple(Qt.shape)} and {tuple(Kt.shape)}"
        )
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")
    if Qt.shape[:-3] != Kt.shape[:-3] or Qt.shape[-3] != Kt.shape[-3] * group:
        raise ValueError(f"Q heads {tuple(Qt.shape[:-2])} must be K heads {tuple(Kt.shape[:-2])} times group={group}")
    if Qt.shape[-1] != Kt.shape[-1]:
        raise ValueError(f"Q and K must have the same d, got {Qt.shape[-1]} and {Kt.shape[-1]}")
    if Qt.shape[-2] > Kt.shape[-2] or Qt.shape[-2] == 0:
        raise ValueError(f"Q must hold between 1 and L={Kt.shape[-2]} queries, got {Qt.shape[-2]}")
    dt = torch.float64 if torch.float64 in (Qt.dtype, Kt.dtype) else torch.float32
    return Qt, Kt, dt


def _colsum_torch(Qf, Kf, scale, group, dt, block_elems=1 << 22):
    """``(Hkv, L)`` column sums; ``Qf (Hq, Lq, d)``, ``Kf (Hkv, L, d)``.

    Query rows in blocks sized so that one block's logits hold about ``block_elems`` numbers
    (at least 16 rows): memory ``O(block * L)``, never an ``Lq x L`` matrix. A block of rows
    only reads the keys its last row sees (causal), and each row is whole, so its softmax is
    exact without a second pass.
    """
    Hkv, L, d = Kf.shape
    Lq = Qf.shape[1]
    Qg = Qf.to(dt).reshape(Hkv, group, Lq, d)
    Kd = Kf.to(dt)
    out = torch.zeros((Hkv, L), dtype=dt, device=Kf.device)
    block_m = max(16, block_elems // max(1, Hkv * group * L))
    for m0 in range(0, Lq, block_m):
        m1 = min(Lq, m0 + block_m)
        kmax = L - Lq + m1  # keys 0 .. kmax - 1 are seen by some row of the block
        r = m1 - m0
        a = torch.matmul(Qg[:, :, m0:m1].reshape(Hkv, group * r, d), Kd[:, :kmax].transpose(-1, -2))
        a = a.view(Hkv, group, r, kmax).mul_(scale)
        qpos = L - Lq + torch.arange(m0, m1, device=Kf.device)
        dead = torch.arange(kmax, device=Kf.device)[None, :] > qpos[:, None]
        a.masked_fill_(dead, float("-inf"))
        p = torch.softmax(a, dim=-1)  # max-shifted; each row has >= 1 live key
        out[:, :kmax] += p.sum(dim=(1, 2))
    return out


def _colsum_triton(Qf, Kf, scale, group, dt):
    ker = T.kernels("kernels_scores")
    Hkv, L, d = Kf.shape
    Hq, Lq, _ = Qf.shape
    Qc, Kc = Qf.to(dt).contiguous(), Kf.to(dt).contiguous()
    lse = torch.empty((Hq, Lq), dtype=dt, device=Kf.device)
    out = torch.empty((Hkv, L), dtype=dt, device=Kf.device)
    bm, bn = (64, 64) if Kf.is_cuda else (16, 16)
    bd = max(16, T.next_pow2(d))
    f64 = dt == torch.float64
    ker.row_lse_kernel[(Hq, -(-Lq // bm))](
        Qc,
        Kc,
        lse,
        Lq,
        L,
        d,
        float(scale),
        group,
        Qc.stride(0),
        Qc.stride(1),
        Kc.stride(0),
        Kc.stride(1),
        F64=f64,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
    )
    ker.col_sum_kernel[(Hkv, -(-L // bn))](
        Qc,
        Kc,
        lse,
        out,
        Lq,
        L,
        d,
        float(scale),
        group,
        Qc.stride(0),
        Qc.stride(1),
        Kc.stride(0),
        Kc.stride(1),
        F64=f64,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
    )
    return out


def _colsums(Q, K, scale, group, backend):
    Qt, Kt, dt = _prep(Q, K, group)
    lead = tuple(Kt.shape[:-3])
    Hkv, L, d = Kt.shape[-3:]
    Lq = Qt.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    nb = int(math.prod(lead)) if lead else 1
    Qf = Qt.reshape(nb * Hkv * group, Lq, d)
    Kf = Kt.reshape(nb * Hkv, L, d)
    fn = _colsum_triton if T.use_triton(backend, Qt, Kt) else _colsum_torch
    return fn(Qf, Kf, scale, group, dt).reshape(lead + (Hkv, L))


def h2o_scores(Q, K, scale=None, group: int = 1, *, backend: str = "auto"):
    """H2O scores ``(..., Hkv, L)`` (NumPy for NumPy ``K``, else torch); see the reference."""
    out = _colsums(Q, K, scale, group, backend)
    return out if isinstance(K, torch.Tensor) else out.cpu().numpy()


def snapkv_scores(
    Q, K, scale=None, window: int = 32, kernel: int = 7, pool: str = "max", group: int = 1, *, backend: str = "auto"
):
    """SnapKV scores ``(..., Hkv, L)`` (window positions score ``+inf``); see the reference.

    NumPy ``K`` gives a NumPy result, a tensor a tensor.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    for name, v in (("window", window), ("kernel", kernel)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd for same-length pooling, got {kernel}")
    Qt, Kt, _ = _prep(Q, K, group)
    L = Kt.shape[-2]
    w = min(int(window), Qt.shape[-2])
    col = _colsums(Qt[..., -w:, :], Kt, scale, group, backend)
    out = torch.full_like(col, float("inf"))
    if L > w:
        pre = col[..., : L - w]
        flat = pre.reshape(-1, 1, L - w)
        p = kernel // 2
        if pool == "max":
            pooled = F.max_pool1d(F.pad(flat, (p, p), value=float("-inf")), kernel, stride=1)
        else:
            pooled = F.avg_pool1d(F.pad(flat, (p, p), value=0.0), kernel, stride=1)
        out[..., : L - w] = pooled.reshape(pre.shape)
    return out if isinstance(K, torch.Tensor) else out.cpu().numpy()


def select_top(scores, budget: int, recent: int):
    """Sorted indices ``(..., budget)`` int64: the last ``recent`` positions plus the top ``budget - recent``
    earlier ones, ties broken towards the earlier position (a stable sort), exactly as the reference
    :func:`balancekv.reference.selection.select_top`. Torch in, torch out (NumPy: the reference)."""
    if not isinstance(scores, torch.Tensor):
        from balancekv.reference.selection import select_top as ref  # noqa: PLC0415

        return ref(scores, budget, recent)
    L = scores.shape[-1]
    for name, v in (("budget", budget), ("recent", recent)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 0 <= recent <= budget <= L:
        raise ValueError(f"need 0 <= recent <= budget <= L={L}, got recent={recent}, budget={budget}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")
    heavy = int(budget) - int(recent)
    prefix = scores[..., : L - recent]
    order = torch.sort(-prefix, dim=-1, stable=True).indices[..., :heavy]
    rec = torch.arange(L - recent, L, device=scores.device).expand(tuple(scores.shape[:-1]) + (int(recent),))
    return torch.sort(torch.cat([order, rec], dim=-1), dim=-1).values.to(torch.int64)
