"""model/lightningdot.py: LightningDOT's released checkpoints, written here at a tiny size with the original's
key names, imported and checked against a reimplementation of the original forward.

The reference below is written from the paper and the original code's module structure (UNITER's
embeddings and post-LN BERT layers, DPR-style encode_proj on out[:, 0]); it shares no code with
ldot.model. Its modules carry the original's attribute names, so their state_dict() is the original's
key layout.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ldot.data.schema import region_positions
from ldot.model import ModelError, load_dual_encoder
from ldot.model.lightningdot import (bert_text_encoder, import_lightningdot, load_tokenizer,
                                     uniter_image_encoder)

REPO = Path(__file__).resolve().parents[2]
REAL_VOCAB = REPO.parent / "shared" / "data" / "vocab" / "bert-base-cased-vocab.txt"
H, HEADS, INTER, LAYERS, IMG_DIM, PROJ = 16, 2, 24, 2, 12, 10
WORDS = ["a", "man", "riding", "horse", "dog", "on", "the", "beach", "red", "bus", "street", "two", "cats", ".",
         "A", "The", "##s", "small", "child"]


# ------------------------------------------------------------------ the original, reimplemented


def gelu(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class Named(nn.Module):
    """A container whose children are given by name (the original's attribute names)."""

    def __init__(*args, **children):
        module, *_ = args  # the original names a child `self` (BertAttention.self)
        nn.Module.__init__(module)
        for k, v in children.items():
            setattr(module, k, v)


def ln():
    return nn.LayerNorm(H, eps=1e-12)


def bert_layer():
    return Named(attention=Named(self=Named(query=nn.Linear(H, H), key=nn.Linear(H, H), value=nn.Linear(H, H)),
                                 output=Named(dense=nn.Linear(H, H), LayerNorm=ln())),
                 intermediate=Named(dense=nn.Linear(H, INTER)),
                 output=Named(dense=nn.Linear(INTER, H), LayerNorm=ln()))


def layer_forward(layer, x, mask):
    """BERT's post-LN layer with the original's additive mask (1 - m) * -10000."""
    b, n, _ = x.shape
    a = layer.attention.self
    heads = lambda t: t.view(b, n, HEADS, H // HEADS).transpose(1, 2)  # noqa: E731
    q, k, v = heads(a.query(x)), heads(a.key(x)), heads(a.value(x))
    scores = q @ k.transpose(-1, -2) / math.sqrt(H // HEADS) + (1.0 - mask[:, None, None, :].float()) * -10000.0
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, H)
    x = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + x)
    return layer.output.LayerNorm(layer.output.dense(gelu(layer.intermediate.dense(x))) + x)


def encode_proj():
    return nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.LayerNorm(2 * H, eps=1e-12), nn.Linear(2 * H, PROJ))


def text_embeddings(vocab):
    return Named(word_embeddings=nn.Embedding(vocab, H), position_embeddings=nn.Embedding(40, H),
                 token_type_embeddings=nn.Embedding(2, H), LayerNorm=ln())


def uniter(vocab):
    return Named(embeddings=text_embeddings(vocab),
                 img_embeddings=Named(img_linear=nn.Linear(IMG_DIM, H), img_layer_norm=ln(), pos_layer_norm=ln(),
                                      pos_linear=nn.Linear(7, H), mask_embedding=nn.Embedding(2, IMG_DIM),
                                      LayerNorm=ln()),
                 encoder=Named(layer=nn.ModuleList(bert_layer() for _ in range(LAYERS))),
                 pooler=Named(dense=nn.Linear(H, H)))


def bert(vocab):
    return Named(embeddings=text_embeddings(vocab), encoder=Named(layer=nn.ModuleList(bert_layer() for _ in range(LAYERS))),
                 pooler=Named(dense=nn.Linear(H, H)))


def bi_encoder(vocab, seed=0):
    torch.manual_seed(seed)
    m = Named(img_model=Named(bert=uniter(vocab), encode_proj=encode_proj()),
              txt_model=Named(bert=bert(vocab), encode_proj=encode_proj()))
    with torch.no_grad():  # away from identity/zero so that a mixed-up LayerNorm or a dropped bias shows
        for name, p in m.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("LayerNorm.weight") or "norm.weight" in name
                    else 0.5 * torch.randn_like(p))
    return m.eval()


