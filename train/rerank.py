"""task=rerank: the cross-attention re-ranker trained on the dual encoder's own mistakes.

Training pairs come from `ldot eval mine` run on data.train with the dual encoder the re-ranker will
serve: per caption the images it ranks highest that are not the caption's, per image the captions of
other images it ranks highest. Every training image of a batch (the streaming loader's: sharded over
ranks, shuffled per epoch, exactly resumable) becomes two query lists:

  its caption c  against [its image, K of c's mined negative images (+ R random)]    (text -> image)
  the image      against [c, K of the image's mined negative captions (+ R random)]  (image -> text)

The positive pair is scored once and shared; so an image costs 2(K + R) + 1 cross-encoder sequences.

The objective: listwise ITM, a softmax cross-entropy over each list of 1 positive and its negatives. Why not
the binary ITM of UNITER's pretraining (match / no match for pairs with random negatives): the re-ranker
is only ever asked to order the dual encoder's top M for one query, where every candidate is a hard
one, so what matters is the order inside such a list, which the listwise loss trains directly; binary
ITM trains an absolute match probability, calibrated on a different (easy) negative distribution. The
original re-ranker is trained for the same thing: UNITER's retrieval fine-tuning with hard negatives
(UniterForImageTextRetrievalHardNeg, which LightningDOT's rerank.py scores with) ranks 1 positive
against its 31 hardest negatives in both directions each step, as a hinge on sigmoid scores with margin
0.2. We keep the list and both directions and take the softmax form instead of the hinge: the hinge
gives no gradient once a negative sits 0.2 below the positive on a sigmoid that saturates, while the
softmax keeps pushing every negative in proportion to how close it comes (and is CMR's form, so the two
stages' losses read alike). UNITER picks its 31 hardest by scoring 399 random negatives with the
re-ranker itself every step (400 cross-encoder passes per query); here the negatives are the first
stage's mined lists, which are exactly the candidates the re-ranker sees at test time, drawn afresh
each step so that over the epochs every mined negative is seen.

UNITER's choice is also a curriculum: the hardest of 399 random negatives by the re-ranker's own score
are close to random while it knows little and harden as it learns. Mined lists are hard from step 0,
and a re-ranker that starts without a pretrained ITM head does not learn from them alone (on the demo's
scenes the listwise loss stayed at ln(1 + K) for 100 steps, with and without dropout, while the same
model learned at once against random negatives). So `rerank.random` adds R negatives drawn uniformly
from the training set to every list (1 + K + R candidates): the easy ones teach matching, the mined ones
the fine distinctions the first stage gets wrong. Started from UNITER's ITM head (rerank.uniter), R = 0
keeps every list hard, as the original's are.

With K = 0 every negative is random: UNITER's ITM pretraining in miniature, a stage of its own before the
mined one (rerank.init_from the first stage's export; benchmarks/quality.py, row rerank-itm).

Every draw (a caption of the image, K + R negatives each way) is a function of (seed, the loader's batch
index, the image's index in the dataset): the same whichever rank holds the image and however a global
batch is split, and replayed exactly on resume (the wrapped loader's state is the whole state). Each
rank's loss is the mean over its lists; with fixed batch sizes every rank holds the same number of
lists, so DeepSpeed's mean over ranks is the mean over the global batch.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldot.data.loader import LoaderAdapter
from ldot.train.errors import ConfigError


def list_logits(scores: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """[G, 1 + K] float logits of each list's pairs, the positive first, -inf where a list is padded (-1)."""
    return scores.float()[lists.clamp_min(0)].masked_fill(lists < 0, float("-inf"))


