"""task=rerank's data and objective: every training image becomes its two query lists of mined negatives
(`ldot eval mine`'s real files), drawn the same however a global batch is split over ranks; the listwise
ITM loss is the float64 softmax cross-entropy computed by hand; bad mined files and configs are one line."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ldot.data.loader import load_eval_split
from ldot.eval.hard_negatives import mine, write_jsonl
from ldot.eval.image_store import ImageStore
from ldot.eval.recall import topk_from_embeddings
from ldot.train.config import load_config
from ldot.train.errors import ConfigError
from ldot.train.rerank import MinedNegatives, RerankBatches, list_metrics, listwise_itm_loss

REPO = Path(__file__).resolve().parents[2]
K = 3


def _datafixtures():
    spec = importlib.util.spec_from_file_location("datafixtures", REPO / "tests" / "data" / "datafixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    """12 images with 3 captions each (random features), mined by `eval mine`'s own functions from a random
    first stage's exact top-k."""
    out = tmp_path_factory.mktemp("rerank")
    data = _datafixtures().write_random_dataset(out / "train", 12, shard_size=5, captions=3, regions=(3, 6))
    split = load_eval_split(data)
    rng = np.random.default_rng(0)
    img = rng.standard_normal((split.num_images, 6)).astype(np.float32)
    txt = (img[split.caption_image] + rng.standard_normal((len(split.captions), 6))).astype(np.float32)
    top = topk_from_embeddings(txt, img, split.caption_image, 6)
    write_jsonl(out / "mined", split, mine(top, split.caption_image, 6))
    return data, split, out / "mined"


@pytest.fixture(scope="module")
def batches(mined, tiny_text_encoder):
    from transformers import AutoTokenizer

    data, split, mined_dir = mined
    tok = AutoTokenizer.from_pretrained(tiny_text_encoder)
    return RerankBatches(None, MinedNegatives(mined_dir, split), ImageStore(data, split.keys), tok, negatives=K,
                         from_top=None, seed=0, max_text_len=16), tok


def _pairs(batch, tok, store):
    """(caption text, image row) of every pair, the row found by its region features."""
    feats = {r: store.regions(r)[0] for r in range(len(store))}
    texts = tok.batch_decode(batch["input_ids"], skip_special_tokens=True)
    rows = []
    for p in range(len(texts)):
        n = int(batch["img_mask"][p].sum())
        rows.append(next(r for r, f in feats.items() if f.shape[0] == n
                         and np.allclose(f, batch["img_feat"][p, :n].numpy())))
    return list(zip(texts, rows))


def test_each_image_gives_a_text_list_and_an_image_list_of_mined_negatives(batches, mined):
    rb, tok = batches
    data, split, _ = mined
    rows = [4, 0, 7, 11]
    b = rb.make(rows, [split.image_ids[r] for r in rows], index=5)
    assert b["input_ids"].shape[0] == len(rows) * (2 * K + 1) and b["lists"].shape == (2 * len(rows), 1 + K)
    pairs = _pairs(b, tok, rb.store)
    m = rb.mined
    for j, r in enumerate(rows):
        t2i, i2t = b["lists"][2 * j].tolist(), b["lists"][2 * j + 1].tolist()
        assert t2i[0] == i2t[0] and -1 not in t2i + i2t  # one shared positive; 6 mined, so K each way
        caption, row = pairs[t2i[0]]
        assert row == r and caption in split.captions[m.first[r]:m.first[r] + m.count[r]]
        c = split.captions.index(caption)
        negs = [pairs[p] for p in t2i[1:]]
        assert all(t == caption for t, _ in negs) and len({i for _, i in negs}) == K
        assert {i for _, i in negs} <= set(m.txt2img[c].tolist()) and r not in {i for _, i in negs}
        negs = [pairs[p] for p in i2t[1:]]
        assert all(i == r for _, i in negs)
        allowed = {split.captions[int(x)] for x in m.img2txt[r]}
        assert {t for t, _ in negs} <= allowed and not {t for t, _ in negs} & set(split.captions[m.first[r]:m.first[r] + 3])


def test_random_negatives_join_each_list(batches, mined):
    """rerank.random: R more candidates per list, drawn from the whole set, never a positive or a repeat."""
    rb, tok = batches
    split = mined[1]
    rows = [2, 5, 8]
    rb.random = 2
    try:
        b = rb.make(rows, [split.image_ids[r] for r in rows], index=0)
    finally:
        rb.random = 0
    assert b["lists"].shape == (6, 1 + K + 2) and int((b["lists"] < 0).sum()) == 0
    pairs = _pairs(b, tok, rb.store)
    for j, r in enumerate(rows):
        t2i, i2t = b["lists"][2 * j].tolist(), b["lists"][2 * j + 1].tolist()
        images = [pairs[p][1] for p in t2i]
        assert images[0] == r and len(set(images)) == len(images)
        captions = [pairs[p][0] for p in i2t]
        own = split.captions[rb.mined.first[r]:rb.mined.first[r] + 3]
        assert captions[0] in own and not set(captions[1:]) & set(own) and len(set(captions)) == len(captions)