def original_text(txt_model, ids, mask):
    e = txt_model.bert.embeddings
    pos = torch.arange(ids.shape[1])
    x = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(pos) + e.token_type_embeddings(torch.zeros_like(ids)))
    for layer in txt_model.bert.encoder.layer:
        x = layer_forward(layer, x, mask)
    return txt_model.encode_proj(x[:, 0])


def original_image(img_model, feat, pos7, region_mask):
    e, ie = img_model.bert.embeddings, img_model.bert.img_embeddings
    b = feat.shape[0]
    cls = torch.full((b, 1), 101)
    txt = e.LayerNorm(e.word_embeddings(cls) + e.position_embeddings(torch.zeros_like(cls))
                      + e.token_type_embeddings(torch.zeros_like(cls)))
    img = ie.LayerNorm(ie.img_layer_norm(ie.img_linear(feat)) + ie.pos_layer_norm(ie.pos_linear(pos7))
                       + e.token_type_embeddings(torch.ones(feat.shape[:2], dtype=torch.long)))
    x = torch.cat([txt, img], 1)
    mask = torch.cat([torch.ones(b, 1), region_mask], 1)
    for layer in img_model.bert.encoder.layer:
        x = layer_forward(layer, x, mask)
    return img_model.encode_proj(x[:, 0])


# ------------------------------------------------------------------ tiny faithful files


def write_vocab(path: Path) -> Path:
    """BERT's layout: [PAD] 0, [unused] 1-99, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, then words."""
    lines = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    path.write_text("\n".join(lines) + "\n")
    return path


def vocab_size():
    return 104 + len(WORDS)


def save_pretrained_layout(m, path: Path, dtype) -> Path:
    """LightningDot.pt: the pretraining model's plain state dict, bi-encoder under bert., heads beside it."""
    sd = {f"bert.{k}": v.to(dtype) for k, v in m.state_dict().items()}
    sd["cls.predictions.bias"] = torch.zeros(vocab_size(), dtype=dtype)
    sd["cls.predictions.transform.dense.weight"] = torch.zeros(H, H, dtype=dtype)
    sd["feat_regress.weight"] = torch.zeros(IMG_DIM, H, dtype=dtype)
    sd["region_classifier.net.3.weight"] = torch.zeros(5, H, dtype=dtype)
    sd["itm_output.weight"] = torch.zeros(2, H, dtype=dtype)
    torch.save(sd, path)
    return path


def save_finetuned_layout(m, path: Path, dtype) -> Path:
    """coco-ft.pt / flickr-ft.pt: {model_dict, optimizer, scheduler, epoch, offset}."""
    sd = {k: v.to(dtype) for k, v in m.state_dict().items()}
    torch.save({"model_dict": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 2e-5, "params": [0, 1]}]},
                "scheduler": {"last_epoch": 3, "base_lrs": [2e-5]}, "epoch": 3, "offset": 1200}, path)
    return path


def inputs(tokenizer):
    captions = ["A man riding a horse on the beach .", "two cats", "The red bus"]
    enc = tokenizer(captions, padding=True, return_tensors="pt")
    rng = np.random.default_rng(0)
    n = [7, 3]
    boxes = []
    for k in n:
        xy = rng.uniform(0, 0.5, (k, 2)).astype(np.float32)
        boxes.append(np.concatenate([xy, xy + rng.uniform(0.1, 0.5, (k, 2)).astype(np.float32)], 1))
    feat = torch.zeros(2, max(n), IMG_DIM)
    pos7 = torch.zeros(2, max(n), 7)
    mask = torch.zeros(2, max(n))
    for i, (k, b) in enumerate(zip(n, boxes)):
        feat[i, :k] = torch.from_numpy(rng.standard_normal((k, IMG_DIM)).astype(np.float32))
        pos7[i, :k] = torch.from_numpy(region_positions(b))  # the db's 6 norm_bb columns plus w*h
        mask[i, :k] = 1
    return enc, feat, pos7, mask


