"""One long-generation run with method options (the tuning of issue 14's capped policies).

Usage (CPU)::

    .venv/bin/python benchmarks/long_generation_tune.py TEXT CAP NAME METHOD [option=value ...]
    .venv/bin/python benchmarks/long_generation_tune.py numpy-license 0 full full        # the full cache, once
    .venv/bin/python benchmarks/long_generation_tune.py numpy-license 512 w15h20 balance cap_window=0.15 cap_heavy=0.2

The protocol of ``long_generation.py`` (64-token prompt, 2048 teacher-forced tokens, 16 per forward, one
torch thread) on ``TEXT`` (choose on the tuning text ``numpy-license``; report with ``long_generation.py``
on ``python-docs``), with ``hf.CompressedCache(model, METHOD, cap=CAP, **options)``. Each run writes
``/tmp/lg_tune_TEXT/NAME.json`` (``$LG_TUNE_WORK/NAME.json`` when that is set); once ``full`` is there,
a run prints ΔNLL against it (all tokens and the last 512), the end-of-stream attention error of layers
1/15/28 and the cache's bytes.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import long_generation as lg

from balancekv import hf


def parse(value: str):
    if value in ("true", "false"):
        return value == "true"
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return value


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print(__doc__)
        return 2
    text, cap, name, method = argv[0], int(argv[1]), argv[2], argv[3]
    opts = dict((k, parse(v)) for k, v in (kv.split("=", 1) for kv in argv[4:]))
    args = types.SimpleNamespace(prompt=64, cont=2048, queries=64, layers=[1, 15, 28], text=text, threads=1, chunk=16)
    work = Path(os.environ.get("LG_TUNE_WORK") or f"/tmp/lg_tune_{text}")
    work.mkdir(parents=True, exist_ok=True)
    lg.capture(args, work)
    hf.CompressedCache = functools.partial(hf.CompressedCache, **opts)
    full_run = method == "full"
    row = lg.one_run(args, None if full_run else method, None if full_run else cap, work)
    row["opts"] = opts
    (work / f"{name}.json").write_text(json.dumps(row))
    fullp = work / "full.json"
    if fullp.exists() and not full_run:
        full, lp = np.array(json.loads(fullp.read_text())["logp"]), np.array(row["logp"])
        d = full - lp
        print(
            f"{name} ({method}, cap {cap}, {opts}): dNLL {d.mean():+.4f}, last 512 {d[-512:].mean():+.4f}, "
            f"attention error {row.get('attn_error')}, nbytes {row['nbytes_end']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
