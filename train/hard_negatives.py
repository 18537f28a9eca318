"""Fine-tuning with FAISS-mined hard negatives, as the original LightningDOT does (`num_hard_negatives`).

Every `every_epochs` epochs (or `every_steps` steps) the current model encodes the whole training split
(each rank a slice) and searches it both ways with the sharded exact search of `ldot eval` (eval.recall's
encode_split and topk_from_embeddings, eval.hard_negatives.mine): per caption the `pool` images it ranks
highest that are not its own, per image the `pool` captions of other images. Samples of one image_id
count as one image, so a duplicate of the positive is never mined as its negative; with
`exclude_same_text`, neither is an image that holds a caption of the query's very text, nor a caption
whose text the query image holds (eval.hard_negatives.mine's text_key). From each pool K are
kept for the round: K drawn at random (the original: `random.sample` of K from its top max(2K + 10, 50),
re-mined after every epoch) or the K best (`sampling: top`). Every rank gets the same lists (the search
merges on every rank; the draw is seeded by (seed, the mining step)).

A training batch then carries, per pair, the K hard images of its caption (the loader's caption: the
batch says which) and the K hard captions of its image, read from the shards by row (eval.image_store)
and tokenized like the batch; the CMR loss scores every caption against every image and every pair's
hard images, and every image against every caption and every pair's hard captions
(kernels.global_contrastive_loss). A step then encodes B(1 + K) captions and B(1 + K) images per rank.

Exact resume: the lists travel in the checkpoint (`hard_negatives.npz`, written by rank 0; the same on
every rank, so also on another number of ranks): a resumed run re-mines only when the uninterrupted run
would have, with the same weights. Re-mining on resume instead would use the resumed weights, not
those of the mining step.

Mining reads embeddings back from the device; it happens at the mining steps only, never in the steady
state (tests/train/test_step_syncs.py).
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch

from ldot.data.loader import LoaderAdapter
from ldot.train.config import HardNegativesConfig
from ldot.train.errors import ConfigError

log = logging.getLogger("ldot.train")

FILE = "hard_negatives.npz"
KEYS = ("hard_input_ids", "hard_attention_mask", "hard_img_feat", "hard_img_pos", "hard_img_mask",
        "hard_image_groups", "hard_text_groups")


def default_pool(k: int) -> int:
    """The original's mining depth for K negatives: min(max(2K + 10, 50), 1000) (dvl/hn.py)."""
    return min(max(2 * k + 10, 50), 1000)