def test_random_negatives_alone_when_k_is_0(batches, mined):
    """rerank.negatives=0 with rerank.random=R: lists of 1 + R, none from the mined lists' order (UNITER's ITM
    pretraining draws its negatives at random); with 12 images the random ones must reach beyond the top 6."""
    rb, tok = batches
    split = mined[1]
    rows = list(range(12))
    rb.k, rb.random = 0, 3
    try:
        b = rb.make(rows, [split.image_ids[r] for r in rows], index=1)
    finally:
        rb.k, rb.random = K, 0
    assert b["lists"].shape == (24, 4) and int((b["lists"] < 0).sum()) == 0
    assert b["input_ids"].shape[0] == 12 * 7
    pairs = _pairs(b, tok, rb.store)
    outside = 0
    for j, r in enumerate(rows):
        t2i = b["lists"][2 * j].tolist()
        images = [pairs[p][1] for p in t2i]
        assert images[0] == r and r not in images[1:] and len(set(images)) == 4
        c = split.captions.index(pairs[t2i[0]][0])
        outside += len(set(images[1:]) - set(rb.mined.txt2img[c].tolist()))
    assert outside > 0


def test_draws_are_the_same_however_the_batch_is_split(batches, mined):
    """A rank's half of a global batch gets the pairs the global batch gives its images (2 ranks == 1)."""
    rb, tok = batches
    split = mined[1]
    rows = [3, 9, 1, 6]
    ids = [split.image_ids[r] for r in rows]
    whole = _pairs(rb.make(rows, ids, index=2), tok, rb.store)
    halves = _pairs(rb.make(rows[:2], ids[:2], index=2), tok, rb.store) + _pairs(rb.make(rows[2:], ids[2:], index=2),
                                                                                  tok, rb.store)
    assert halves == whole
    assert _pairs(rb.make(rows, ids, index=3), tok, rb.store) != whole  # a new step draws anew
    with pytest.raises(ConfigError, match="another dataset"):
        rb.make(rows, list(reversed(ids)), index=2)


def test_listwise_loss_is_the_softmax_cross_entropy_of_each_list():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal(10)
    lists = np.array([[0, 1, 2, 3], [0, 4, 5, -1], [6, 7, 8, 9], [6, -1, -1, -1]])
    want = np.mean([np.log(np.exp(scores[row[row >= 0]]).sum()) - scores[row[0]] for row in lists])
    got = listwise_itm_loss(torch.tensor(scores, dtype=torch.float32, requires_grad=True), torch.tensor(lists))
    assert got.item() == pytest.approx(want, rel=1e-6)
    got.backward()  # padding carries no gradient into a finite loss


def test_validation_list_metrics_are_each_lists_softmax_by_hand(batches, mined, tiny_text_encoder):
    """val/list_loss and val/list_top1 (task=rerank's periodic validation): every image's two lists as the
    loader's batch 0 draws them, each pair scored alone in float64, the loss and top-1 by hand; the same
    however the images are batched, and in eval mode (dropout off) whatever mode the model was in."""
    from transformers import BertModel

    from ldot.model.cross_encoder import cross_encoder_from_bert

    rb, _ = batches
    split = mined[1]
    torch.manual_seed(0)
    model = cross_encoder_from_bert(BertModel.from_pretrained(tiny_text_encoder), rb.store.feature_dim, dropout=0.3)
    rows = list(range(split.num_images))
    model.train()
    got = list_metrics(model, rb, rows, batch_images=5)
    assert model.training
    assert list_metrics(model, rb, rows, batch_images=12) == pytest.approx(got, rel=1e-5)
    ref = model.double().eval()
    losses, top1 = [], []
    for r in rows:
        b = rb.make([r], None, 0)
        with torch.no_grad():
            scores = [ref(b["input_ids"][p:p + 1], b["attention_mask"][p:p + 1], b["img_feat"][p:p + 1].double(),
                          b["img_pos"][p:p + 1].double(), b["img_mask"][p:p + 1]).item() for p in range(len(b["input_ids"]))]
        for row in b["lists"].tolist():
            s = np.array([scores[p] for p in row if p >= 0])
            losses.append(np.log(np.exp(s).sum()) - s[0])
            top1.append(s.argmax() == 0)
    model.float()
    assert got["list_loss"] == pytest.approx(np.mean(losses), rel=1e-4)
    assert got["list_top1"] == pytest.approx(np.mean(top1))
    assert 0 < got["list_top1"] < 1  # the lists discriminate: neither all right nor all wrong


