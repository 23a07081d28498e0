"""Real English text that ships with the environment: no downloads.

Two texts of different character, so that settings can be chosen on one and
results reported on the other:

- ``"numpy-license"`` (the *tuning* text): NumPy's ``LICENSE.txt`` as installed
  in its wheel's ``.dist-info`` (NumPy's BSD licence followed by the licences
  of the libraries it bundles), about 47 kB, roughly 11k SmolLM2 tokens;
- ``"python-docs"`` (the *report* text): the Python language reference topics
  that CPython ships for ``help()`` (``pydoc_data.topics``), about 750 kB of
  documentation prose, far more than any capture here needs.

Both come with packages the project cannot run without (NumPy is a hard
dependency; ``pydoc_data`` is part of CPython's standard library), but a
stripped installation may lack them: each function then raises
:class:`FileNotFoundError` naming what is missing.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

TEXTS = ("numpy-license", "python-docs")
#: The text experiments report on by default; :data:`TUNING_TEXT` is the one defaults were chosen on.
REPORT_TEXT = "python-docs"
TUNING_TEXT = "numpy-license"


@lru_cache(maxsize=None)
def numpy_license() -> str:
    """NumPy's installed ``LICENSE.txt`` (with the licences of its bundled libraries)."""
    from importlib import metadata  # noqa: PLC0415

    try:
        dist = metadata.distribution("numpy")
    except metadata.PackageNotFoundError as err:  # pragma: no cover - numpy is a hard dependency
        raise FileNotFoundError(
            "text 'numpy-license' needs numpy's installed metadata; numpy is not installed"
        ) from err
    paths = [f.locate() for f in (dist.files or []) if f.name.upper().startswith(("LICENSE", "COPYING"))]
    paths = sorted((p for p in paths if p.exists()), key=lambda p: p.stat().st_size, reverse=True)
    if paths and paths[0].stat().st_size > 10_000:
        return paths[0].read_text(encoding="utf-8", errors="replace")
    raise FileNotFoundError(
        f"text 'numpy-license': no LICENSE file of at least 10 kB in numpy's "
        f"installed metadata ({dist.locate_file('')}); reinstall numpy from its wheel"
    )


@lru_cache(maxsize=None)
def python_docs() -> str:
    """CPython's ``help()`` topics (``pydoc_data.topics``): the language reference as plain text.

    Topics are joined in sorted order of their names, separated by blank lines.
    """
    try:
        topics = importlib.import_module("pydoc_data.topics").topics
    except ImportError as err:
        raise FileNotFoundError(
            "text 'python-docs' needs the standard library's pydoc_data package, "
            "which this Python installation lacks (some distributions strip it)"
        ) from err
    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def get_text(name: str) -> str:
    """The text called ``name`` (one of :data:`TEXTS`)."""
    if not isinstance(name, str):
        raise TypeError(f"text must be a string naming one of {TEXTS}, got {type(name).__name__}")
    if name == "numpy-license":
        return numpy_license()
    if name == "python-docs":
        return python_docs()
    raise ValueError(f"unknown text {name!r}; available: {list(TEXTS)}")
