"""Scoring and greedy decoding shared by ``balancekv eval`` and the kvpress worker.

Only torch here (no balancekv import): ``benchmarks/kvpress_eval.py`` loads this
file by path in kvpress's own virtual environment, so both sides score with the
very same code.
"""

from __future__ import annotations

import torch


def nll(logits, cont) -> float:
    """Mean negative log-likelihood of continuation tokens 2..T given ``logits`` of the T fed tokens
    (token 1 is predicted by the prefill, the same for every cache)."""
    lp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
    return float(-lp.gather(-1, cont[0, 1:, None]).mean())


def greedy(model, first_logits, cache, steps: int, pos0, position_ids: bool, cache_arg: str = "cache") -> list[int]:
    """Greedy decoding from ``first_logits`` for ``steps`` tokens (plain forward loop through ``cache``).

    ``cache_arg``: the forward's name for the cache, ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (older versions, as in kvpress's environment)."""
    out, nxt = [], int(first_logits[0, -1].argmax())
    for i in range(steps):
        out.append(nxt)
        kw = {"position_ids": torch.tensor([[pos0 + i]])} if position_ids else {}
        kw[cache_arg] = cache
        logits = model(torch.tensor([[nxt]]), use_cache=True, **kw).logits
        nxt = int(logits[0, -1].argmax())
    return out
