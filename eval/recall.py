"""Recall evaluation over encoders it is handed: encode a split, index both sides, search, score.

Imports nothing from train/, so the trainer's periodic evaluation can call it; `model` is anything with
encode_text(input_ids, attention_mask) and encode_image(img_feat, img_pos, img_mask).

Ranking goes through FAISS top-k searches in both directions (eval.metrics.TopK), never the dense
n_captions x n_images matrix, so the paper's full setting (123k images, 615k captions) fits in memory;
`dense=True` keeps the exhaustive path that the tests compare it with. Launched with several ranks
(`distributed.is_initialized()`), each rank encodes and searches its own slice of the pool and rank 0
merges the candidates.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ldot.data.progress import progress_bar
from ldot.eval.index import build_exact_index, dense_scores, search, to_gpu
from ldot.eval.metrics import TopK, retrieval_recall


def _autocast(device: torch.device, model_dtype: torch.dtype, bf16: bool | None):
    """bf16 autocast on CUDA for a float32 model (the default there); nothing on CPU."""
    if bf16 is None:
        bf16 = device.type == "cuda"
    if bf16 and model_dtype == torch.float32 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def encode_images(model, batches: Iterator[dict], *, device="cpu", bf16: bool | None = None, total=None,
                  progress: bool = False) -> np.ndarray:
    """[n, d] float32 image embeddings of collated batches (img_feat, img_pos, img_mask)."""
    device = torch.device(device)
    dtype = next(model.parameters()).dtype
    out = []
    with _autocast(device, dtype, bf16):
        for b in progress_bar(batches, total=total, desc="encode images", disable=not progress):
            out.append(model.encode_image(b["img_feat"].to(device, dtype), b["img_pos"].to(device, dtype),
                                          b["img_mask"].to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def encode_texts(model, batches: Iterator[dict], *, device="cpu", bf16: bool | None = None, total=None,
                 progress: bool = False) -> np.ndarray:
    """[n, d] float32 text embeddings of tokenized batches (input_ids, attention_mask)."""
    device = torch.device(device)
    out = []
    with _autocast(device, next(model.parameters()).dtype, bf16):
        for b in progress_bar(batches, total=total, desc="encode captions", disable=not progress):
            out.append(model.encode_text(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def _tokenized(tokenizer, texts: Sequence[str], batch_size: int, max_text_len: int) -> Iterator[dict]:
    from ldot.data.loader import tokenize  # the same tokenization as EvalSplit.text_batches

    for i in range(0, len(texts), batch_size):
        yield tokenize(tokenizer, list(texts[i:i + batch_size]), max_text_len)


def encode_queries(model, tokenizer, texts: Sequence[str], *, max_text_len: int = 32, batch_size: int = 256,
                   device="cpu", bf16: bool | None = None) -> np.ndarray:
    """Free text (search queries, re-ranker inputs) → [n, d] embeddings."""
    return encode_texts(model, _tokenized(tokenizer, texts, batch_size, max_text_len), device=device, bf16=bf16)


def _slice(n: int, rank: int, world: int) -> tuple[int, int]:
    return n * rank // world, n * (rank + 1) // world


def _image_batches_range(split, lo: int, hi: int, batch_size: int) -> Iterator[dict]:
    """Images lo..hi of an EvalSplit, read from the shards that hold them (a rank's slice)."""
    from ldot.data import schema
    from ldot.data.batching import collate_images
    from ldot.data.errors import DataError
    from ldot.data.reader import ErrorPolicy, read_shard

    policy, batch, first = ErrorPolicy("error"), [], 0
    for path, info in zip(split.paths, split.manifest.shards):
        start, stop = max(lo - first, 0), min(hi - first, info.samples)
        if start < stop:
            for j, raw in enumerate(read_shard(path, policy, start=start, stop=stop)):
                i = first + start + j
                if raw["__key__"] != split.keys[i]:
                    raise DataError(f"sample {i} is key {raw['__key__']}, the caption pass saw {split.keys[i]}",
                                    shard=path, key=raw["__key__"])
                batch.append(schema.check_sample(schema.decode_sample(raw), split.feature_dim))
                if len(batch) == batch_size:
                    yield collate_images(batch)
                    batch = []
        first += info.samples
    if batch:
        yield collate_images(batch)


def _gather_rows(x: np.ndarray) -> np.ndarray:
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x)
    return np.concatenate([p for p in parts if p.size], axis=0)


