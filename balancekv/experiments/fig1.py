"""``balancekv reproduce fig1``: [BKV]'s single-layer approximation experiment on SmolLM2.

Protocol ([BKV] arXiv 2502.07861, Sec. 5.1 / Fig. 1; SPEC 12): for one layer's
cache of ``n`` tokens keep the first ``head = 256`` and the last ``tail = 256``
tokens exact and compress the middle at kept rates ``1/2, 1/4, 1/8, 1/16``;
evaluate causal attention of the last ``256`` queries (query ``j`` sits at
position ``n - 256 + j`` and sees only tokens up to it); the error is the mean,
over those queries and over heads, of ``||a^ - a||_2 / ||a||_2``.

SmolLM2 uses grouped-query attention (3 KV heads, 9 query heads): each KV head's
cache is compressed once and scored with the queries of all 3 query heads that
read it, so the mean runs over the 9 query heads x 256 positions. Query-aware
methods (SnapKV, MiniKV's H2O scores) and the methods' internal probes get the
64 query positions just before the evaluated ones, never the evaluated queries.

Methods that keep every token (``quant``, 2 bits) are run once, at kept
fraction 1; the "error vs bytes" plot puts every method on one axis. A method
that is not registered, or an option it does not take, is refused before anything
runs (``Fig1Config.validate``); a method that fails is reported as failed in the
table, and the run goes on.

Paper reference (Llama-3.1-8B, layer 1, rate 1/2): BalanceKV 0.104, uniform
0.149, ratio 0.70 (:data:`PAPER`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from balancekv.experiments.middle import compress_middle
from balancekv.experiments.real_data import KVProblem, capture, kv_head_problem, resolve_text
from balancekv.experiments.results import command_line, run_dir, write_json
from balancekv.methods import available_methods, get_method
from balancekv.reference.softmax_attention import relative_error, weighted_attention
from balancekv.texts import REPORT_TEXT

DEFAULT_METHODS = (
    "balance",
    "uniform-halving",
    "uniform",
    "subgen",
    "snapkv",
    "quant",
    "minikv",
    "balance+quant",
    "balance+quant:bits=8",
)
DEFAULT_LAYERS = (1, 2, 5, 15, 29)
RATES = (1 / 2, 1 / 4, 1 / 8, 1 / 16)
#: Options fixed by the protocol (beyond ``sink=0``/``window=0``, see :func:`middle_options`).
METHOD_OPTIONS = {"quant": {"bits": 2}}
#: Row fields that vary from run to run (wall time); kept in memory, not written.
UNRECORDED = ("seconds",)
#: [BKV] Fig. 1, Llama-3.1-8B layer 1 at rate 1/2.
PAPER = {"model": "Llama-3.1-8B", "layer": 1, "rate": 0.5, "balance": 0.104, "uniform": 0.149}


@dataclass
class Fig1Config:
    n: int = 2048
    layers: tuple = DEFAULT_LAYERS
    methods: tuple = DEFAULT_METHODS
    text: str = REPORT_TEXT
    seeds: int = 1
    rates: tuple = RATES
    head: int = 256
    tail: int = 256
    queries: int = 256
    probes: int = 64
    model: str = "smollm2"
    method_options: dict = field(default_factory=lambda: {k: dict(v) for k, v in METHOD_OPTIONS.items()})

    def validate(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)):
            raise TypeError(f"n must be an int, got {type(self.n).__name__}")
        if self.n - self.head - self.tail < 2:
            raise ValueError(f"n={self.n} leaves no middle between head={self.head} and tail={self.tail}")
        if not 1 <= self.queries <= self.tail:
            raise ValueError(
                f"queries must be in [1, tail={self.tail}] (evaluated queries see an exact tail), got {self.queries}"
            )
        if self.probes < 0 or self.probes > self.n - self.tail:
            raise ValueError(f"probes must be in [0, n - tail], got {self.probes}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, (int, np.integer)) or self.seeds < 1:
            raise ValueError(f"seeds must be a positive int (number of seeds), got {self.seeds!r}")
        for r in self.rates:
            if not 0 < r <= 1:
                raise ValueError(f"rates must lie in (0, 1], got {r}")
        if not self.layers:
            raise ValueError("layers must name at least one layer")
        if not self.methods:
            raise ValueError("methods must name at least one method")
        registered = set(available_methods())
        for spec in self.methods:  # a typo must not cost a whole run (it ran every layer, then failed every point)
            name, opts = parse_method_spec(spec)
            if name not in registered:
                raise ValueError(f"methods: {spec!r} is not a registered method; available: {sorted(registered)}")
            try:
                get_method(name).resolve_options(opts)
            except (TypeError, ValueError) as err:
                raise ValueError(f"methods: {spec!r}: {err}") from None


# ---------------------------------------------------------------------- data
def real_problems(cfg: Fig1Config) -> dict[int, KVProblem]:
    """One :class:`KVProblem` per layer from the model's capture of ``cfg.text`` (first ``n`` tokens)."""
    label, _ = resolve_text(cfg.text)
    caps = capture(cfg.model, cfg.text, cfg.n, list(cfg.layers))
    return {
        L: kv_head_problem(
            c,
            cfg.queries,
            f"{cfg.model} layer {L}, text '{label}', n={cfg.n}",
            probes=cfg.probes,
            probes_end=cfg.n - cfg.queries,
        )
        for L, c in caps.items()
    }


