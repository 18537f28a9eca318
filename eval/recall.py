"""Recall evaluation over encoders it is handed: encode a split, index the images, rank, score.

Imports nothing from train/, so the trainer's periodic evaluation can call it; `model` is anything with
encode_text(input_ids, attention_mask) and encode_image(img_feat, img_pos, img_mask).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from eval.index import build_exact_index, dense_scores
from eval.metrics import retrieval_recall


@torch.no_grad()
def encode_split(model, split, tokenizer, *, batch_size: int = 256, max_text_len: int = 32,
                 device: str | torch.device = "cpu", progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(text embeddings [n_captions, d], image embeddings [n_images, d]) as float32 arrays."""
    dtype = next(model.parameters()).dtype
    images, texts = [], []
    n_img_batches = -(-split.num_images // batch_size)
    for b in tqdm(split.image_batches(batch_size), total=n_img_batches, desc="encode images",
                  disable=not progress, mininterval=2.0):
        images.append(model.encode_image(b["img_feat"].to(device, dtype), b["img_pos"].to(device, dtype),
                                         b["img_mask"].to(device)).float().cpu())
    n_txt_batches = -(-len(split.captions) // batch_size)
    for b in tqdm(split.text_batches(tokenizer, batch_size, max_text_len), total=n_txt_batches,
                  desc="encode captions", disable=not progress, mininterval=2.0):
        texts.append(model.encode_text(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu())
    return torch.cat(texts).numpy(), torch.cat(images).numpy()


def recall_from_embeddings(text_emb: np.ndarray, image_emb: np.ndarray, caption_image, ks=(1, 5, 10)) -> dict:
    """Exact FAISS inner-product search of every caption against every image, then Recall@K."""
    scores = dense_scores(build_exact_index(image_emb), text_emb)
    return retrieval_recall(scores, caption_image, ks)


def evaluate_split(model, split, tokenizer, *, ks=(1, 5, 10), **encode_kwargs) -> dict:
    was_training = model.training
    model.eval()
    try:
        text_emb, image_emb = encode_split(model, split, tokenizer, **encode_kwargs)
    finally:
        model.train(was_training)
    return recall_from_embeddings(text_emb, image_emb, split.caption_image, ks)
