"""FAISS indexes over image embeddings: exact, IVF and HNSW inner product, on GPU when faiss-gpu has
one, saved as a directory that knows which checkpoint made it.

An index directory holds ``index.faiss``, ``items.jsonl`` (row i of the index = line i: image id,
shard key, captions) and ``index.json`` (type, parameters, size, the checkpoint's fingerprint, the
data it came from, sha256 of the two other files). ``load_index`` refuses files that do not belong
together.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from ldot.eval.errors import EvalError

IndexType = Literal["exact", "ivf", "hnsw"]
INDEX_TYPES = ("exact", "ivf", "hnsw")
INDEX_FILE, ITEMS_FILE, META_FILE = "index.faiss", "items.jsonl", "index.json"
FORMAT = "ldot-index"
# The files of an exported checkpoint that determine its embeddings (eval outputs written into the
# checkpoint later, such as recall.json or mlflow_run.json, do not).
MODEL_FILES = ("ldot.json", "heads.pt", "text_encoder", "image_encoder")


def _f32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


# ----------------------------------------------------------------------------------------- build


def gpu_available() -> bool:
    """faiss-gpu installed and a CUDA device visible."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_gpu(index: faiss.Index, device: int = 0) -> faiss.Index:
    """The same index on a GPU (flat and IVF; HNSW has no GPU version and stays on the CPU)."""
    if not gpu_available() or isinstance(index, faiss.IndexHNSW):
        return index
    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, device, index)
    gpu_index.referenced_objects = [res]  # the resources must live as long as the index
    return gpu_index


def to_cpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if "Gpu" in type(index).__name__ else index


def default_nlist(n: int) -> int:
    """~4 sqrt(n) inverted lists, but at least 39 training points per list (FAISS's own minimum)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build_exact_index(embeddings) -> faiss.Index:
    """IndexFlatIP: exact maximum inner product, the paper's similarity <z_0, h_0>."""
    emb = _f32(embeddings)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    return index