def test_bad_mined_files_are_one_line(tmp_path, mined):
    data, split, mined_dir = mined
    for name in ("txt2img.jsonl", "img2txt.jsonl"):
        (tmp_path / name).write_text((mined_dir / name).read_text())
    (tmp_path / "txt2img.jsonl").write_text((mined_dir / "txt2img.jsonl").read_text().replace('"img3"', '"imgX"', 1))
    with pytest.raises(ConfigError, match=r"txt2img.jsonl:\d+: image_id 'imgX' is not in"):
        MinedNegatives(tmp_path, split)
    lines = (mined_dir / "img2txt.jsonl").read_text().splitlines()
    (tmp_path / "txt2img.jsonl").write_text((mined_dir / "txt2img.jsonl").read_text())
    (tmp_path / "img2txt.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ConfigError, match="lacks 1 of"):
        MinedNegatives(tmp_path, split)
    (tmp_path / "img2txt.jsonl").write_text("\n".join(lines[:3] + ["{not json"]) + "\n")
    with pytest.raises(ConfigError, match=r"img2txt.jsonl:4: not a mined record"):
        MinedNegatives(tmp_path, split)
    with pytest.raises(ConfigError, match="not found"):
        MinedNegatives(tmp_path / "nowhere", split)


def test_rerank_config_is_checked():
    base = ["data.train=x", "task=rerank"]
    with pytest.raises(ConfigError, match="needs rerank.mined"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="data.token_budget does not apply"):
        load_config(None, base + ["rerank.mined=m", "data.token_budget=512"])
    with pytest.raises(ConfigError, match="rerank.uniter needs model.tokenizer"):
        load_config(None, base + ["rerank.mined=m", "rerank.uniter=u.pt"])
    with pytest.raises(ConfigError, match="both 0: a list needs a negative"):
        load_config(None, base + ["rerank.mined=m", "rerank.negatives=0"])
    assert load_config(None, base + ["rerank.mined=m", "rerank.negatives=0", "rerank.random=4"]).rerank.negatives == 0
    with pytest.raises(ConfigError, match="rerank.from_top=2 is below"):
        load_config(None, base + ["rerank.mined=m", "rerank.from_top=2"])
    with pytest.raises(ConfigError, match="eval.every_steps with task=rerank needs rerank.val_mined"):
        load_config(None, base + ["rerank.mined=m", "data.val=v", "eval.every_steps=5"])
    with pytest.raises(ConfigError, match="rerank.val_mined is read only with eval.every_steps"):
        load_config(None, base + ["rerank.mined=m", "data.val=v", "rerank.val_mined=vm"])
    with pytest.raises(ConfigError, match="needs data.val"):
        load_config(None, base + ["rerank.mined=m", "rerank.val_mined=vm", "eval.every_steps=5"])
    cfg = load_config(REPO / "train" / "configs" / "rerank-demo.yaml", ["data.train=x", "rerank.mined=m"])
    assert cfg.task == "rerank" and cfg.rerank.layers == 1
    cfg = load_config(REPO / "train" / "configs" / "rerank-paper.yaml")
    assert cfg.task == "rerank" and cfg.rerank.negatives == 31 and cfg.rerank.uniter


def test_a_reranker_starts_from_an_exported_reranker(tmp_path, tiny_text_encoder):
    """rerank.init_from naming a re-ranker export starts all of it, ITM head included (UNITER's way: ITM
    pretraining, then retrieval fine-tuning); a dual encoder export starts only the text side and regions."""
    from ldot.model import export_cross_encoder
    from ldot.train.config import ModelConfig, RerankConfig
    from ldot.train.model_setup import build_cross_encoder

    cfg = ModelConfig(text_encoder=tiny_text_encoder, dropout=0.0)
    torch.manual_seed(0)
    tok, first = build_cross_encoder(cfg, RerankConfig(mined="m"), 16)
    with torch.no_grad():
        for p in first.parameters():  # as if trained: nothing left at a fresh initialization
            p.add_(torch.randn_like(p))
    export = export_cross_encoder(first.eval(), tok, tmp_path / "first", {"feature_dim": 16, "max_text_len": 32})
    torch.manual_seed(1)
    _, again = build_cross_encoder(cfg, RerankConfig(mined="m", init_from=str(export)), 16)
    assert again.training
    want, got = first.state_dict(), again.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    _, one = build_cross_encoder(cfg, RerankConfig(mined="m", init_from=str(export), layers=1), 16)
    assert len(one.encoder.layer) == 1 < len(first.encoder.layer)
    assert all(torch.equal(v, want[k]) for k, v in one.state_dict().items())
    with pytest.raises(ConfigError, match="trained on 16-d features, the data has 8"):
        build_cross_encoder(cfg, RerankConfig(mined="m", init_from=str(export)), 8)