@pytest.mark.parametrize("layout", ["pretrained", "finetuned"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_import_reproduces_the_original_embeddings(tmp_path, layout, dtype):
    vocab = write_vocab(tmp_path / "vocab.txt")
    m = bi_encoder(vocab_size())
    save = save_pretrained_layout if layout == "pretrained" else save_finetuned_layout
    ckpt = save(m, tmp_path / "ckpt.pt", dtype)
    info = import_lightningdot(ckpt, tmp_path / "export", vocab, num_heads=HEADS)
    assert (info["feature_dim"], info["text_layers"], info["image_layers"], info["hidden"], info["embed_dim"]) == \
        (IMG_DIM, LAYERS, LAYERS, H, PROJ)
    assert info["dtype"] == str(dtype).replace("torch.", "")

    tokenizer, model, meta = load_dual_encoder(tmp_path / "export")
    assert meta["version"] == 2 and meta["projection"] and not meta["normalize"] and meta["scale_mode"] == "none"
    assert tokenizer.convert_tokens_to_ids("[CLS]") == 101 and tokenizer.tokenize("The man") == ["The", "man"]
    enc, feat, pos7, mask = inputs(tokenizer)
    with torch.no_grad():
        m.to(dtype).float()  # the reference runs on the weights the file holds
        ref_t = original_text(m.txt_model, enc["input_ids"], enc["attention_mask"])
        ref_i = original_image(m.img_model, feat, pos7, mask)
        got_t = model.encode_text(enc["input_ids"], enc["attention_mask"])
        got_i = model.encode_image(feat, pos7, mask)
        # each image alone (no padding) gives what it gives in the padded batch
        alone = model.encode_image(feat[1:, :3], pos7[1:, :3], mask[1:, :3])
    assert ref_t.abs().mean() > 0.1 and (ref_i[0] - ref_i[1]).abs().max() > 0.1  # not degenerate
    torch.testing.assert_close(got_t, ref_t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_i, ref_i, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alone[0], ref_i[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_t @ got_i.T, ref_t @ ref_i.T, rtol=1e-4, atol=1e-3)


@pytest.mark.slow  # the import and recall commands as subprocesses: ~15 s
def test_import_command_and_recall_take_the_export(tmp_path):
    vocab = write_vocab(tmp_path / "vocab.txt")
    ckpt = save_finetuned_layout(bi_encoder(vocab_size()), tmp_path / "coco-ft.pt", torch.float16)
    ldot = [sys.executable, "-m", "ldot.eval"]
    r = subprocess.run(ldot + ["import", str(ckpt), "--out", str(tmp_path / "e"), "--tokenizer", str(vocab),
                                 "--num-heads", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fine-tuned" in r.stdout and "float16" in r.stdout
    r = subprocess.run(ldot + ["import", str(ckpt), "--out", str(tmp_path / "e"), "--tokenizer", str(vocab),
                                 "--num-heads", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().endswith("pass --overwrite to replace it")
    meta = json.loads((tmp_path / "e" / "ldot.json").read_text())
    assert meta["max_text_len"] == 60 and meta["feature_dim"] == IMG_DIM


def test_checkpoints_of_other_models_are_one_line(tmp_path):
    vocab = write_vocab(tmp_path / "vocab.txt")
    m = bi_encoder(vocab_size())
    uniter_sd = {f"bert.{k}": v for k, v in m.img_model.bert.state_dict().items()}
    torch.save(uniter_sd, tmp_path / "uniter-base.pt")
    with pytest.raises(ModelError, match=r"uniter-base.pt: not a LightningDOT checkpoint: lacks img_model.\* and "
                                         r"txt_model.\* \(holds bert.embeddings.\*.*\); a UNITER checkpoint starts "
                                         r"an image encoder as model.image_init"):
        import_lightningdot(tmp_path / "uniter-base.pt", tmp_path / "x", vocab)
    sd = m.state_dict()
    sd["txt_model.bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(1)
    torch.save({"model_dict": sd}, tmp_path / "odd.pt")
    with pytest.raises(ModelError, match=r"odd.pt \[txt_model.bert\]: does not know "
                                         r"encoder.layer.0.attention.self.rotary.weight"):
        import_lightningdot(tmp_path / "odd.pt", tmp_path / "x", vocab, num_heads=HEADS)
    sd = {k: v for k, v in m.state_dict().items() if "img_embeddings.pos_linear" not in k}
    torch.save({"model_dict": sd}, tmp_path / "short.pt")
    with pytest.raises(ModelError, match=r"short.pt \[img_model.bert\]: lacks img_embeddings.pos_linear.weight"):
        import_lightningdot(tmp_path / "short.pt", tmp_path / "x", vocab, num_heads=HEADS)
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "epoch": 1}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match=r"other.pt: not a LightningDOT checkpoint \(holds a dict of state_dict.\*, "
                                         r"epoch.\*"):
        import_lightningdot(tmp_path / "other.pt", tmp_path / "x", vocab)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match=r"junk.pt: not readable as a torch state dict"):
        import_lightningdot(tmp_path / "junk.pt", tmp_path / "x", vocab)
    with pytest.raises(ModelError, match=r"uniter-base.pt: a UNITER checkpoint, not BERT"):
        bert_text_encoder(tmp_path / "uniter-base.pt")
    (tmp_path / "small.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nword\n")
    ckpt = save_finetuned_layout(m, tmp_path / "ft.pt", torch.float32)
    with pytest.raises(ModelError, match=r"small.txt: 6 tokens, the checkpoint's text encoder has 123"):
        import_lightningdot(ckpt, tmp_path / "x", tmp_path / "small.txt", num_heads=HEADS)
    r = subprocess.run([sys.executable, "-m", "ldot.eval", "import", str(tmp_path / "uniter-base.pt"), "--out",
                        str(tmp_path / "x"), "--tokenizer", str(vocab)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "lacks img_model" in r.stderr


@pytest.mark.parametrize("prefix", ["bert.", "uniter."])
def test_uniter_and_bert_initializations(tmp_path, prefix):
    """uniter-base.pt / bert-base-cased.pt start the encoders as in the original fine-tuning: same outputs
    as the original's modules holding those weights."""
    m = bi_encoder(vocab_size(), seed=1)
    uniter_sd = {f"{prefix}{k}": v.half() for k, v in m.img_model.bert.state_dict().items()}
    uniter_sd["cls.predictions.bias"] = torch.zeros(vocab_size())  # UNITER's pretraining heads beside it
    uniter_sd["itm_output.weight"] = torch.zeros(2, H)
    torch.save(uniter_sd, tmp_path / "uniter-base.pt")
    bert_sd = {f"bert.{k}": v for k, v in m.txt_model.bert.state_dict().items()}
    bert_sd["cls.seq_relationship.weight"] = torch.zeros(2, H)
    torch.save(bert_sd, tmp_path / "bert-base-cased.pt")

    image = uniter_image_encoder(tmp_path / "uniter-base.pt", num_heads=HEADS).eval()
    text = bert_text_encoder(tmp_path / "bert-base-cased.pt", num_heads=HEADS).eval()
    tokenizer = load_tokenizer(write_vocab(tmp_path / "vocab.txt"))
    enc, feat, pos7, mask = inputs(tokenizer)
    m.img_model.bert.half().float()
    with torch.no_grad():  # no encode_proj in these files: the [CLS] states are what they start
        x_ref = _original_image_states(m.img_model, feat, pos7, mask)
        x_got = image(feat, pos7, mask)[:, 0]
        t_ref = _original_text_states(m.txt_model, enc["input_ids"], enc["attention_mask"])
        t_got = text(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[:, 0]
    torch.testing.assert_close(x_got, x_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(t_got, t_ref, rtol=1e-4, atol=1e-4)
    assert image.config.feature_dim == IMG_DIM and image.config.num_hidden_layers == LAYERS


def _original_image_states(img_model, feat, pos7, mask):
    proj, img_model.encode_proj = img_model.encode_proj, nn.Identity()
    try:
        return original_image(img_model, feat, pos7, mask)
    finally:
        img_model.encode_proj = proj


def _original_text_states(txt_model, ids, mask):
    proj, txt_model.encode_proj = txt_model.encode_proj, nn.Identity()
    try:
        return original_text(txt_model, ids, mask)
    finally:
        txt_model.encode_proj = proj


def test_the_real_bert_base_cased_vocab():
    if not REAL_VOCAB.is_file():
        pytest.skip(f"the real bert-base-cased vocab is not at {REAL_VOCAB} (shared data absent)")
    tokens = REAL_VOCAB.read_text(encoding="utf-8").splitlines()
    tok = load_tokenizer(REAL_VOCAB)
    assert len(tok) == len(tokens) == 28996  # the released text encoders' vocab size
    ids = tok("The Man")["input_ids"]
    assert ids == [101, tokens.index("The"), tokens.index("Man"), 102]  # cased: no lower-casing


def test_version_1_exports_load_and_compute_what_they_computed(tmp_path, tiny_text_encoder):
    """An export written before the UNITER embeddings (one LayerNorm over [CLS] and regions)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    from ldot.kernels import ContrastiveLoss
    from ldot.model import DualEncoder, ImageEncoder, export_dual_encoder

    torch.manual_seed(0)
    text = BertModel.from_pretrained(tiny_text_encoder, add_pooling_layer=False)
    image = ImageEncoder(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    feature_dim=IMG_DIM, vocab_size=1))
    model = DualEncoder(text, image, projection=True, normalize=True, contrastive=ContrastiveLoss("none")).eval()
    export_dual_encoder(model, AutoTokenizer.from_pretrained(tiny_text_encoder), tmp_path / "v1", {})
    f = next((tmp_path / "v1" / "image_encoder").glob("*.safetensors"))
    old = {k: v for k, v in load_file(f).items() if "cls_norm" not in k and "region_type" not in k}
    save_file(old, f, metadata={"format": "pt"})
    meta = json.loads((tmp_path / "v1" / "ldot.json").read_text())
    (tmp_path / "v1" / "ldot.json").write_text(json.dumps({**meta, "version": 1}))

    def v1_forward(feat, pos, m):  # what version 1 computed: LN over [CLS] and the summed region terms
        e = {k.removeprefix("embeddings."): v for k, v in old.items() if k.startswith("embeddings.")}
        lnorm = lambda x, n: nn.functional.layer_norm(x, (32,), e[f"{n}.weight"], e[f"{n}.bias"], 1e-12)  # noqa: E731
        x = lnorm(feat @ e["feat_linear.weight"].T + e["feat_linear.bias"], "feat_norm") + \
            lnorm(pos @ e["box_linear.weight"].T + e["box_linear.bias"], "box_norm")
        return lnorm(torch.cat([e["cls"].expand(x.shape[0], -1, -1), x], 1), "norm")

    _, loaded, _ = load_dual_encoder(tmp_path / "v1")
    _, feat, pos7, mask = inputs(load_tokenizer(write_vocab(tmp_path / "vocab.txt")))
    with torch.no_grad():
        got, _ = loaded.image.embeddings(feat, pos7, mask)
        torch.testing.assert_close(got, v1_forward(feat, pos7, mask))
    meta["version"] = 7
    (tmp_path / "v1" / "ldot.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"ldot.json: export format version 7; this code reads versions 1, 2"):
        load_dual_encoder(tmp_path / "v1")


def uniter_dbs():
    """The data tests' writers of UNITER's img_db and txt_db, as UNITER's scripts write them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("uniter_dbs", REPO / "tests" / "data" / "test_convert_uniter.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_released_files_to_a_recall_table(tmp_path):
    """The README's path: a LightningDOT txt_db + img_db converted, coco-ft.pt imported, recall computed;
    the embeddings eval computes are the original's on the db's own arrays (norm_bb's stored w, h)."""
    from ldot.data.convert import run_convert
    from ldot.data.__main__ import build_parser
    from ldot.data.loader import load_eval_split
    from ldot.eval.__main__ import main as eval_main
    from ldot.eval.metrics import retrieval_recall
    from ldot.eval.recall import encode_split

    dbs = uniter_dbs()
    rng = np.random.default_rng(7)
    texts = ["A man riding a horse on the beach .", "two cats", "The red bus", "a dog on the street", "a small child"]
    images = {f"coco_val2014_{i:012d}.npz": dbs.detections(rng, int(rng.integers(4, 16)), dim=IMG_DIM)
              for i in range(6)}
    caps = [(name, texts[(i + j) % len(texts)]) for i, name in enumerate(images) for j in range(2)]
    expected = dbs.write_img_db(tmp_path / "img" / "coco_val2014", images)
    dbs.ids_of = lambda text: [1]  # input_ids are not read when the raw text is there
    (tmp_path / "db").mkdir()
    dbs.write_txt_db(tmp_path / "db" / "itm_coco_test_base-cased.db", caps)
    run_convert(build_parser().parse_args([
        "convert", "--format", "uniter", "--txt-db", str(tmp_path / "db" / "itm_coco_test_base-cased.db"),
        "--img-db", str(tmp_path / "img" / "coco_val2014"), "--out", str(tmp_path / "data"),
        "--conf-th", str(dbs.CONF_TH), "--max-bb", str(dbs.MAX_BB), "--min-bb", str(dbs.MIN_BB)]))
    vocab = write_vocab(tmp_path / "vocab.txt")
    m = bi_encoder(vocab_size(), seed=3)
    import_lightningdot(save_finetuned_layout(m, tmp_path / "coco-ft.pt", torch.float16), tmp_path / "export", vocab,
                        num_heads=HEADS)
    assert eval_main(["recall", "--checkpoint", str(tmp_path / "export"), "--data", str(tmp_path / "data"),
                      "--no-log", "--out", str(tmp_path / "r" / "recall.json"), "--figure-queries", "0",
                      "--ks", "1", "2", "3", "--curve-k", "4"]) == 0
    rec = json.loads((tmp_path / "r" / "recall.json").read_text())

    tok, model, meta = load_dual_encoder(tmp_path / "export")
    split = load_eval_split(tmp_path / "data")
    txt, img = encode_split(model, split, tok, max_text_len=meta["max_text_len"], progress=False)
    m.to(torch.float16).float()
    with torch.no_grad():
        ref_img = []
        for name in images:  # the original's input: the db's float16 arrays, its 6 norm_bb columns + w*h
            e = expected[name]
            bb = torch.from_numpy(e["norm_bb"].astype(np.float32))
            pos7 = torch.cat([bb, bb[:, 4:5] * bb[:, 5:]], 1)
            feat = torch.from_numpy(e["features"].astype(np.float32))
            ref_img.append(original_image(m.img_model, feat[None], pos7[None], torch.ones(1, len(feat)))[0])
        enc = tok([t for _, t in caps], padding=True, return_tensors="pt")
        ref_txt = original_text(m.txt_model, enc["input_ids"], enc["attention_mask"])
    ref_img = torch.stack(ref_img).numpy()
    np.testing.assert_allclose(txt, ref_txt.numpy(), rtol=1e-4, atol=1e-4)
    # boxes: the shards keep x1..y2 and w, h are recomputed from them, where the db stored float16 w, h
    np.testing.assert_allclose(img, ref_img, rtol=0, atol=5e-3 * np.abs(ref_img).max())
    # the table is that of these embeddings (the original's scores differ by the w, h above: near-ties of
    # this tiny random model may rank the other way there)
    assert rec["recall"] == pytest.approx(retrieval_recall(txt @ img.T, split.caption_image, ks=(1, 2, 3)), abs=1e-9)


def test_trainer_starts_from_uniter_and_bert_files(tmp_path, monkeypatch):
    """model.image_init / model.text_init / model.tokenizer: the trainer's model holds those weights (and
    trains: gradients reach both encoders); a wrong feature dim or a missing tokenizer is one line."""
    from ldot.train.config import ConfigError, LossConfig, ModelConfig
    from ldot.train.model_setup import build_dual_encoder

    m = bi_encoder(vocab_size(), seed=2)
    torch.save({f"bert.{k}": v.half() for k, v in m.img_model.bert.state_dict().items()}, tmp_path / "uniter-base.pt")
    torch.save({f"bert.{k}": v for k, v in m.txt_model.bert.state_dict().items()}, tmp_path / "bert-base-cased.pt")
    vocab = write_vocab(tmp_path / "vocab.txt")
    cfg = ModelConfig(image_init=str(tmp_path / "uniter-base.pt"), text_init=str(tmp_path / "bert-base-cased.pt"),
                      tokenizer=str(vocab), projection=True, dropout=0.0)
    with pytest.raises(ModelError, match=r"hidden size 16 is not a multiple of 64"):
        build_dual_encoder(cfg, LossConfig(), IMG_DIM)  # heads default to hidden/64 for the text encoder
    from ldot.model import lightningdot

    text = lightningdot.bert_text_encoder(tmp_path / "bert-base-cased.pt", num_heads=HEADS)
    orig = lightningdot.bert_text_encoder  # the tiny BERT's 16-wide, 2-head layers: heads are not in a state dict
    monkeypatch.setattr(lightningdot, "bert_text_encoder", lambda path, **kw: orig(path, **{**kw, "num_heads": HEADS}))
    tok, model = build_dual_encoder(cfg, LossConfig(), IMG_DIM)
    with pytest.raises(ConfigError, match=r"uniter-base.pt takes 12-d region features, the data has 7"):
        build_dual_encoder(cfg, LossConfig(), 7)
    assert torch.equal(model.text.embeddings.word_embeddings.weight, text.embeddings.word_embeddings.weight)
    _, feat, pos7, mask = inputs(tok)
    enc = tok(["a man", "two cats"], padding=True, return_tensors="pt")
    with torch.no_grad():
        x_ref = _original_image_states(m.img_model.half().float(), feat, pos7, mask)
        torch.testing.assert_close(model.image_states(feat, pos7, mask)[:, 0], x_ref, rtol=1e-4, atol=1e-4)
    t, i, _ = model(enc["input_ids"], enc["attention_mask"], feat, pos7, mask)
    (t @ i.T).diagonal().sum().backward()
    assert model.image.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert model.text.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match=r"model.text_init needs model.tokenizer"):
        ModelConfig(text_init="x.pt")