class HardNegatives:
    """The mined lists of one training split, their schedule, their draw and their checkpoint form."""

    def __init__(self, cfg: HardNegativesConfig, data_dir, tokenizer, *, max_text_len: int, seed: int,
                 steps_per_epoch: int | None):
        from ldot.data.loader import load_eval_split
        from ldot.eval.hard_negatives import shared_texts, skip_depth, text_keys
        from ldot.eval.image_store import ImageStore

        self.cfg, self.tokenizer, self.max_text_len, self.seed = cfg, tokenizer, max_text_len, seed
        self.k = cfg.num_hard_negatives
        if cfg.every_steps:
            self.every = cfg.every_steps
        elif steps_per_epoch is None:
            raise ConfigError("hard_negatives.every_epochs needs a fixed batch size (data.token_budget makes the "
                              "epoch length unknown): set hard_negatives.every_steps")
        else:
            self.every = max(1, cfg.every_epochs * steps_per_epoch)
        self.split = split = load_eval_split(data_dir)
        self.store = ImageStore(data_dir, split.keys)
        ids = np.asarray(split.image_ids)
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        self.key = first[inverse.reshape(-1)].astype(np.int64)  # image row -> first row of its image_id
        self.caption_image = np.asarray(split.caption_image)
        self.first_caption = np.searchsorted(self.caption_image, np.arange(split.num_images), side="left")
        self.num_captions = np.bincount(self.caption_image, minlength=split.num_images)
        others = split.num_images - int(np.bincount(self.key).max())
        self.text_key = text_keys(split.captions) if cfg.exclude_same_text else None
        if self.text_key is not None:
            shared = shared_texts(self.text_key, self.caption_image, self.key)
            log.info("hard negatives: %d of %d captions share their text with another image, which is never "
                     "mined as their negative (exclude_same_text)", int(shared.sum()), len(shared))
        # search depth: the pool plus whatever a row skips (the query's own image, with its same-text matches)
        self.depth_extra = skip_depth(self.caption_image, self.key, self.text_key)
        self.pool = min(cfg.pool or default_pool(self.k), others)
        if self.pool < self.k:
            raise ConfigError(f"hard_negatives.num_hard_negatives={self.k}: {data_dir} has only {others} images "
                              "besides the most repeated one to mine from")
        self.mined_at: int | None = None
        self.txt2img: np.ndarray | None = None  # [captions, K] image rows per caption
        self.img2txt: np.ndarray | None = None  # [images, K] caption rows per image

    # -- schedule and mining -------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """At the start of every `every` steps' round: steps 1 (with mine_at_start), 1 + every, 1 + 2 every..."""
        return (step - 1) % self.every == 0 and (step > 1 or self.cfg.mine_at_start)

    def mine(self, model, step: int, *, device, distributed: bool, sharded: bool) -> None:
        """The current model's lists (all ranks take part; every rank ends with the same lists).
        distributed: each rank encodes a slice (not under ZeRO-3, where every forward is a collective and
        slices of unequal length would leave a rank waiting); sharded: each rank searches a slice."""
        from ldot.eval.hard_negatives import mine
        from ldot.eval.recall import encode_split, topk_from_embeddings

        was_training = model.training
        model.eval()
        try:
            text_emb, image_emb = encode_split(model, self.split, self.tokenizer, batch_size=self.cfg.batch_size,
                                               max_text_len=self.max_text_len, device=device, progress=False,
                                               distributed=distributed)
        finally:
            model.train(was_training)
        top = topk_from_embeddings(text_emb, image_emb, self.caption_image, self.pool + self.depth_extra,
                                   sharded=sharded)
        mined = mine(top, self.caption_image, self.pool, image_key=self.key, text_key=self.text_key)
        self.txt2img = self._draw(mined["txt2img_ids"], step, 0, "caption")
        self.img2txt = self._draw(mined["img2txt_ids"], step, 1, "image")
        self.mined_at = step
        own = np.einsum("ij,ij->i", text_emb, image_emb[self.caption_image])
        above = float(np.mean(mined["txt2img_scores"][:, 0] > own))
        log.info("step %d: mined %d hard negatives per caption and per image from the top %d (%.1f%% of captions "
                 "rank a negative above their image)", step, self.k, self.pool, 100 * above)

    def _draw(self, ids: np.ndarray, step: int, side: int, what: str) -> np.ndarray:
        """K of each row's pool: the first K, or K at random (seeded by (seed, step, side))."""
        valid = ids >= 0
        short = np.flatnonzero(valid.sum(1) < self.k)
        if short.size:
            raise ConfigError(f"hard_negatives.num_hard_negatives={self.k}: {what} {int(short[0])} has only "
                              f"{int(valid[short[0]].sum())} negatives within the top {self.pool}")
        if self.cfg.sampling == "top":
            return ids[:, :self.k].astype(np.int64)  # mine() puts a row's valid entries first, best first
        noise = np.random.default_rng([self.seed, step, side]).random(ids.shape) + ~valid  # invalid ones last
        pick = np.argsort(noise, axis=1, kind="stable")[:, :self.k]
        return np.take_along_axis(ids, pick, 1).astype(np.int64)

    # -- batches -------------------------------------------------------------------------------------------
    def attach(self, batch: dict) -> dict:
        """The batch with its pairs' hard negatives (module doc); before the first mining, as it is. Group
        ids become one per image_id, for the pairs and the hard columns alike."""
        from ldot.data.loader import tokenize

        rows = batch["group_ids"].numpy()
        for j, r in enumerate(rows.tolist()):
            if self.split.image_ids[r] != batch["image_id"][j]:
                raise ConfigError(f"hard_negatives: the loader's image {j} is {batch['image_id'][j]}, row {r} of "
                                  f"{self.split.data_dir} is {self.split.image_ids[r]} (a dataset with skipped "
                                  "samples? mining needs every sample valid)")
        out = dict(batch, group_ids=torch.from_numpy(self.key[rows]))
        if self.txt2img is None:
            return out
        b, k = len(rows), self.k
        captions = self.first_caption[rows] + batch["caption_index"].numpy()
        hard_images, hard_captions = self.txt2img[captions], self.img2txt[rows]  # [B, K] each
        unique, inverse = np.unique(hard_images.reshape(-1), return_inverse=True)
        images = self.store.batch(unique.tolist())
        at = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
        texts = tokenize(self.tokenizer, [self.split.captions[int(c)] for c in hard_captions.reshape(-1)],
                         self.max_text_len)
        out.update({"hard_input_ids": texts["input_ids"], "hard_attention_mask": texts["attention_mask"],
                    "hard_img_feat": images["img_feat"][at], "hard_img_pos": images["img_pos"][at],
                    "hard_img_mask": images["img_mask"][at],
                    "hard_image_groups": torch.from_numpy(self.key[hard_images]).reshape(b, k),
                    "hard_text_groups": torch.from_numpy(self.key[self.caption_image[hard_captions]]).reshape(b, k)})
        return out

    # -- checkpoint ----------------------------------------------------------------------------------------
    def state_bytes(self) -> bytes | None:
        if self.txt2img is None:
            return None
        buf = io.BytesIO()
        np.savez(buf, mined_at=self.mined_at, txt2img=self.txt2img, img2txt=self.img2txt,
                 shape=np.array([self.split.num_images, len(self.caption_image), self.k]))
        return buf.getvalue()

    def load(self, checkpoint_dir: Path) -> None:
        """The lists a checkpoint holds (none before the first mining)."""
        path = Path(checkpoint_dir) / FILE
        if not path.is_file():
            self.mined_at, self.txt2img, self.img2txt = None, None, None
            return
        with np.load(path) as f:
            want = [self.split.num_images, len(self.caption_image), self.k]
            if f["shape"].tolist() != want:
                raise ConfigError(f"{path}: lists of {f['shape'].tolist()} (images, captions, K), this run has {want}: "
                                  "hard_negatives.num_hard_negatives or data.train changed")
            self.mined_at, self.txt2img, self.img2txt = int(f["mined_at"]), f["txt2img"], f["img2txt"]
        log.info("hard negatives mined at step %d restored from %s", self.mined_at, path)


class HardNegativeBatches(LoaderAdapter):
    """The loader's batches with their hard negatives attached (HardNegatives.attach, with the lists current
    when each batch is drawn); the loader's state is the whole state."""

    def __init__(self, loader, hard: HardNegatives):
        super().__init__(loader)
        self.hard = hard

    def adapt(self, batch: dict) -> dict:
        return self.hard.attach(batch)
