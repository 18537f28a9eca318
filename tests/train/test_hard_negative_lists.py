"""Hard negatives in fine-tuning, one process (train/hard_negatives.py): what is mined (never the positive, nor
a duplicate of it), what is drawn and when, which negatives a batch's pairs get, and how the lists travel in
a checkpoint. The loss they enter: tests/kernels/test_loss_hard_negatives.py; through the trainer on 1 and 2 ranks
and across a resume: tests/train/test_hard_negatives_training.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldot.data.loader import TrainLoader, tokenize
from ldot.data.writer import DatasetWriter
from ldot.train.config import HardNegativesConfig, LossConfig, ModelConfig
from ldot.train.errors import ConfigError
from ldot.train.hard_negatives import FILE, HardNegatives, default_pool
from ldot.train.model_setup import build_dual_encoder

D = 8


def _with_duplicates(out, n=12):
    """n samples; sample k + n/2 is a second sample of image k (same image_id, same features, other captions)."""
    rng = np.random.default_rng(0)
    half = n // 2
    feats = [rng.standard_normal((4, D)).astype(np.float16) for _ in range(half)]
    box = np.array([[0.1, 0.1, 0.5, 0.5]] * 4, np.float32)
    with DatasetWriter(out, feature_dim=D, source="test", split="train", shard_size=5, command="pytest") as w:
        for k in range(n):
            meta = {"image_id": f"img{k % half}", "captions": [f"picture {k} line {i}" for i in range(2)],
                    "split": "train", "source": "test"}
            w.write(feats[k % half], box, meta)
    return out


def _model(tiny_text_encoder, feature_dim=D):
    torch.manual_seed(0)
    return build_dual_encoder(ModelConfig(text_encoder=tiny_text_encoder, image_layers=1, dropout=0.0),
                              LossConfig(scale="fixed", init_scale=10.0, normalize=True), feature_dim)


def _hard(data, tok, steps_per_epoch=4, **cfg):
    return HardNegatives(HardNegativesConfig(**cfg), data, tok, max_text_len=16, seed=3,
                         steps_per_epoch=steps_per_epoch)


def _mine(hard, model, step=1):
    hard.mine(model, step, device=torch.device("cpu"), distributed=False, sharded=False)


def test_neither_the_positive_nor_a_duplicate_of_it_is_mined(tmp_path, tiny_text_encoder):
    data = _with_duplicates(tmp_path / "dup")
    tok, model = _model(tiny_text_encoder)
    # every image but the positive's two samples: the whole pool is kept, so anything not excluded shows
    hard = _hard(data, tok, num_hard_negatives=10, sampling="top")
    assert hard.pool == 10
    _mine(hard, model)
    ids = np.asarray(hard.split.image_ids)
    cap_img = hard.caption_image
    assert hard.txt2img.shape == (24, 10) and hard.img2txt.shape == (12, 10)
    for c, negatives in enumerate(hard.txt2img):
        assert not np.isin(ids[negatives], ids[cap_img[c]]).any(), (c, negatives)
    for r, negatives in enumerate(hard.img2txt):
        assert not np.isin(ids[cap_img[negatives]], ids[r]).any(), (r, negatives)
        assert len(set(negatives.tolist())) == 10
    # the loss knows duplicates by group: one group per image_id
    assert (hard.key[:6] == np.arange(6)).all() and (hard.key[6:] == np.arange(6)).all()


def _with_shared_captions(out, n=10):
    """n images; every even one has the caption "a shape on grey" (in its own case and spacing) beside its own."""
    rng = np.random.default_rng(1)
    box = np.array([[0.1, 0.1, 0.5, 0.5]] * 4, np.float32)
    with DatasetWriter(out, feature_dim=D, source="test", split="train", shard_size=4, command="pytest") as w:
        for k in range(n):
            shared = ["A shape  on grey", "a shape on grey"][k % 4 // 2] if k % 2 == 0 else f"picture {k} alone"
            meta = {"image_id": f"img{k}", "captions": [shared, f"picture {k} second"], "split": "train",
                    "source": "test"}
            w.write(rng.standard_normal((4, D)).astype(np.float16), box, meta)
    return out


def test_exclude_same_text_never_mines_an_image_that_says_the_query_caption(tmp_path, tiny_text_encoder, caplog):
    data = _with_shared_captions(tmp_path / "shared")
    tok, model = _model(tiny_text_encoder)
    holders = {0, 2, 4, 6, 8}  # the images holding "a shape on grey"
    # the whole pool (all 9 other images; all 18 other captions): what the rule keeps out shows
    every = _hard(data, tok, num_hard_negatives=9, sampling="top")
    _mine(every, model)
    assert holders - {0} <= set(every.txt2img[0].tolist())  # caption 0 is image 0's "a shape on grey"
    with caplog.at_level("INFO", logger="ldot.train"):
        hard = _hard(data, tok, num_hard_negatives=5, sampling="top", pool=9, exclude_same_text=True)
    assert "5 of 20 captions share their text with another image" in caplog.text
    _mine(hard, model)
    for c in range(20):
        image = int(hard.caption_image[c])
        expect_out = holders if (c % 2 == 0 and image in holders) else {image}
        assert not expect_out & set(hard.txt2img[c].tolist()), (c, hard.txt2img[c])
    for r in range(10):
        words = {hard.split.captions[c].lower().replace("  ", " ") for c in hard.img2txt[r]}
        assert r not in holders or "a shape on grey" not in words, (r, words)  # a text image r holds
        assert not (hard.caption_image[hard.img2txt[r]] == r).any()


def test_a_pool_too_small_for_k_is_refused(tmp_path, tiny_text_encoder):
    data = _with_duplicates(tmp_path / "dup")
    tok, _ = _model(tiny_text_encoder)
    with pytest.raises(ConfigError, match="has only 10 images besides"):
        _hard(data, tok, num_hard_negatives=11)
    assert default_pool(2) == 50 and default_pool(31) == 72 and default_pool(600) == 1000


def test_draws_and_schedule(tmp_path, tiny_text_encoder, tiny_shards):
    tok, model = _model(tiny_text_encoder, 1280)
    top = _hard(tiny_shards / "train", tok, num_hard_negatives=3, sampling="top")
    _mine(top, model, step=1)
    rand = _hard(tiny_shards / "train", tok, num_hard_negatives=3)
    _mine(rand, model, step=1)
    first = rand.txt2img.copy()
    _mine(rand, model, step=1)
    assert (rand.txt2img == first).all()  # a function of (seed, step)
    _mine(rand, model, step=9)
    assert (rand.txt2img != first).any()  # a new round, a new draw from the same pools
    assert rand.pool == 50 and top.pool == 50
    # random K come from the pool: the first 50 of the ranking, which `top`'s first 3 lead
    assert (rand.txt2img >= 0).all() and (top.txt2img >= 0).all()
    # schedule: every epoch (4 steps) from step 5, or from step 1 with mine_at_start; or every N steps
    assert [s for s in range(1, 14) if top.due(s)] == [5, 9, 13]
    assert [s for s in range(1, 8) if _hard(tiny_shards / "train", tok, num_hard_negatives=1, mine_at_start=True,
                                            every_steps=3).due(s)] == [1, 4, 7]
    with pytest.raises(ConfigError, match="set hard_negatives.every_steps"):
        _hard(tiny_shards / "train", tok, steps_per_epoch=None, num_hard_negatives=1)


def test_each_pair_gets_its_captions_and_its_images_negatives(tiny_text_encoder, tiny_shards):
    tok, _ = _model(tiny_text_encoder, 1280)
    hard = _hard(tiny_shards / "train", tok, num_hard_negatives=2)
    n_img, n_cap = hard.split.num_images, len(hard.caption_image)
    # distinct, recognizable lists: caption c -> images (c + 1, c + 2) mod n; image r -> captions (5r + 7, 5r + 9)
    hard.txt2img = np.stack([(np.arange(n_cap) + 1) % n_img, (np.arange(n_cap) + 2) % n_img], 1)
    hard.img2txt = np.stack([(5 * np.arange(n_img) + 7) % n_cap, (5 * np.arange(n_img) + 9) % n_cap], 1)
    batch = next(iter(TrainLoader(tiny_shards / "train", tok, batch_size=4, max_text_len=16, seed=5)))
    out = hard.attach(batch)
    rows = batch["group_ids"].numpy()
    captions = hard.first_caption[rows] + batch["caption_index"].numpy()
    # the caption index is the caption the pair trains on
    assert torch.equal(tokenize(tok, [hard.split.captions[c] for c in captions], 16)["input_ids"],
                       batch["input_ids"])
    want_images = hard.txt2img[captions].reshape(-1)
    want = hard.store.batch(want_images.tolist())
    n = want["img_feat"].shape[1]
    assert torch.equal(out["hard_img_feat"][:, :n], want["img_feat"]) and torch.equal(out["hard_img_mask"][:, :n],
                                                                                         want["img_mask"])
    want_captions = hard.img2txt[rows].reshape(-1)
    assert torch.equal(out["hard_input_ids"],
                       tokenize(tok, [hard.split.captions[c] for c in want_captions], 16)["input_ids"])
    assert out["hard_image_groups"].tolist() == hard.key[want_images].reshape(4, 2).tolist()
    assert out["hard_text_groups"].tolist() == hard.key[hard.caption_image[want_captions]].reshape(4, 2).tolist()
    assert torch.equal(out["group_ids"], torch.from_numpy(hard.key[rows]))
    # before the first mining the batch goes through as it is
    hard.txt2img = hard.img2txt = None
    assert not any(k.startswith("hard_") for k in hard.attach(batch))


def test_the_lists_travel_in_a_checkpoint(tmp_path, tiny_text_encoder, tiny_shards):
    tok, model = _model(tiny_text_encoder, 1280)
    hard = _hard(tiny_shards / "train", tok, num_hard_negatives=2)
    assert hard.state_bytes() is None  # nothing mined yet: nothing to save
    _mine(hard, model, step=5)
    (tmp_path / FILE).write_bytes(hard.state_bytes())
    again = _hard(tiny_shards / "train", tok, num_hard_negatives=2)
    again.load(tmp_path)
    assert again.mined_at == 5 and (again.txt2img == hard.txt2img).all() and (again.img2txt == hard.img2txt).all()
    other = _hard(tiny_shards / "train", tok, num_hard_negatives=3)
    with pytest.raises(ConfigError, match="num_hard_negatives or data.train changed"):
        other.load(tmp_path)
    again.load(tmp_path / "nothing-here")  # a checkpoint from before the first mining
    assert again.txt2img is None and again.mined_at is None


def test_the_objective_scores_every_caption_against_every_pairs_hard_images(tiny_text_encoder, tiny_shards):
    """Objectives.cmr_hard on a batch with its hard negatives attached equals a float64 reference built here
    from the model's own embeddings of the pairs and of the hard items, each encoded on its own: the caption
    rows against [the batch's images, every pair's hard images], the image rows against [the batch's
    captions, every pair's hard captions], same-image columns other than the positive left out."""
    from ldot.train.objectives import Objectives

    tok, model = _model(tiny_text_encoder, 1280)
    hard = _hard(tiny_shards / "train", tok, num_hard_negatives=3)
    _mine(hard, model)
    # a duplicate of a positive among the hard images: the image of the batch's pair 1 for pair 0
    batch = hard.attach(next(iter(TrainLoader(tiny_shards / "train", tok, batch_size=5, max_text_len=16, seed=2))))
    rows = batch["group_ids"].tolist()
    hard.txt2img[hard.first_caption[rows[0]] + int(batch["caption_index"][0]), 0] = rows[1]
    batch = hard.attach({k: v for k, v in batch.items() if not k.startswith("hard_")})
    loss = Objectives(model, tok)("cmr", batch, None)

    with torch.no_grad():
        t = model.encode_text(batch["input_ids"], batch["attention_mask"]).double()
        i = model.encode_image(batch["img_feat"], batch["img_pos"], batch["img_mask"]).double()
        ht = model.encode_text(batch["hard_input_ids"], batch["hard_attention_mask"]).double()
        hi = model.encode_image(batch["hard_img_feat"], batch["hard_img_pos"], batch["hard_img_mask"]).double()
        scale = float(model.contrastive.logit_scale())
    g = batch["group_ids"]
    total = 0.0
    for rows_, cols, col_groups in ((t, torch.cat([i, hi]), torch.cat([g, batch["hard_image_groups"].reshape(-1)])),
                                    (i, torch.cat([t, ht]), torch.cat([g, batch["hard_text_groups"].reshape(-1)]))):
        logits = scale * rows_ @ cols.T
        n = len(rows_)
        own = torch.arange(len(cols))[None, :] == torch.arange(n)[:, None]
        logits = logits.masked_fill((g[:, None] == col_groups[None, :]) & ~own, float("-inf"))
        total = total + torch.nn.functional.cross_entropy(logits, torch.arange(n), reduction="sum")
    reference = total / (2 * len(g))
    assert float(loss.detach()) == pytest.approx(float(reference), rel=1e-5)
    assert (batch["hard_image_groups"][0, 0] == g[1]).item()  # the duplicate is in, and the reference drops it