def synthetic_problems(
    cfg: Fig1Config, family: str = "llm", heads: int = 2, d: int = 32, seed: int = 0
) -> dict[int, KVProblem]:
    """Seeded synthetic stand-ins (``balancekv.synthetic.make_kv``), one per layer in ``cfg.layers``."""
    from balancekv.synthetic import make_kv  # noqa: PLC0415

    out = {}
    for L in cfg.layers:
        K, V, Qall = make_kv(family, heads=heads, n=cfg.n, d=d, q=cfg.queries + cfg.probes, seed=seed + int(L))
        qpos = np.arange(cfg.n - cfg.queries, cfg.n)
        out[int(L)] = KVProblem(
            K,
            V,
            Qall[:, cfg.probes :],
            qpos,
            1 / np.sqrt(d),
            f"synthetic '{family}' #{L}, {heads} heads, n={cfg.n}, d={d}",
            Qall[:, : cfg.probes] if cfg.probes else None,
        )
    return out


def causal_exact(prob: KVProblem) -> np.ndarray:
    """Exact causal attention of ``prob.Q`` (query ``j`` sees keys ``0..qpos[j]``)."""
    n = prob.K.shape[-2]
    zeros = np.zeros(prob.K.shape[:-1])
    mask = np.arange(n)[None, :] <= prob.qpos[:, None]
    return weighted_attention(
        prob.Q, prob.K, prob.V, zeros, zeros, prob.scale, mask=np.broadcast_to(mask, prob.Q.shape[:-2] + mask.shape)
    )


# ---------------------------------------------------------------------- run
def parse_method_spec(spec: str) -> tuple[str, dict]:
    """``"name"`` or ``"name:key=value,key=value"`` -> ``(name, options)``; values parse as int, float,
    ``True``/``False`` or else stay strings. The whole spec labels the method's rows."""
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise ValueError(f"method spec {spec!r}: expected name:key=value[,key=value]")
        for conv in (int, float):
            try:
                opts[key] = conv(val)
                break
            except ValueError:
                continue
        else:
            opts[key] = {"True": True, "False": False}.get(val, val)
    return name, opts