def build_index(embeddings, kind: IndexType = "exact", *, nlist: int | None = None, nprobe: int | None = None,
                hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 128, seed: int = 0,
                gpu: bool = False) -> tuple[faiss.Index, dict]:
    """(index, its parameters). IVF trains its coarse quantizer on the embeddings themselves."""
    emb = _f32(embeddings)
    n, d = emb.shape
    if kind == "exact":
        index, params = build_exact_index(emb), {}
    elif kind == "ivf":
        nlist = nlist or default_nlist(n)
        nprobe = min(nlist, nprobe or max(8, nlist // 8))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(emb)
        index.add(emb)
        index.nprobe = nprobe
        params = {"nlist": nlist, "nprobe": nprobe}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(emb)
        index.hnsw.efSearch = ef_search
        params = {"M": hnsw_m, "efConstruction": ef_construction, "efSearch": ef_search}
    else:
        raise EvalError(f"unknown index type {kind!r}; choose from {', '.join(INDEX_TYPES)}")
    return (to_gpu(index) if gpu else index), params


def set_search_params(index: faiss.Index, params: dict) -> None:
    """Apply search-time knobs (IVF nprobe, HNSW efSearch) after loading or to trade speed for recall."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None and hasattr(index, "nprobe"):  # a GPU IVF index is no IndexIVF but has the knob
        ivf = index
    if params.get("nprobe") is not None and ivf is not None:
        ivf.nprobe = int(params["nprobe"])
    if params.get("efSearch") is not None and isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = int(params["efSearch"])


# ---------------------------------------------------------------------------------------- search


def search(index: faiss.Index, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) per query, best first; ids of -1 pad when k exceeds what the index finds."""
    return index.search(_f32(queries), min(k, index.ntotal))


def dense_scores(index: faiss.Index, queries) -> np.ndarray:
    """Every query against every indexed vector, as a [n_queries, ntotal] matrix, via an exhaustive search."""
    scores, ids = search(index, queries, index.ntotal)
    out = np.empty_like(scores)
    np.put_along_axis(out, ids, scores, axis=1)
    return out


def overlap_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Recall of an approximate search against exact: mean fraction of the exact top-k it also returns."""
    a, e = approx_ids[:, :k], exact_ids[:, :k]
    hits = sum(len(np.intersect1d(a[i][a[i] >= 0], e[i])) for i in range(len(e)))
    return hits / (len(e) * k)


# ------------------------------------------------------------------------------------- persistence


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_fingerprint(checkpoint: str | Path) -> str:
    """sha256 over the relative paths and contents of the checkpoint's model files."""
    root = Path(checkpoint)
    if not (root / "ldot.json").is_file():
        raise EvalError(f"{root} is not an exported ldot checkpoint (no ldot.json)")
    h = hashlib.sha256()
    for name in MODEL_FILES:
        top = root / name
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top] if top.is_file() else []
        for p in files:
            h.update(str(p.relative_to(root)).encode() + b"\0" + _sha256(p).encode() + b"\n")
    return h.hexdigest()


@dataclass
class IndexDir:
    """A loaded index directory: the FAISS index and what row i of it is."""

    path: Path
    index: faiss.Index
    meta: dict
    items: list[dict] = field(default_factory=list)

    @property
    def image_ids(self) -> list[str]:
        return [it["image_id"] for it in self.items]


def save_index(out: str | Path, index: faiss.Index, items: list[dict], *, kind: str, params: dict,
               checkpoint: str | Path, data: str | Path | None = None, report: dict | None = None) -> Path:
    """Write the three files; items[i] describes row i (image_id, key, captions)."""
    out = Path(out)
    if index.ntotal != len(items):
        raise EvalError(f"index holds {index.ntotal} vectors but {len(items)} items were given")
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(to_cpu(index), str(out / INDEX_FILE))
    with open(out / ITEMS_FILE, "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    meta = {"format": FORMAT, "version": 1, "type": kind, "params": params, "dim": index.d, "ntotal": index.ntotal,
            "checkpoint": {"path": str(Path(checkpoint).resolve()), "fingerprint": checkpoint_fingerprint(checkpoint)},
            "data": str(Path(data).resolve()) if data else None,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": {INDEX_FILE: _sha256(out / INDEX_FILE), ITEMS_FILE: _sha256(out / ITEMS_FILE)},
            "report": report or {}}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def load_index(path: str | Path, checkpoint: str | Path | None = None, *, gpu: bool = False) -> IndexDir:
    """Load an index directory; with ``checkpoint``, also check that this checkpoint built it."""
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise EvalError(f"{path}: not an ldot index directory (no {META_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise EvalError(f"{meta_file}: not JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise EvalError(f"{meta_file}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    for name in (INDEX_FILE, ITEMS_FILE):
        f = path / name
        if not f.is_file():
            raise EvalError(f"{f}: missing (the index directory is incomplete)")
        if _sha256(f) != meta["files"].get(name):
            raise EvalError(f"{f}: contents differ from the ones {META_FILE} was written with "
                            "(files from different builds mixed)")
    try:
        index = faiss.read_index(str(path / INDEX_FILE))
    except RuntimeError as exc:
        raise EvalError(f"{path / INDEX_FILE}: FAISS cannot read it ({str(exc).splitlines()[0]})") from None
    items = [json.loads(line) for line in (path / ITEMS_FILE).read_text().splitlines() if line.strip()]
    if not (index.ntotal == len(items) == meta["ntotal"]) or index.d != meta["dim"]:
        raise EvalError(f"{path}: {INDEX_FILE} holds {index.ntotal}x{index.d}, {ITEMS_FILE} {len(items)} items, "
                        f"{META_FILE} says {meta['ntotal']}x{meta['dim']}")
    if checkpoint is not None:
        fp = checkpoint_fingerprint(checkpoint)
        if fp != meta["checkpoint"]["fingerprint"]:
            raise EvalError(f"{meta_file}: the index was built by the checkpoint {meta['checkpoint']['path']} "
                            f"(fingerprint {meta['checkpoint']['fingerprint'][:12]}), not by {checkpoint} "
                            f"({fp[:12]}); rebuild it with ldot eval index")
    set_search_params(index, meta.get("params", {}))
    return IndexDir(path, to_gpu(index) if gpu else index, meta, items)
