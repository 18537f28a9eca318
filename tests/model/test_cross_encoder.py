"""The cross-encoder re-ranker: UNITER's weights compute UNITER's ITM score (against a reimplementation of
UNITER's single-stream forward, text and regions gathered without padding between them); the export
loads back to the same scores and is told apart from a dual encoder by its ldot.json."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ldot.data.schema import region_positions
from ldot.model import ModelError, export_cross_encoder, load_cross_encoder, load_dual_encoder, read_export_meta
from ldot.model.lightningdot import cross_encoder_from_uniter, load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _lightningdot_tests():
    """tests/model/test_lightningdot.py: its tiny UNITER modules and the original layer forward."""
    spec = importlib.util.spec_from_file_location("ldot_original", REPO / "tests" / "model" / "test_lightningdot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LD = _lightningdot_tests()


def uniter_itm(u, itm: nn.Linear, ids, txt_mask, feat, pos7, img_mask, row: int):
    """UNITER's UniterForImageTextRetrieval score, pair by pair as UNITER gathers them: the caption's real
    tokens, then the image's real regions, no padding in between; tanh pooler on [CLS]; itm row `row`."""
    e, ie = u.embeddings, u.img_embeddings
    out = []
    for b in range(len(ids)):
        t = ids[b][txt_mask[b].bool()][None]
        txt = e.LayerNorm(e.word_embeddings(t) + e.position_embeddings(torch.arange(t.shape[1]))
                          + e.token_type_embeddings(torch.zeros_like(t)))
        k = int(img_mask[b].sum())
        img = ie.LayerNorm(ie.img_layer_norm(ie.img_linear(feat[b:b + 1, :k]))
                           + ie.pos_layer_norm(ie.pos_linear(pos7[b:b + 1, :k]))
                           + e.token_type_embeddings(torch.ones(1, k, dtype=torch.long)))
        x = torch.cat([txt, img], 1)
        for layer in u.encoder.layer:
            x = LD.layer_forward(layer, x, torch.ones(1, x.shape[1]))
        out.append(itm(torch.tanh(u.pooler.dense(x[:, 0])))[0, row])
    return torch.stack(out)


def pairs(tokenizer):
    """3 (caption, image) pairs of different text lengths and region counts: padding in both parts."""
    enc = tokenizer(["A man riding a horse on the beach .", "two cats", "The red bus"], padding=True,
                    return_tensors="pt")
    rng = np.random.default_rng(0)
    n = [7, 3, 5]
    feat, pos7, mask = torch.zeros(3, 7, LD.IMG_DIM), torch.zeros(3, 7, 7), torch.zeros(3, 7, dtype=torch.long)
    for i, k in enumerate(n):
        xy = rng.uniform(0, 0.5, (k, 2)).astype(np.float32)
        box = np.concatenate([xy, xy + rng.uniform(0.1, 0.5, (k, 2)).astype(np.float32)], 1)
        feat[i, :k] = torch.from_numpy(rng.standard_normal((k, LD.IMG_DIM)).astype(np.float32))
        pos7[i, :k] = torch.from_numpy(region_positions(box))
        mask[i, :k] = 1
    return enc["input_ids"], enc["attention_mask"], feat, pos7, mask


@pytest.mark.parametrize("head", ["itm_output", "rank_output"])
def test_uniter_weights_compute_uniters_itm_score(tmp_path, head):
    """uniter-base.pt (pretraining ITM head: its "match" row starts the score, as UNITER's init_output) or
    a UNITER retrieval checkpoint (rank_output): the cross-encoder's logit is UNITER's, on pairs whose
    text and regions are padded differently."""
    m = LD.bi_encoder(LD.vocab_size(), seed=3)
    u = m.img_model.bert
    torch.manual_seed(1)
    itm = nn.Linear(LD.H, 2 if head == "itm_output" else 1)
    sd = {f"bert.{k}": v for k, v in u.state_dict().items()}
    sd.update({f"{head}.{k}": v for k, v in itm.state_dict().items()})
    sd["cls.predictions.bias"] = torch.zeros(LD.vocab_size())  # UNITER's other pretraining heads beside it
    sd["feat_regress.weight"] = torch.zeros(LD.IMG_DIM, LD.H)
    torch.save(sd, tmp_path / "uniter.pt")

    model = cross_encoder_from_uniter(tmp_path / "uniter.pt", num_heads=LD.HEADS).eval()
    ids, txt_mask, feat, pos7, img_mask = pairs(load_tokenizer(LD.write_vocab(tmp_path / "vocab.txt")))
    with torch.no_grad():
        got = model(ids, txt_mask, feat, pos7, img_mask)
        want = uniter_itm(u, itm, ids, txt_mask, feat, pos7, img_mask, row=1 if head == "itm_output" else 0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert model.config.feature_dim == LD.IMG_DIM and model.config.num_hidden_layers == LD.LAYERS


def test_uniter_without_an_itm_head_is_one_line(tmp_path):
    m = LD.bi_encoder(LD.vocab_size())
    torch.save({f"bert.{k}": v for k, v in m.img_model.bert.state_dict().items()}, tmp_path / "u.pt")
    with pytest.raises(ModelError, match="no ITM head"):
        cross_encoder_from_uniter(tmp_path / "u.pt", num_heads=LD.HEADS)


def test_export_loads_back_and_says_what_it_is(tmp_path, tiny_text_encoder):
    from transformers import AutoTokenizer, BertModel

    from ldot.model.cross_encoder import CROSS_FORMAT, cross_encoder_from_bert

    torch.manual_seed(0)
    text = BertModel.from_pretrained(tiny_text_encoder, add_pooling_layer=False)
    model = cross_encoder_from_bert(text, feature_dim=LD.IMG_DIM).eval()
    model.keep_layers(1)
    tok = AutoTokenizer.from_pretrained(tiny_text_encoder)
    export_cross_encoder(model, tok, tmp_path / "x", {"feature_dim": LD.IMG_DIM, "max_text_len": 24})
    assert read_export_meta(tmp_path / "x")["format"] == CROSS_FORMAT
    tok2, loaded, meta = load_cross_encoder(tmp_path / "x")
    assert meta["layers"] == 1 and meta["max_text_len"] == 24 and not loaded.training
    ids, txt_mask, feat, pos7, img_mask = pairs(tok)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, txt_mask, feat, pos7, img_mask), model(ids, txt_mask, feat, pos7, img_mask))
    with pytest.raises(ModelError, match="not a dual encoder"):
        load_dual_encoder(tmp_path / "x")