def run_fig1(
    cfg: Fig1Config | None = None,
    problems: dict[int, KVProblem] | Callable | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Run the protocol; one row per (layer, method, rate) with the error averaged over seeds.

    ``problems``: the injection point for other data — a dict ``{layer: KVProblem}`` or a
    callable ``cfg -> dict``; default :func:`real_problems` (needs the ``hf`` extra).
    """
    cfg = cfg or Fig1Config()
    cfg.validate()
    methods = list(cfg.methods)
    if problems is None:
        problems = real_problems(cfg)
    elif callable(problems):
        problems = problems(cfg)
    jobs = []
    for L in problems:
        for m in methods:
            # methods that keep every token (quantization, the exact cache) have one point, at rate 1
            base = parse_method_spec(m)[0]
            rates = cfg.rates if get_method(base).selects_tokens and base != "exact" else (1.0,)
            jobs.extend((L, m, r) for r in rates)
    bar = None
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=len(jobs), desc="fig1", unit="run")
    exact_cache: dict[int, np.ndarray] = {}
    rows = []
    for L, m, rate in jobs:
        prob = problems[L]
        if bar is not None:
            bar.set_postfix_str(f"layer {L} {m} {rate:g}")
        if L not in exact_cache:
            exact_cache[L] = causal_exact(prob)
        rows.append(_one(cfg, prob, L, m, rate, exact_cache[L], log))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return rows


def _one(cfg: Fig1Config, prob: KVProblem, layer, method, rate, exact, log) -> dict:
    n = prob.K.shape[-2]
    middle = n - cfg.head - cfg.tail
    row = {"layer": int(layer), "method": method, "rate": float(rate), "data": prob.description}
    errs, nbytes, ratios, kept = [], [], [], []
    t0 = time.perf_counter()
    try:
        for seed in range(cfg.seeds):
            base, spec_opts = parse_method_spec(method)
            ckv = compress_middle(
                prob.K,
                prob.V,
                method=base,
                keep=rate,
                head=cfg.head,
                tail=cfg.tail,
                queries=prob.probes,
                scale=prob.scale,
                seed=seed,
                **{**cfg.method_options.get(base, {}), **spec_opts},
            )
            z = ckv.attend(prob.Q, positions=prob.qpos)
            e = relative_error(z, exact)
            if not np.all(np.isfinite(e)):
                raise FloatingPointError(f"non-finite error for {method} at rate {rate}")
            errs.append(float(e.mean()))
            nbytes.append(ckv.nbytes)
            ratios.append(ckv.ratio)
            kept.append(float((ckv.kept() - cfg.head - cfg.tail).mean()) / middle)
    except Exception as err:
        log(f"note: {method} at rate {rate:g} on layer {layer} failed: {type(err).__name__}: {err}")
        row.update(
            error=float("nan"),
            error_std=float("nan"),
            nbytes=0,
            ratio=float("nan"),
            kept_middle=float("nan"),
            failed=f"{type(err).__name__}: {err}",
        )
        return row
    row.update(
        error=float(np.mean(errs)),
        error_std=float(np.std(errs)),
        nbytes=int(np.mean(nbytes)),
        ratio=float(np.mean(ratios)),
        kept_middle=float(np.mean(kept)),
        seeds=cfg.seeds,
        seconds=(time.perf_counter() - t0) / cfg.seeds,
    )
    return row


# ---------------------------------------------------------------------- report
def _frac(r: float) -> str:
    return "1" if r == 1 else f"1/{round(1 / r)}" if abs(1 / r - round(1 / r)) < 1e-9 else f"{r:g}"


def markdown_table(rows: list[dict], cfg: Fig1Config) -> str:
    """A pivot per layer (methods x rates, mean error) and the paper comparison at layer 1, rate 1/2."""
    lines = []
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    rates = sorted({r["rate"] for r in rows}, reverse=True)
    for L in layers:
        lines.append(f"\n### Layer {L}\n")
        lines.append("| method | " + " | ".join(f"rate {_frac(r)}" for r in rates) + " | cache bytes / fp16 |")
        lines.append("|---|" + "---:|" * (len(rates) + 1))
        for m in methods:
            cells, ratio_cells = [], []
            for r in rates:
                hit = [x for x in rows if x["layer"] == L and x["method"] == m and x["rate"] == r]
                if not hit:
                    cells.append("")
                    continue
                x = hit[0]
                if x.get("failed"):
                    cells.append("failed")
                    continue
                sd = f" ± {x['error_std']:.4f}" if x.get("seeds", 1) > 1 else ""
                cells.append(f"{x['error']:.4f}{sd}")
                ratio_cells.append(f"{x['ratio']:.3f}")
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {' / '.join(ratio_cells)} |")
    cmp = paper_comparison(rows)
    if cmp:
        lines.append("\n### Against the paper (layer 1, rate 1/2)\n")
        lines.append("| | BalanceKV | uniform | BalanceKV / uniform |")
        lines.append("|---|---:|---:|---:|")
        lines.append(
            f"| [BKV] {PAPER['model']} | {PAPER['balance']:.3f} | {PAPER['uniform']:.3f} | "
            f"{PAPER['balance'] / PAPER['uniform']:.2f} |"
        )
        lines.append(f"| here: {cmp['data']} | {cmp['balance']:.3f} | {cmp['uniform']:.3f} | {cmp['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def paper_comparison(rows: list[dict]) -> dict | None:
    """Our BalanceKV and uniform errors at the paper's point (layer 1, rate 1/2), if both were run."""
    pick = {
        r["method"]: r
        for r in rows
        if r["layer"] == PAPER["layer"] and r["rate"] == PAPER["rate"] and not r.get("failed")
    }
    if "balance" not in pick or "uniform" not in pick:
        return None
    b, u = pick["balance"]["error"], pick["uniform"]["error"]
    return {"balance": b, "uniform": u, "ratio": b / u, "data": pick["balance"]["data"]}


MODEL_LABELS = {"smollm2": "SmolLM2-135M-Instruct", "minilm": "all-MiniLM-L6-v2"}


def _title(cfg: dict, rows: list[dict]) -> str:
    """``model, text, n, seeds`` of the run, from its config (as stored in the JSON)."""
    data = rows[0]["data"] if rows else ""
    if data.startswith("synthetic"):
        family = data.split("'")[1] if data.count("'") >= 2 else ""
        what = f"synthetic caches ('{family}' family)" if family else "synthetic caches"
    else:
        text = cfg.get("text", "")
        label = text if text in _texts() else "custom text"
        what = f"{MODEL_LABELS.get(cfg.get('model'), cfg.get('model'))}, text '{label}'"
    seeds = cfg.get("seeds", 1)
    n, head, tail = cfg.get("n"), cfg.get("head"), cfg.get("tail")
    return (
        f"[BKV] Fig. 1 protocol on {what}, n={n}\n"
        f"first {head} and last {tail} tokens exact, the middle compressed; "
        f"mean over {seeds} seed{'s' if seeds != 1 else ''}" + (" (bars: ±1 sd over seeds)" if seeds > 1 else "")
    )


def _texts():
    from balancekv.texts import TEXTS  # noqa: PLC0415

    return TEXTS


def plot(rows: list[dict], path_kept: Path, path_bytes: Path, cfg: dict | None = None) -> None:
    """Error vs kept fraction of the middle, and error vs cache bytes (fraction of fp16), one panel per layer.

    One colour per method (:mod:`~balancekv.experiments.plotstyle`); a failed or non-finite point is a
    triangle on the top edge and an error of 0 (not on a log axis) one on the bottom edge, never dropped.
    """
    import math  # noqa: PLC0415

    from matplotlib.transforms import blended_transform_factory  # noqa: PLC0415

    from balancekv.experiments import plotstyle as ps  # noqa: PLC0415

    plt = ps.pyplot()
    cfg = cfg or {}
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ncols = min(3, len(layers) + 1)
    nrows = math.ceil((len(layers) + 1) / ncols)
    for xkey, xlabel, path in (
        ("kept_middle", "kept fraction of the middle tokens", path_kept),
        ("ratio", "cache bytes / fp16 cache (whole cache)", path_bytes),
    ):
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(ps.FIGSIZE_WIDTH, 0.6 + 3.2 * nrows), squeeze=False, sharey=True
        )
        flat = list(axes.flat)
        marks = {"top": False, "bottom": False}
        for ax, L in zip(flat, layers):
            top = blended_transform_factory(ax.transData, ax.transAxes)
            xs_all = []
            for m in methods:
                st = ps.style(m)
                mine = sorted((r for r in rows if r["layer"] == L and r["method"] == m), key=lambda r: r["rate"])
                good = [r for r in mine if not r.get("failed") and np.isfinite(r["error"]) and r["error"] > 0]
                if good:
                    x = np.array([r[xkey] for r in good])
                    y = np.array([r["error"] for r in good])
                    sd = np.array([r.get("error_std", 0.0) if r.get("seeds", 1) > 1 else 0.0 for r in good])
                    lower = np.minimum(sd, 0.9 * y)  # keep the bar on a log axis
                    ax.errorbar(x, y, yerr=[lower, sd], capsize=2.5, elinewidth=1, **st)
                    xs_all += list(x)
                for r in mine:
                    if r in good:
                        continue
                    x = r[xkey] if np.isfinite(r.get(xkey, float("nan"))) else r["rate"]
                    xs_all.append(x)
                    edge = "bottom" if not r.get("failed") and r["error"] == 0 else "top"
                    marks[edge] = True
                    ax.plot(
                        [x],
                        [1.0 if edge == "top" else 0.0],
                        transform=top,
                        clip_on=False,
                        ls="none",
                        marker="^" if edge == "top" else "v",
                        markersize=9,
                        color=st["color"],
                    )
            if xs_all:
                ps.log2_ticks(ax, min(xs_all), max(xs_all))
            ax.set_yscale("log")
            ax.set_title(f"layer {L}")
            ax.set_xlabel(xlabel)
            ax.grid(True, which="major", alpha=0.3)
        for row in axes:
            row[0].set_ylabel("mean relative error")
        for ax in flat[len(layers) :]:
            ax.axis("off")
        handles = [plt.Line2D([], [], label=ps.label(m), **ps.style(m)) for m in methods]
        if marks["top"]:
            handles.append(ps.missing_handle("failed / non-finite (top edge)"))
        if marks["bottom"]:
            handles.append(
                plt.Line2D([], [], color="0.3", ls="none", marker="v", markersize=8, label="error 0 (bottom edge)")
            )
        flat[-1].legend(handles=handles, loc="center", frameon=False, handlelength=3)
        fig.suptitle(_title(cfg, rows))
        fig.tight_layout()
        fig.savefig(path, dpi=ps.DPI)
        plt.close(fig)