def listwise_itm_loss(scores: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """Mean over lists of -log softmax(list)[0]. scores [P]: one ITM logit per pair; lists [G, 1 + K]:
    pair indices, the positive first, -1 where a query had fewer than K mined negatives."""
    logits = list_logits(scores, lists)
    return F.cross_entropy(logits, torch.zeros(len(lists), dtype=torch.long, device=logits.device))


class MinedNegatives:
    """`ldot eval mine`'s lists for one dataset, as rows: images by their row in the dataset (shard order,
    the loader's group_ids) and captions by a flat id (the image's captions in order, image by image)."""

    def __init__(self, mined_dir: str | Path, split, key: str = "rerank.mined", data_key: str = "data.train"):
        """key / data_key: the config keys that name mined_dir and the split, for the error messages."""
        mined_dir = Path(mined_dir)
        self.captions: list[str] = split.captions
        self.image_ids: list[str] = split.image_ids
        cap_img = np.asarray(split.caption_image)
        self.first = np.searchsorted(cap_img, np.arange(split.num_images), side="left")
        self.count = np.bincount(cap_img, minlength=split.num_images)
        row = {image_id: r for r, image_id in enumerate(split.image_ids)}
        n_img = split.num_images
        self.txt2img: list[np.ndarray | None] = [None] * len(self.captions)
        self.img2txt: list[np.ndarray | None] = [None] * n_img

        def rows(path: Path, line_no: int, ids) -> np.ndarray:
            try:
                return np.array([row[i] for i in ids], dtype=np.int64)
            except KeyError as exn:
                raise ConfigError(f"{path}:{line_no}: image_id {exn.args[0]!r} is not in {split.data_dir} "
                                  f"({key} must be mined on {data_key})") from None

        def caption(path: Path, line_no: int, ref) -> int:
            r = rows(path, line_no, [ref["image_id"]])[0]
            if not 0 <= ref["caption"] < self.count[r]:
                raise ConfigError(f"{path}:{line_no}: image {ref['image_id']} has no caption {ref['caption']}")
            return int(self.first[r] + ref["caption"])

        for name, handle in (("txt2img.jsonl", "txt"), ("img2txt.jsonl", "img")):
            path = mined_dir / name
            if not path.is_file():
                raise ConfigError(f"{key}: {path} not found (the output of `ldot eval mine` on {data_key})")
            with path.open() as f:
                for line_no, line in enumerate(f, start=1):
                    try:
                        rec = json.loads(line)
                        if handle == "txt":
                            self.txt2img[caption(path, line_no, rec)] = rows(path, line_no, rec["negatives"])
                        else:
                            self.img2txt[rows(path, line_no, [rec["image_id"]])[0]] = np.array(
                                [caption(path, line_no, c) for c in rec["negatives"]], dtype=np.int64)
                    except (json.JSONDecodeError, KeyError, TypeError) as exn:
                        raise ConfigError(f"{path}:{line_no}: not a mined record ({type(exn).__name__}: {exn})") from None
        for name, lists in (("txt2img.jsonl", self.txt2img), ("img2txt.jsonl", self.img2txt)):
            missing = sum(x is None for x in lists)
            if missing:
                raise ConfigError(f"{key}: {mined_dir / name} lacks {missing} of {split.data_dir}'s "
                                  f"{len(lists)} {'captions' if name[0] == 't' else 'images'} (mined on another split?)")


class RerankBatches(LoaderAdapter):
    """The loader's image batches turned into the re-ranker's: every image's two query lists (module doc).

    Yields input_ids / attention_mask [P, L], img_feat [P, N, D], img_pos [P, N, 7], img_mask [P, N] for
    P = B(2K + 1) pairs, and lists [2B, 1 + K] (pair indices, positive first, -1 padding). Image features
    come from the dataset by row (an ImageStore); state_dict and load_state_dict are the loader's."""

    def __init__(self, loader, mined: MinedNegatives, store, tokenizer, *, negatives: int, from_top: int | None,
                 seed: int, max_text_len: int, random: int = 0):
        super().__init__(loader)
        self.mined, self.store, self.tokenizer = mined, store, tokenizer
        self.k, self.top, self.seed, self.max_text_len, self.random = negatives, from_top, seed, max_text_len, random
        self._batches = 0  # the loader's batch index, which seeds each batch's draws

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._batches = int(state["batches"])

    def adapt(self, batch: dict) -> dict:
        out = self.make(batch["group_ids"].tolist(), batch["image_id"], self._batches)
        self._batches += 1
        return out

    def _draw(self, rng: np.random.Generator, mined: np.ndarray, n: int, positive) -> np.ndarray:
        """K of a mined list, then `random` more from the whole dataset (none a positive or drawn already)."""
        pool = mined[:self.top] if self.top else mined
        hard = pool if len(pool) <= self.k else rng.choice(pool, size=self.k, replace=False)
        out, seen = list(map(int, hard)), set(map(int, hard))
        while len(out) < len(hard) + self.random and len(seen) < n:  # rejection: cheap for n >> random
            x = int(rng.integers(n))
            if x not in seen and not positive(x):
                out.append(x)
            seen.add(x)
        return np.asarray(out, dtype=np.int64)

    def make(self, rows: list[int], image_ids: list[str] | None, index: int) -> dict:
        """The re-ranker's batch for images `rows` (dataset rows) at the loader's batch `index`."""
        from ldot.data.loader import tokenize

        m, k = self.mined, self.k
        texts, pair_rows, lists = [], [], []
        for j, r in enumerate(rows):
            if image_ids is not None and m.image_ids[r] != image_ids[j]:
                raise ConfigError(f"rerank: the loader's image {j} is {image_ids[j]}, row {r} of the mined split is "
                                  f"{m.image_ids[r]} (rerank.mined is of another dataset than data.train)")
            rng = np.random.default_rng([self.seed, index, r])
            c = int(m.first[r] + rng.integers(m.count[r]))
            neg_images = self._draw(rng, m.txt2img[c], len(m.image_ids), lambda x: x == r)
            neg_captions = self._draw(rng, m.img2txt[r], len(m.captions), lambda x: m.first[r] <= x < m.first[r] + m.count[r])
            p0 = len(texts)
            texts += [m.captions[c]] * (1 + len(neg_images)) + [m.captions[int(i)] for i in neg_captions]
            pair_rows += [r, *map(int, neg_images)] + [r] * len(neg_captions)
            t2i = [p0 + i for i in range(1 + len(neg_images))]
            i2t = [p0] + [p0 + 1 + len(neg_images) + i for i in range(len(neg_captions))]
            width = 1 + k + self.random
            lists += [t2i + [-1] * (width - len(t2i)), i2t + [-1] * (width - len(i2t))]
        unique, inverse = np.unique(np.asarray(pair_rows), return_inverse=True)
        images = self.store.batch(unique.tolist())
        idx = torch.from_numpy(inverse.astype(np.int64))
        out = tokenize(self.tokenizer, texts, self.max_text_len)
        out.update({name: images[name][idx] for name in ("img_feat", "img_pos", "img_mask")})
        out["lists"] = torch.tensor(lists, dtype=torch.long)
        return out


@torch.no_grad()
def list_metrics(model, lists: RerankBatches, rows: list[int], *, batch_images: int) -> dict[str, float]:
    """The listwise ITM loss and the share of lists whose positive scores highest, over the lists of images
    `rows` (each image's two, drawn as at the loader's batch 0: the same lists every time), in eval mode.
    The periodic validation of task=rerank (train/validator.py): a loss that falls on the training lists
    while it rises here is a re-ranker learning what does not carry to new scenes."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    loss, top1, count = 0.0, 0, 0
    try:
        for s in range(0, len(rows), batch_images):
            batch = lists.make(rows[s:s + batch_images], None, 0)
            idx = batch.pop("lists").to(param.device)
            inputs = {k: v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device)
                      for k, v in batch.items()}
            logits = list_logits(model(**inputs), idx)
            target = torch.zeros(len(idx), dtype=torch.long, device=logits.device)
            loss += F.cross_entropy(logits, target, reduction="sum").item()
            top1 += int((logits.argmax(1) == 0).sum())
            count += len(idx)
    finally:
        model.train(was_training)
    return {"list_loss": loss / count, "list_top1": top1 / count}


def rerank_batches(loader, cfg_rerank, data_dir: str, tokenizer, *, seed: int, max_text_len: int) -> RerankBatches:
    """The trainer's loader for task=rerank: `loader`'s images with their mined lists (rerank.mined)."""
    from ldot.data.loader import load_eval_split
    from ldot.eval.image_store import ImageStore

    split = load_eval_split(data_dir)
    return RerankBatches(loader, MinedNegatives(cfg_rerank.mined, split), ImageStore(data_dir, split.keys), tokenizer,
                         negatives=cfg_rerank.negatives, from_top=cfg_rerank.from_top, seed=seed,
                         max_text_len=max_text_len, random=cfg_rerank.random)
