"""Decode attention over a compressed cache: the estimator of SPEC section 1, fast.

``decode_attention`` computes, for queries ``Q``, the weighted-token estimator of
:func:`balancekv.reference.softmax_attention.weighted_attention` (its definition)::

    z(q) = sum_i exp(a_i + num_logw_i) v_i / sum_i exp(a_i + den_logw_i),   a_i = scale <q, k_i>

with four things a decode kernel needs (SPEC section 10):

- the log-weights act as an additive logit bias (two of them for two-set methods);
- keys/values may be :class:`Packed` low-bit codes (keys packed along tokens,
  values along channels, SPEC section 6), dequantized inside the kernel;
- grouped-query attention: ``Q (..., Hq, mq, d)`` with ``Hq`` a multiple of the
  cache's ``Hkv`` (query head ``h`` reads KV head ``h // (Hq // Hkv)``);
- split-K (flash-decoding): the token axis is cut into splits that run as separate
  programs; every split returns max-shifted partial sums, combined on the host.

A cache made of several parts (exact sinks, a weighted middle, a quantized block,
decode-time tokens) is handled part by part: every part returns partial sums and
one combine gives the estimate (:func:`attend_parts`). Triton runs on CUDA tensors
(or on CPU under ``TRITON_INTERPRET=1``); the torch path computes the same partial
sums with dense tensor algebra and serves CPU tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from . import _triton as T
from .quantization import dequantize_packed

__all__ = ["Packed", "attend_parts", "combine_partials", "decode_attention"]


@dataclass
class Packed:
    """Low-bit codes with their group scales and zeros (SPEC section 6 layouts).

    ``axis="tokens"`` (keys, per-channel quantization): ``words (L, f, ceil(n*b/32))``,
    ``scale``/``zero`` ``(L, ceil(n/group), f)``; token ``t`` of channel ``c`` is bits
    ``[(t % (32/b)) b, ...)`` of word ``t // (32/b)``, its group ``t // group``.
    ``axis="channels"`` (values, per-token): ``words (L, n, ceil(f*b/32))``,
    ``scale``/``zero`` ``(L, n, ceil(f/group))``. ``L`` is the flattened leading dims.
    Dequantized value: ``code * scale + zero`` (float32 arithmetic). ``offset`` (keys only):
    the part starts at token ``offset`` of the packed store and spans ``n`` tokens. Buffers may
    hold spare capacity beyond the part (more words, or for values more rows): only ``n`` tokens are read.
    """

    words: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group: int
    axis: str
    n: int
    f: int
    offset: int = 0

    def dense(self, dtype=torch.float32) -> torch.Tensor:
        """The dequantized ``(L, n, f)`` tensor (torch path; :func:`.quantization.dequantize_packed`)."""
        start = self.offset if self.axis == "tokens" else 0
        return dequantize_packed(
            self.words, self.scale, self.zero, self.bits, self.group, self.axis, self.f, start, self.n, dtype
        )


def _compute_dtype(*xs) -> torch.dtype:
    return torch.float64 if any(isinstance(x, torch.Tensor) and x.dtype == torch.float64 for x in xs) else torch.float32


# ---------------------------------------------------------------------------- partial sums
def _partials_torch(Qr, K, V, nl, dl, kpos, qpos, scale, dt):
    """``(MN, MD, SN, SD)`` with a single split: shapes ``(L,1,R)``, ``(L,1,R)``, ``(L,1,R,s)``, ``(L,1,R)``."""
    Kd = K.dense(dt) if isinstance(K, Packed) else K.to(dt)
    Vd = V.dense(dt) if isinstance(V, Packed) else V.to(dt)
    a = scale * (Qr.to(dt) @ Kd.transpose(-1, -2))
    if kpos is not None:
        a = a.masked_fill(~(kpos[:, None, :] <= qpos[:, :, None]), float("-inf"))
    an = a + nl.to(dt)[:, None, :]
    ad = a + dl.to(dt)[:, None, :]
    mn, md = an.amax(-1), ad.amax(-1)
    zero = torch.zeros((), dtype=dt, device=a.device)
    mn_s = torch.where(torch.isfinite(mn), mn, zero)
    md_s = torch.where(torch.isfinite(md), md, zero)
    sn = torch.exp(an - mn_s[..., None]) @ Vd
    sd = torch.exp(ad - md_s[..., None]).sum(-1)
    return mn[:, None], md[:, None], sn[:, None], sd[:, None]


# ---------------------------------------------------------------------------- one weight set, several parts (CPU)
_SHIFTS: dict = {}


def _codes_int(words, bits: int):
    """The codes of int32 ``words (..., W)`` as int32 ``(..., W * 32/bits)`` (little end first): one shift and one
    mask, in one buffer."""
    per = 32 // bits
    shifts = _SHIFTS.get((bits, words.device))
    if shifts is None:  # (made once per width and device: a decode step unpacks two stores per layer)
        shifts = _SHIFTS[bits, words.device] = torch.arange(per, device=words.device, dtype=torch.int32) * bits
    c = torch.bitwise_right_shift(words[..., None], shifts).bitwise_and_((1 << bits) - 1)
    return c.reshape(*words.shape[:-1], words.shape[-1] * per)


def _packed_keys_scores(Qs, P: Packed, dt):
    """``Qs @ k^T`` ``(L, R, n)`` for packed keys (per channel along tokens): the covering groups are unpacked and
    scaled in one pass (the int32 codes times the float scales: the product is the float), multiplied by the
    queries, and the zeros added to the small logits (``q . (c s + z) = (q . c s) + q . z``: one value per group and
    row); ``None`` when the groups do not cover whole words (the general path). Equal to the product with
    :func:`.quantization.dequantize_packed`'s keys up to float rounding."""
    b, G, per = P.bits, P.group, 32 // P.bits
    start, n = P.offset, P.n
    g0, g1 = start // G, -(-(start + n) // G)
    t0, t1 = g0 * G, g1 * G
    if G % per or t1 // per > P.words.shape[-1] or g1 > P.scale.shape[-2]:
        return None
    L, f = P.words.shape[0], P.words.shape[1]
    c = _codes_int(P.words[..., t0 // per : t1 // per], b).view(L, f, g1 - g0, G)
    k = torch.mul(c, P.scale[:, g0:g1, :].transpose(-1, -2).to(dt)[..., None])
    a = torch.bmm(Qs, k.view(L, f, t1 - t0)).unflatten(-1, (g1 - g0, G))
    a.add_(torch.bmm(Qs, P.zero[:, g0:g1, :].transpose(-1, -2).to(dt))[..., None])
    return a.flatten(-2)[..., start - t0 : start - t0 + n]


def _packed_values_scaled(P: Packed, dt):
    """``(L, n, ng, G)`` codes times scales of a packed value store (per token, groups of channels), one pass."""
    n, G = P.n, P.group
    ng = P.scale.shape[-1]
    c = _codes_int(P.words[:, :n], P.bits)[..., : ng * G].unflatten(-1, (ng, G))
    return torch.mul(c, P.scale[:, :n].to(dt)[..., None])


def _packed_values_product(p, P: Packed, dt):
    """``p @ v`` ``(L, R, f)`` for packed values: the scaled codes (:func:`_packed_values_scaled`) multiplied by
    ``p``, the zeros added to the small product (``p @ (c s + z) = p @ (c s) + (p @ z)`` per group of channels)."""
    n, G = P.n, P.group
    ng = P.scale.shape[-1]
    v = _packed_values_scaled(P, dt)
    o = torch.bmm(p, v.flatten(-2)).unflatten(-1, (ng, G)).add_(torch.bmm(p, P.zero[:, :n].to(dt))[..., None])
    return o.flatten(-2)[..., : P.f]


def _same_weights(nl, dl) -> bool:
    if nl is dl:
        return True
    if nl.shape == dl.shape and nl.data_ptr() == dl.data_ptr() and nl.stride() == dl.stride() and nl.dtype == dl.dtype:
        return True  # views of one buffer (a quantized stream's log-weights)
    return nl.shape == dl.shape and torch.equal(nl, dl)


def _continues(P, N) -> bool:
    """``N`` is packed keys of the same store as the packed keys ``P``, starting where ``P`` ends."""
    return (
        isinstance(N, Packed)
        and N.axis == P.axis == "tokens"
        and N.offset == P.offset + P.n
        and (N.bits, N.group, N.f) == (P.bits, P.group, P.f)
        and all(
            a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            for a, b in ((N.words, P.words), (N.scale, P.scale), (N.zero, P.zero))
        )
    )


def _key_positions(kpos, device, klead, n: int, L: int):
    """A part's key positions as int64 ``(L, n)`` (``kpos`` ints ``(…, n)`` or ``(n,)``, broadcast over the heads);
    ``ValueError`` when the part has none (query positions need every part's)."""
    if kpos is None:
        raise ValueError("query_positions needs the key positions of every part")
    return torch.broadcast_to(torch.as_tensor(kpos, device=device).to(torch.int64), klead + (n,)).reshape(L, n)


def _single_set_parts(Qr, parts, klead, qpos, scale, dt):
    """The estimator over parts that all hold one weight set (numerator weights = denominator weights): one
    softmax over the logits of every part (``scale <q, k> + logw``, masked by position), then the probabilities
    times each part's values. Packed stores are dequantized per call into temporaries (nothing is kept).
    ``None`` when a packed part needs the general path."""
    L, R, _ = Qr.shape
    Qs = Qr.to(dt) * scale
    logits, values = [], []  # logits: one tensor per run of parts; values: (V, n) per part
    i = 0
    while i < len(parts):
        K = parts[i][0]
        j = i + 1
        if isinstance(K, Packed):
            while j < len(parts) and _continues(parts[j - 1][0], parts[j][0]):
                j += 1  # parts reading one packed key store back to back: one unpack and one product for all
            Kg = K if j == i + 1 else replace(K, n=sum(p[0].n for p in parts[i:j]))
            a = _packed_keys_scores(Qs, Kg, dt) if K.axis == "tokens" else None
            if a is None:
                return None
        else:
            a = torch.bmm(Qs, _flatten_lead(K, len(klead)).to(dt).transpose(-1, -2))
        at = 0
        for _K, V, nl, _dl, kpos in parts[i:j]:
            n = nl.shape[-1]
            ap = a[..., at : at + n]
            ap += nl.reshape(L, 1, n).to(dt)
            if qpos is not None:
                kp = _key_positions(kpos, Qr.device, klead, n, L)
                ap.masked_fill_(~(kp[:, None, :] <= qpos[:, :, None]), float("-inf"))
            values.append((V, n))
            at += n
        logits.append(a)
        i = j
    p = torch.softmax(torch.cat(logits, -1) if len(logits) > 1 else logits[0], dim=-1)
    out, at = None, 0
    for V, n in values:
        pa = p[..., at : at + n]
        if isinstance(V, Packed):
            o = _packed_values_product(pa, V, dt)
            out = o if out is None else out.add_(o)
        else:
            Vd = _flatten_lead(V, len(klead)).to(dt)
            out = torch.bmm(pa, Vd) if out is None else out.baddbmm_(pa, Vd)
        at += n
    if not bool(torch.isfinite(out).all()):
        raise FloatingPointError("a query has no slot in the denominator: the estimate is undefined")
    return out


def _single_set_sdpa(Qr, K, V, bias, kpos, qpos, scale, dt):
    """Attention with an additive logit bias ``(L, n)`` through SDPA; ``FloatingPointError`` if a
    query sees no slot (the estimate would be 0/0)."""
    mask = bias.to(dt)[:, None, :]
    if kpos is not None:
        mask = mask.masked_fill(~(kpos[:, None, :] <= qpos[:, :, None]), float("-inf"))
    # SDPA returns 0 for a query whose every slot is masked (-inf): the estimate 0/0 must not pass as 0
    if not bool((mask > float("-inf")).any(-1).all()):
        raise FloatingPointError("a query has no slot in the denominator: the estimate is undefined")
    out = F.scaled_dot_product_attention(Qr.to(dt), K.to(dt), V.to(dt), attn_mask=mask, scale=scale)
    if not bool(torch.isfinite(out).all()):
        raise FloatingPointError("a query has no slot in the denominator: the estimate is undefined")
    return out


def _split_plan(n: int, L: int, block_n: int, num_splits: int | None, device) -> tuple[int, int]:
    tiles = max(1, math.ceil(n / block_n))
    if num_splits is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            num_splits = max(1, min(tiles, math.ceil(4 * sms / max(L, 1))))
        else:  # interpreter: every program costs milliseconds; keep grids tiny
            num_splits = min(tiles, 2)
    num_splits = max(1, min(int(num_splits), tiles))
    per = math.ceil(tiles / num_splits) * block_n
    return math.ceil(n / per), per


def _packed_args(P: Packed, dense_strides_axis: str):
    """(pointer, scale, zero, strides, scale strides, bits, group) for the kernel."""
    w = P.words.contiguous()
    sc = P.scale.contiguous()
    ze = P.zero.contiguous()
    if P.axis != dense_strides_axis:
        raise ValueError(
            f"packed {'keys' if dense_strides_axis == 'tokens' else 'values'} must be packed along "
            f"{dense_strides_axis}, got axis={P.axis!r}"
        )
    if P.axis == "tokens":  # words (L, f, W): token -> word axis, channel -> middle axis
        strides = (w.stride(0), w.stride(2), w.stride(1))
        sstrides = (sc.stride(0), sc.stride(1), sc.stride(2))
    else:  # words (L, n, W): token -> middle axis, channel -> word axis
        strides = (w.stride(0), w.stride(1), w.stride(2))
        sstrides = (sc.stride(0), sc.stride(1), sc.stride(2))
    return w, sc, ze, strides, sstrides, P.bits, P.group


def _partials_triton(Qr, K, V, nl, dl, kpos, qpos, scale, dt, num_splits=None, block_n=None):
    ker = T.kernels("kernels_attention")
    L, R, d = Qr.shape
    n = K.n if isinstance(K, Packed) else K.shape[-2]
    s = V.f if isinstance(V, Packed) else V.shape[-1]
    dev = Qr.device
    if block_n is None:
        block_n = 64 if dev.type == "cuda" else 16
    low = 0
    if dev.type == "cuda" and Qr.dtype in (torch.float16, torch.bfloat16):
        low = 1 if Qr.dtype == torch.float16 else 2
    S, per = _split_plan(n, L, block_n, num_splits, dev)
    MN = torch.empty((L, S, R), dtype=dt, device=dev)
    MD = torch.empty_like(MN)
    SD = torch.empty_like(MN)
    SN = torch.empty((L, S, R, s), dtype=dt, device=dev)
    dummy = torch.zeros(1, dtype=dt, device=dev)
    koff = 0
    if isinstance(K, Packed):
        Kp, KS, KZ, ks, kss, KB, KG = _packed_args(K, "tokens")
        koff = K.offset
    else:
        Kp, KS, KZ, ks, kss, KB, KG = K, dummy, dummy, (K.stride(0), K.stride(1), K.stride(2)), (0, 0, 0), 0, 1
    if isinstance(V, Packed):
        Vp, VS, VZ, vs, vss, VB, VG = _packed_args(V, "channels")
    else:
        Vp, VS, VZ, vs, vss, VB, VG = V, dummy, dummy, (V.stride(0), V.stride(1), V.stride(2)), (0, 0, 0), 0, 1
    has_pos = kpos is not None
    kp = kpos.contiguous() if has_pos else torch.zeros(1, dtype=torch.int64, device=dev)
    qp = qpos.contiguous() if has_pos else kp
    ker.decode_split_kernel[(L, S)](
        Qr,
        Kp,
        KS,
        KZ,
        Vp,
        VS,
        VZ,
        nl.to(dt).contiguous(),
        dl.to(dt).contiguous(),
        kp,
        qp,
        MN,
        MD,
        SN,
        SD,
        n,
        R,
        d,
        s,
        per,
        S,
        float(scale),
        koff,
        Qr.stride(0),
        Qr.stride(1),
        Qr.stride(2),
        *ks,
        *kss,
        *vs,
        *vss,
        KB=KB,
        KG=KG,
        VB=VB,
        VG=VG,
        HAS_POS=has_pos,
        LOW_PREC_DOT=low,
        F64=dt == torch.float64,
        BLOCK_R=max(16, T.next_pow2(R)),
        BLOCK_N=block_n,
        BLOCK_D=max(16, T.next_pow2(d)),
        BLOCK_S=max(16, T.next_pow2(s)),
    )
    return MN, MD, SN, SD


def combine_partials(parts) -> torch.Tensor:
    """The estimate ``(L, R, s)`` from partial sums of every part and split (max-shift merge)."""
    MN = torch.cat([p[0] for p in parts], dim=1)
    MD = torch.cat([p[1] for p in parts], dim=1)
    SN = torch.cat([p[2] for p in parts], dim=1)
    SD = torch.cat([p[3] for p in parts], dim=1)
    mn, md = MN.amax(1), MD.amax(1)
    zero = torch.zeros((), dtype=MN.dtype, device=MN.device)
    mn_s = torch.where(torch.isfinite(mn), mn, zero)
    md_s = torch.where(torch.isfinite(md), md, zero)
    sn = (torch.exp(MN - mn_s[:, None])[..., None] * SN).sum(1)
    sd = (torch.exp(MD - md_s[:, None]) * SD).sum(1)
    if bool((~torch.isfinite(md)).any()) or bool((sd <= 0).any()):
        raise FloatingPointError("a query has no slot in the denominator: the estimate is undefined")
    rel = torch.where(torch.isfinite(mn), mn - md, torch.full_like(mn, float("-inf")))
    out = torch.exp(rel)[..., None] * sn / sd[..., None]
    if not bool(torch.isfinite(out).all()):
        raise FloatingPointError("the estimate overflowed (numerator weights far exceed denominator weights)")
    return out


# ---------------------------------------------------------------------------- public entry points
def _flatten_lead(x, lead_len):
    return x.reshape((-1,) + tuple(x.shape[lead_len:]))


def attend_parts(
    Q,
    parts,
    scale=None,
    *,
    query_positions=None,
    backend: str = "auto",
    num_splits: int | None = None,
    block_n: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The estimator over a cache made of ``parts``; each part is ``(K, V, num_logw, den_logw, key_positions)``.

    ``K`` is a tensor ``(..., Hkv, n, d)`` or a :class:`Packed` (flattened leading dims ``L``),
    ``V`` likewise, log-weights ``(..., Hkv, n)``, ``key_positions`` ``None`` or ints ``(..., Hkv, n)``
    (or ``(n,)``). ``Q (..., Hq, mq, d)``: leading dims equal to the cache's except ``Hq``, a multiple
    of ``Hkv`` (GQA). ``query_positions`` ``(mq,)`` or ``(..., Hq, mq)`` masks slots of later tokens
    (needs every part's key positions). Returns ``(..., Hq, mq, s)`` in the compute dtype
    (float64 if any input is float64, else float32) or in ``dtype`` when given (generation passes
    the model's dtype, as its own attention would compute).

    One dense single-set part (``num_logw == den_logw``: ordinary attention with an additive
    logit bias) runs torch's ``scaled_dot_product_attention`` with a float mask; anything else
    computes max-shifted partial sums per part (two log-sum-exps for two-set caches, each with
    its own maximum) and combines them.
    """
    if not isinstance(Q, torch.Tensor):
        raise TypeError(f"Q must be a torch tensor, got {type(Q).__name__}")
    if Q.ndim < 2:
        raise ValueError(f"Q must have shape (..., mq, d), got {tuple(Q.shape)}")
    if not parts:
        raise ValueError("parts must hold at least one (K, V, num_logw, den_logw, key_positions) part")
    qlead, (mq, d) = tuple(Q.shape[:-2]), tuple(Q.shape[-2:])
    nl0 = parts[0][2]
    klead = tuple(nl0.shape[:-1])
    if len(klead) != len(qlead) or klead[:-1] != qlead[:-1] or (klead and qlead[-1] % klead[-1]):
        raise ValueError(
            f"Q's leading dims {qlead} must equal the cache's {klead}, except the head count, "
            "which must be a multiple of the cache's (grouped-query attention)"
        )
    G = qlead[-1] // klead[-1] if klead else 1
    L = int(math.prod(klead)) if klead else 1
    R = G * mq
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dt = dtype or _compute_dtype(Q, *[x for p in parts for x in p[:4]])
    Qr = Q.reshape(L, R, d)
    qpos = None
    if query_positions is not None:
        qp = torch.as_tensor(query_positions, device=Q.device).to(torch.int64)
        qpos = torch.broadcast_to(qp, qlead + (mq,)).reshape(L, R).contiguous()
    if len(parts) == 1 and not T.use_triton(backend, Qr):
        K, V, nl, dl, kpos = parts[0]
        if not isinstance(K, Packed) and not isinstance(V, Packed) and (nl is dl or torch.equal(nl, dl)):
            kp = None if qpos is None else _key_positions(kpos, Q.device, klead, nl.shape[-1], L)
            out = _single_set_sdpa(
                Qr, _flatten_lead(K, len(klead)), _flatten_lead(V, len(klead)), nl.reshape(L, -1), kp, qpos, scale, dt
            )
            return out.reshape(qlead + (mq, out.shape[-1]))
    if (
        not T.use_triton(backend, Qr)
        and dt in (torch.float32, torch.float64)
        and all(_same_weights(p[2], p[3]) for p in parts)
        and all(p[0].axis == "tokens" for p in parts if isinstance(p[0], Packed))
        and all(p[1].axis == "channels" for p in parts if isinstance(p[1], Packed))
        and all(p[0].shape[-1] == d for p in parts if not isinstance(p[0], Packed))
    ):
        out = _single_set_parts(Qr, parts, klead, qpos, scale, dt)
        if out is not None:
            return out.reshape(qlead + (mq, out.shape[-1]))
    outs = []
    for K, V, nl, dl, kpos in parts:
        n = nl.shape[-1]
        nlr = nl.reshape(L, n)
        dlr = dl.reshape(L, n)
        Kr = K if isinstance(K, Packed) else _flatten_lead(K, len(klead))
        Vr = V if isinstance(V, Packed) else _flatten_lead(V, len(klead))
        if not isinstance(Kr, Packed) and Kr.shape[-1] != d:
            raise ValueError(f"Q has d={d} but the cache's keys have d={Kr.shape[-1]}")
        kp = None if qpos is None else _key_positions(kpos, Q.device, klead, n, L)
        tensors = [t for t in (Qr, Kr, Vr) if isinstance(t, torch.Tensor)]
        if T.use_triton(backend, *tensors):
            outs.append(_partials_triton(Qr, Kr, Vr, nlr, dlr, kp, qpos, scale, dt, num_splits, block_n))
        else:
            outs.append(_partials_torch(Qr, Kr, Vr, nlr, dlr, kp, qpos, scale, dt))
    out = combine_partials(outs)
    return out.reshape(qlead + (mq, out.shape[-1]))


def decode_attention(
    Q,
    K,
    V,
    num_logw,
    den_logw,
    scale=None,
    *,
    key_positions=None,
    query_positions=None,
    backend: str = "auto",
    num_splits: int | None = None,
    block_n: int | None = None,
):
    """``z(q)`` for ``Q (..., Hq, mq, d)`` over one weighted token set (dense or :class:`Packed`).

    The Triton split-K kernel on CUDA tensors (or with ``backend="triton"`` under the
    interpreter), the torch path otherwise; both match the reference
    ``weighted_attention`` (per query head, after expanding GQA groups).
    """
    return attend_parts(
        Q,
        [(K, V, num_logw, den_logw, key_positions)],
        scale,
        query_positions=query_positions,
        backend=backend,
        num_splits=num_splits,
        block_n=block_n,
    )
