"""Where the experiment commands write, and how: run folders and deterministic result files.

``balancekv reproduce …`` and ``balancekv eval`` write into a fresh folder
``runs/<command>-<UTC time>/`` unless ``--out`` names one (``--out
benchmarks/results`` updates the committed results). Result files are written so
that a re-run with the same arguments and seeds is byte-identical: JSON with
sorted keys and floats rounded to :data:`DIGITS` significant digits (float noise
in the last bits does not show), no wall times, no dates, and the command line
recorded without the options that only say where to write or whether to show
progress.
"""

from __future__ import annotations

import json
import math
import shlex
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

#: Significant digits kept for floats in result JSON.
DIGITS = 10
#: Default parent folder of run folders (relative to the working directory; ignored by git).
RUNS = Path("runs")
#: Options that do not change what a run computes; left out of the recorded command line.
_FLAGS = {"--no-progress"}
_VALUED = {"--out"}


def run_dir(command: str, out: str | Path | None = None, now: datetime | None = None) -> Path:
    """``out`` if given, else a new ``runs/<command>-<YYYYmmddTHHMMSSZ>[-k]/``; created, returned."""
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    base = RUNS / f"{command}-{stamp}"
    path, k = base, 1
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            k += 1
            path = base.with_name(f"{base.name}-{k}")


def recorded_argv(argv) -> list[str]:
    """``argv`` without ``--out DIR`` and ``--no-progress`` (what result files record)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in _FLAGS:
            continue
        if a in _VALUED:
            skip = True
            continue
        if any(a.startswith(v + "=") for v in _VALUED):
            continue
        kept.append(a)
    return kept


def command_line(argv, prog: str = "balancekv") -> str:
    """The command as recorded in result files: ``prog`` and :func:`recorded_argv`, shell-quoted."""
    return shlex.join([prog, *recorded_argv(argv)])


def normalize(obj):
    """JSON-ready copy of ``obj``: NumPy scalars and arrays to Python, finite floats to :data:`DIGITS`
    significant digits, tuples to lists, dict keys to strings."""
    if isinstance(obj, dict):
        return {str(k): normalize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [normalize(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return normalize(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return float(f"{x:.{DIGITS}g}") if math.isfinite(x) else x
    return obj


def dumps(obj) -> str:
    """Deterministic JSON text of ``obj`` (see :func:`normalize`), sorted keys, one trailing newline."""
    return json.dumps(normalize(obj), indent=1, sort_keys=True, default=str) + "\n"


def write_json(path: str | Path, obj) -> Path:
    path = Path(path)
    path.write_text(dumps(obj))
    return path
