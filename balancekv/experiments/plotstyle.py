"""One look for every experiment plot: a fixed colour per method, a line style per source.

Colour says *which method* (the same in every figure), line style says *whose
implementation*: ours solid with round markers, kvpress dashed with square
markers. A kvpress press that implements one of our methods shares its colour
(``SnapKVPress`` and ``snapkv``). Figures are sized for a page (10 in wide,
150 dpi, fonts of 10 pt and more).
"""

from __future__ import annotations

from fractions import Fraction

#: Fixed colour per method; kvpress presses map onto ours where they implement the same method.
COLOURS = {
    "full": "#000000",
    "exact": "#000000",
    "balance": "#d62728",
    "balance+quant": "#ff9896",
    "balance+quant:bits=8": "#67000d",
    "balance-stream": "#e377c2",
    "uniform-halving": "#17becf",
    "uniform": "#7f7f7f",
    "subgen": "#bcbd22",
    "streaming": "#2ca02c",
    "h2o": "#9467bd",
    "snapkv": "#1f77b4",
    "quant": "#8c564b",
    "minikv": "#ff7f0e",
    "kvpress:PyramidKVPress": "#393b79",
    "kvpress:KnormPress": "#637939",
    "kvpress:ExpectedAttentionPress": "#e7ba52",
    "kvpress:TOVAPress": "#7b4173",
}
#: kvpress presses that implement one of our methods (same colour).
KVPRESS_SAME = {"kvpress:SnapKVPress": "snapkv", "kvpress:StreamingLLMPress": "streaming"}
#: Colours for methods not listed above, in order of first use.
_SPARE = ["#aec7e8", "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#ffbb78", "#5254a3", "#b5cf6b"]
_assigned: dict[str, str] = {}

FIGSIZE_WIDTH = 10.0
DPI = 150
RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "figure.titlesize": 12,
    "svg.hashsalt": "balancekv",
}


def is_kvpress(method: str) -> bool:
    return method.startswith("kvpress:")


def colour(method: str) -> str:
    method = KVPRESS_SAME.get(method, method)
    if method in COLOURS:
        return COLOURS[method]
    if method not in _assigned:
        _assigned[method] = _SPARE[len(_assigned) % len(_SPARE)]
    return _assigned[method]


def style(method: str) -> dict:
    """``plot`` keywords: the method's colour, solid/round for ours, dashed/square for kvpress."""
    if is_kvpress(method):
        return {"color": colour(method), "linestyle": "--", "marker": "s", "markersize": 5}
    return {"color": colour(method), "linestyle": "-", "marker": "o", "markersize": 5}


def label(method: str) -> str:
    """Legend label: ``kvpress SnapKV`` for ``kvpress:SnapKVPress``, the method name otherwise."""
    if is_kvpress(method):
        name = method.split(":", 1)[1]
        return "kvpress " + (name[: -len("Press")] if name.endswith("Press") else name)
    return method


def pyplot():
    """matplotlib's pyplot on the Agg backend, with :data:`RC` applied."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    plt.rcParams.update(RC)
    return plt


def source_handles():
    """Legend handles that explain the line styles (ours solid, kvpress dashed)."""
    from matplotlib.lines import Line2D  # noqa: PLC0415

    return [
        Line2D([], [], color="0.3", linestyle="-", marker="o", label="ours (solid)"),
        Line2D([], [], color="0.3", linestyle="--", marker="s", label="kvpress (dashed)"),
    ]


def missing_handle(text: str = "failed / infinite (at the top edge)"):
    from matplotlib.lines import Line2D  # noqa: PLC0415

    return Line2D([], [], color="0.3", linestyle="none", marker="^", markersize=8, label=text)


def frac_label(x: float) -> str:
    """``1``, ``1/2``, ``1/16``, or the decimal when ``x`` is no simple fraction."""
    f = Fraction(x).limit_denominator(1024)
    if abs(float(f) - x) > 1e-9 * max(1.0, x):
        return f"{x:.3g}"
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


#: Extra ticks for an axis spanning less than two octaves (labelled as decimals).
_DECIMAL_TICKS = (0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)


def log2_ticks(ax, lo: float, hi: float, axis: str = "x") -> None:
    """Log2 axis over ``[lo, hi]`` (padded a quarter octave) with ticks at the powers of two, labelled as
    fractions; when that gives fewer than three ticks, at round decimals instead."""
    import math  # noqa: PLC0415

    from matplotlib.ticker import NullFormatter, NullLocator  # noqa: PLC0415

    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=2)
    pad = 2**0.25
    a, b = math.floor(math.log2(lo) + 1e-9), math.ceil(math.log2(hi) - 1e-9)
    ticks = [2.0**k for k in range(a, b + 1)]
    labels = [frac_label(t) for t in ticks]
    inside = [t for t in ticks if lo / pad <= t <= hi * pad]
    if len(inside) < 3:
        ticks = [t for t in _DECIMAL_TICKS if lo / pad <= t <= hi * pad] or ticks
        labels = [f"{t:g}" for t in ticks]
    setter = ax.set_xticks if axis == "x" else ax.set_yticks
    setter(ticks, labels)
    sub = ax.xaxis if axis == "x" else ax.yaxis
    sub.set_minor_locator(NullLocator())
    sub.set_minor_formatter(NullFormatter())
    (ax.set_xlim if axis == "x" else ax.set_ylim)(lo / pad, hi * pad)