def write_results(
    rows: list[dict], cfg: Fig1Config, out_dir, stem: str | None = None, command: str = "", plots: bool = True
) -> dict[str, Path]:
    """Write ``<stem>.md`` (tables), ``<stem>.json`` (rows) and two PNG plots under ``out_dir``.

    Deterministic: the same rows give byte-identical files (wall times are not written, see
    :mod:`balancekv.experiments.results`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label, _ = resolve_text(cfg.text)
    stem = stem or f"fig1_{cfg.model}_{label}_n{cfg.n}"
    paths = {"md": out / f"{stem}.md", "json": out / f"{stem}.json"}
    data = "; ".join(dict.fromkeys(r["data"] for r in rows))
    head = [
        "# [BKV] Fig. 1 protocol (single-layer approximation)\n",
        f"Data: {data}.\n",
        f"n={cfg.n} tokens; first {cfg.head} and last {cfg.tail} exact; middle compressed; causal attention of the "
        f"last {cfg.queries} queries; error = mean over queries and query heads of ||a^ - a|| / ||a||; "
        f"seeds: {cfg.seeds}. Methods that keep every token (quant, 2 bits) appear at rate 1. "
        "The last column lists the whole cache's bytes (ends included) over fp16, rate by rate.\n",
    ]
    if command:
        head.append(f"Command: `{command}`\n")
    failed = [r for r in rows if r.get("failed")]
    body = markdown_table(rows, cfg)
    if failed:
        body += (
            "\nFailures:\n\n"
            + "\n".join(f"- layer {r['layer']} {r['method']} rate {_frac(r['rate'])}: {r['failed']}" for r in failed)
            + "\n"
        )
    paths["md"].write_text("\n".join(head) + body)
    kept_rows = [{k: v for k, v in r.items() if k not in UNRECORDED} for r in rows]
    write_json(paths["json"], {"config": asdict(cfg), "paper": PAPER, "rows": kept_rows})
    if plots:
        paths.update(replot(paths["json"]))
    return paths


def replot(json_path) -> dict[str, Path]:
    """Redraw ``<stem>_kept.png`` and ``<stem>_bytes.png`` beside a results JSON written by :func:`write_results`."""
    json_path = Path(json_path)
    d = json.loads(json_path.read_text())
    stem = json_path.with_suffix("")
    paths = {"png_kept": Path(f"{stem}_kept.png"), "png_bytes": Path(f"{stem}_bytes.png")}
    plot(d["rows"], paths["png_kept"], paths["png_bytes"], cfg=d.get("config"))
    return paths


def main(args) -> int:
    """Entry point of ``balancekv reproduce fig1`` (arguments from :mod:`balancekv.cli`)."""
    if getattr(args, "replot", None):
        for p in replot(args.replot).values():
            print(f"wrote {p}")
        return 0
    cfg = Fig1Config(
        n=args.n,
        layers=tuple(args.layers),
        methods=tuple(args.methods),
        text=args.text,
        seeds=args.seeds,
        model=args.model,
    )
    data = synthetic_problems if args.synthetic else None
    rows = run_fig1(cfg, problems=data, progress=not args.no_progress)
    cmd = command_line(getattr(args, "argv", None) or ["reproduce", "fig1"])
    stem = f"fig1_synthetic_n{cfg.n}" if args.synthetic else None
    out = run_dir("reproduce-fig1", args.out)
    paths = write_results(rows, cfg, out, stem=stem, command=cmd, plots=not args.no_plot)
    print(paths["md"].read_text())
    for p in paths.values():
        print(f"wrote {p}")
    return 0