def encode_split(model, split, tokenizer, *, batch_size: int = 256, max_text_len: int = 32,
                 device: str | torch.device = "cpu", progress: bool = True, bf16: bool | None = None,
                 distributed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(text embeddings [n_captions, d], image embeddings [n_images, d]) as float32 arrays.

    distributed: every rank encodes its slice of images and captions and all receive the whole."""
    if distributed and dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        lo, hi = _slice(split.num_images, rank, world)
        clo, chi = _slice(len(split.captions), rank, world)
        img = encode_images(model, _image_batches_range(split, lo, hi, batch_size), device=device, bf16=bf16,
                            total=-(-(hi - lo) // batch_size), progress=progress and rank == 0)
        txt = encode_queries(model, tokenizer, split.captions[clo:chi], max_text_len=max_text_len,
                             batch_size=batch_size, device=device, bf16=bf16)
        return _gather_rows(txt), _gather_rows(img)
    img = encode_images(model, split.image_batches(batch_size), device=device, bf16=bf16, progress=progress,
                        total=-(-split.num_images // batch_size))
    txt = encode_texts(model, split.text_batches(tokenizer, batch_size, max_text_len), device=device, bf16=bf16,
                       progress=progress, total=-(-len(split.captions) // batch_size))
    return txt, img


def _merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank (scores, global ids) of the same queries → the overall top `depth`, best first."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    scores = np.where(ids < 0, -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _search_pool(pool: np.ndarray, queries: np.ndarray, depth: int, gpu: bool, sharded: bool):
    """Exact top-`depth` of the queries over the pool; sharded: this rank's slice, merged on every rank."""
    if not (sharded and dist.is_initialized() and dist.get_world_size() > 1):
        return search(to_gpu(build_exact_index(pool)) if gpu else build_exact_index(pool), queries, depth)
    lo, hi = _slice(len(pool), dist.get_rank(), dist.get_world_size())
    part = (np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64))
    if hi > lo:
        index = build_exact_index(pool[lo:hi])
        s, i = search(to_gpu(index) if gpu else index, queries, depth)
        part = (s, np.where(i >= 0, i + lo, -1))
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return _merge_topk(parts, depth)


def topk_from_embeddings(text_emb: np.ndarray, image_emb: np.ndarray, caption_image, max_k: int, *,
                         query_captions=None, query_images=None, gpu: bool = False, sharded: bool = False) -> TopK:
    """FAISS exact search in both directions, deep enough for exact recall up to max_k.

    query_captions / query_images: the queries (default all); the rest of the pool only competes
    (the paper's full setting: test queries against every image of the dataset)."""
    cap_img = np.asarray(caption_image)
    m = int(np.bincount(cap_img, minlength=len(image_emb)).max())
    qc = np.arange(len(text_emb)) if query_captions is None else np.asarray(query_captions)
    qi = np.arange(len(image_emb)) if query_images is None else np.asarray(query_images)
    ir_s, ir_i = _search_pool(image_emb, text_emb[qc], min(max_k + 1, len(image_emb)), gpu, sharded)
    tr_s, tr_i = _search_pool(text_emb, image_emb[qi], min(max_k + m, len(text_emb)), gpu, sharded)
    return TopK(ir_i, ir_s, tr_i, tr_s, num_images=len(image_emb), num_captions=len(text_emb),
                ir_query=qc, tr_query=qi)


def recall_from_embeddings(text_emb: np.ndarray, image_emb: np.ndarray, caption_image, ks=(1, 5, 10), *,
                           dense: bool = False, gpu: bool = False) -> dict:
    """Recall@K of every caption against every image: top-k searches, or (dense) the full score matrix."""
    if dense:
        return retrieval_recall(dense_scores(build_exact_index(image_emb), text_emb), caption_image, ks)
    return retrieval_recall(topk_from_embeddings(text_emb, image_emb, caption_image, max(ks), gpu=gpu),
                            caption_image, ks)


def evaluate_split(model, split, tokenizer, *, ks=(1, 5, 10), **encode_kwargs) -> dict:
    was_training = model.training
    model.eval()
    try:
        text_emb, image_emb = encode_split(model, split, tokenizer, **encode_kwargs)
    finally:
        model.train(was_training)
    return recall_from_embeddings(text_emb, image_emb, split.caption_image, ks)
