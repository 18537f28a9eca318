"""The eval commands end to end, in-process: recall (table, JSON, Markdown, pictures, MLflow, the full
setting), index and search (results equal a brute-force search; re-ranking; wrong checkpoint refused)."""
import json

import numpy as np
import pytest

from ldot.eval.__main__ import main


@pytest.fixture(scope="module")
def embeddings(tiny_checkpoint, tiny_shards):
    from ldot.data.loader import load_eval_split
    from ldot.eval.recall import encode_split
    from ldot.model import load_dual_encoder

    tok, model, _ = load_dual_encoder(tiny_checkpoint)
    out = {}
    for name in ("test", "train"):
        split = load_eval_split(tiny_shards / name)
        out[name] = (split, *encode_split(model, split, tok, batch_size=64, progress=False))
    return tok, model, out


def test_recall_command_table_files_pictures_full_setting_and_rerank(tmp_path, tiny_checkpoint, other_checkpoint,
                                                                     tiny_shards, embeddings, capsys):
    from PIL import Image

    from ldot.eval.image_store import ImageStore
    from ldot.eval.metrics import retrieval_recall
    from ldot.eval.recall import topk_from_embeddings
    from ldot.eval.rerank import DualEncoderReranker, rerank_topk

    out = tmp_path / "r" / "recall.json"
    assert main(["recall", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_shards / "test"),
                 "--out", str(out), "--no-log", "--curve-k", "20", "--pool", str(tiny_shards / "train"),
                 "--batch-size", "64", "--rerank", str(other_checkpoint), "--rerank-top", "8"]) == 0
    printed = capsys.readouterr().out
    assert "| model |" in printed and "| chance |" in printed and "Full setting" in printed
    assert "| first stage |" in printed and "| re-ranked top 8 |" in printed
    rec = json.loads(out.read_text())
    _, _, enc = embeddings
    split, txt, img = enc["test"]
    assert rec["recall"] == pytest.approx(retrieval_recall(txt @ img.T, split.caption_image), abs=1e-9)
    reranker = DualEncoderReranker.from_checkpoint(other_checkpoint, ImageStore(split.data_dir, split.keys))
    after = rerank_topk(topk_from_embeddings(txt, img, split.caption_image, 20), split.captions, reranker, 8)
    assert rec["rerank"]["recall"] == pytest.approx(retrieval_recall(after, split.caption_image), abs=1e-9)

    # full setting by hand: test captions against test+train images, test images against all captions
    tr_split, tr_txt, tr_img = enc["train"]
    all_txt, all_img = np.concatenate([txt, tr_txt]), np.concatenate([img, tr_img])
    owner = np.concatenate([split.caption_image, tr_split.caption_image + split.num_images])
    s = all_txt @ all_img.T
    ir = np.array([np.sum(np.delete(s[c], owner[c]) >= s[c, owner[c]]) for c in range(len(txt))])
    tr = np.array([np.sum(s[owner != i, i] >= s[owner == i, i].max()) for i in range(split.num_images)])
    full = rec["full"]
    assert full["num_images"] == split.num_images + tr_split.num_images
    for k in (5, 10, 20):
        assert full["recall"][f"ir_r{k}"] == pytest.approx(np.mean(ir < k), abs=1e-6)
        assert full["recall"][f"tr_r{k}"] == pytest.approx(np.mean(tr < k), abs=1e-6)
    assert "Full setting" in out.with_suffix(".md").read_text()
    for name in ("recall_curve.png", "recall_top10.png"):
        with Image.open(out.parent / name) as im:
            assert im.width > 400 and im.height > 200


@pytest.mark.slow  # a fresh MLflow sqlite store (its schema migrations) and the full recall command: ~10 s
def test_recall_command_records_in_the_training_run(tmp_path, tiny_checkpoint, tiny_shards):
    import shutil

    from mlflow.tracking import MlflowClient

    from ldot.tracking import Tracker

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "eval-test")
    tracker.start("t")
    tracker.write_info(ckpt)
    assert main(["recall", "--checkpoint", str(ckpt), "--data", str(tiny_shards / "test"), "--curve-k", "10",
                 "--figure-queries", "2"]) == 0
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    rec = json.loads((ckpt / "recall.json").read_text())
    assert run.data.metrics["test/ar"] == pytest.approx(rec["recall"]["ar"])
    names = {a.path for a in client.list_artifacts(tracker.run_id, "recall")}
    assert {"recall/recall.json", "recall/recall.md", "recall/recall_curve.png", "recall/recall_top10.png"} <= names


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_checkpoint, tiny_shards):
    out = tmp_path_factory.mktemp("index") / "exact"
    assert main(["index", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_shards / "test"),
                 "--out", str(out), "--batch-size", "64"]) == 0
    return out


def test_search_returns_the_brute_force_top_k(index_dir, tiny_checkpoint, embeddings, capsys):
    from ldot.eval.recall import encode_queries

    tok, model, enc = embeddings
    split, _, img = enc["test"]
    query = "a large red circle on a black background"
    capsys.readouterr()
    assert main(["search", "--index", str(index_dir), "--checkpoint", str(tiny_checkpoint), "--query", query,
                 "-k", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    s = (encode_queries(model, tok, [query]) @ img.T)[0]
    want = np.argsort(-s)[:5]
    assert [h["image_id"] for h in res["hits"]] == [split.image_ids[i] for i in want]
    np.testing.assert_allclose([h["score"] for h in res["hits"]], s[want], rtol=1e-5)
    assert set(res["ms"]) == {"encode", "search", "rerank"}
    # the table form prints the time split
    assert main(["search", "--index", str(index_dir), "--checkpoint", str(tiny_checkpoint), "--query", query]) == 0
    assert "time: encode" in capsys.readouterr().out


def test_recall_chooses_the_mixing_weight_on_a_validation_split(tmp_path, tiny_checkpoint, other_checkpoint,
                                                               tiny_shards, embeddings, capsys):
    """--rerank-val: the weight is the one whose re-ranked AR is best on that split, and the test split is
    re-ranked at it, with the re-ranker's order alone beside it (both from one pass of re-ranker scores)."""
    from ldot.eval.image_store import ImageStore
    from ldot.eval.metrics import retrieval_recall
    from ldot.eval.recall import topk_from_embeddings
    from ldot.eval.rerank import DualEncoderReranker, rerank_topk

    out, weights = tmp_path / "recall.json", (0.5, 2.0, 8.0, 1000.0)
    assert main(["recall", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_shards / "test"), "--out",
                 str(out), "--no-log", "--batch-size", "64", "--figure-queries", "0", "--rerank",
                 str(other_checkpoint), "--rerank-top", "8", "--rerank-val", str(tiny_shards / "train"),
                 "--rerank-weights", *map(str, weights)]) == 0
    rec = json.loads(out.read_text())["rerank"]
    _, _, enc = embeddings

    def reranked(name, w):
        split, txt, img = enc[name]
        reranker = DualEncoderReranker.from_checkpoint(other_checkpoint, ImageStore(split.data_dir, split.keys))
        top = topk_from_embeddings(txt, img, split.caption_image, 20)
        return retrieval_recall(rerank_topk(top, split.captions, reranker, 8, first_weight=w), split.caption_image)

    ar = {w: reranked("train", w)["ar"] for w in weights}
    assert len(set(ar.values())) > 1  # the weight matters on this split, so choosing it means something
    assert rec["weight"] == max(weights, key=lambda w: (ar[w], -w))
    split, txt, img = enc["train"]
    assert rec["weight_chosen_on"] == {"data": str(tiny_shards / "train"),
                                       "ar": pytest.approx({f"{w:g}": a for w, a in ar.items()}),
                                       "first_stage_ar": pytest.approx(retrieval_recall(txt @ img.T, split.caption_image)["ar"])}
    assert rec["recall"] == pytest.approx(reranked("test", rec["weight"]), abs=1e-9)
    assert rec["recall_alone"] == pytest.approx(reranked("test", 0.0), abs=1e-9)
    printed = capsys.readouterr().out
    assert f"mixing weight chosen on {tiny_shards / 'train'}: {rec['weight']:g}" in printed
    assert "re-ranker alone |" in printed and f"+ {rec['weight']:g} x first stage |" in printed


def test_recall_refuses_a_mixing_choice_it_cannot_make(tmp_path, tiny_checkpoint, other_checkpoint, tiny_shards,
                                                      capsys):
    base = ["recall", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_shards / "test"), "--no-log",
            "--out", str(tmp_path / "r.json")]
    assert main(base + ["--rerank-val", str(tiny_shards / "train")]) == 2
    assert "need --rerank CKPT" in capsys.readouterr().err
    assert main(base + ["--rerank", str(other_checkpoint), "--rerank-weights", "1", "2"]) == 2
    assert "--rerank-weights needs --rerank-val" in capsys.readouterr().err
    assert main(base + ["--rerank", str(other_checkpoint), "--rerank-val", str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'}: no manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_search_with_reranker_orders_the_top_m_by_the_second_model(index_dir, tiny_checkpoint, other_checkpoint,
                                                                   embeddings, test_split_dir, capsys):
    from ldot.data.loader import load_eval_split
    from ldot.eval.recall import encode_queries, encode_split
    from ldot.model import load_dual_encoder

    tok, model, enc = embeddings
    split, _, img = enc["test"]
    query = "two shapes on white: a small green star and a large blue square"
    capsys.readouterr()
    assert main(["search", "--index", str(index_dir), "--checkpoint", str(tiny_checkpoint), "--query", query,
                 "-k", "8", "--rerank", str(other_checkpoint), "--rerank-top", "8", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"][0]["hits"]
    first = np.argsort(-(encode_queries(model, tok, [query]) @ img.T)[0])[:8]
    tok_b, b, _ = load_dual_encoder(other_checkpoint)
    _, img_b = encode_split(b, load_eval_split(test_split_dir), tok_b, progress=False)
    s_b = (encode_queries(b, tok_b, [query]) @ img_b.T)[0]
    want = first[np.argsort(-s_b[first], kind="stable")]
    assert [h["image_id"] for h in hits] == [split.image_ids[i] for i in want]
    assert sorted(h["first_stage_rank"] for h in hits) == list(range(1, 9))


def test_search_refuses_an_index_from_another_checkpoint(index_dir, other_checkpoint, capsys):
    assert main(["search", "--index", str(index_dir), "--checkpoint", str(other_checkpoint), "--query", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "index.json: the index was built by the checkpoint" in err
    assert "\n" not in err


def test_approximate_index_reports_recall_against_exact(tmp_path, tiny_checkpoint, tiny_shards, capsys):
    out = tmp_path / "hnsw"
    assert main(["index", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_shards / "test"),
                 "--out", str(out), "--type", "hnsw", "--batch-size", "64"]) == 0
    assert "against exact search" in capsys.readouterr().out
    report = json.loads((out / "index.json").read_text())["report"]
    assert 0.9 <= report["overlap@10"] <= 1.0  # 24 images: HNSW is all but exact
    assert report["ir_recall"].keys() == report["ir_recall_exact"].keys() == {"ir_r1", "ir_r5", "ir_r10"}


def test_mine_writes_each_querys_top_non_matches(tmp_path, tiny_checkpoint, embeddings, test_split_dir, capsys):
    _, _, enc = embeddings
    split, txt, img = enc["test"]
    out = tmp_path / "mined"
    assert main(["mine", "--checkpoint", str(tiny_checkpoint), "--data", str(test_split_dir), "--out", str(out),
                 "--k", "3", "--batch-size", "64"]) == 0
    assert "hard negatives per caption" in capsys.readouterr().out
    t2i = [json.loads(line) for line in (out / "txt2img.jsonl").read_text().splitlines()]
    i2t = [json.loads(line) for line in (out / "img2txt.jsonl").read_text().splitlines()]
    assert len(t2i) == len(split.captions) and len(i2t) == split.num_images
    s = txt @ img.T
    cap_img = split.caption_image
    for c in (0, len(t2i) // 2, len(t2i) - 1):  # captions named as (image_id, index), negatives by brute force
        row = t2i[c]
        assert row["text"] == split.captions[c] and row["image_id"] == split.image_ids[cap_img[c]]
        want = [i for i in np.argsort(-s[c]) if i != cap_img[c]][:3]
        assert row["negatives"] == [split.image_ids[i] for i in want]
    row_of = {}  # (image_id, index among its captions) -> caption row
    for c, o in enumerate(cap_img):
        row_of[(split.image_ids[o], sum(1 for k in row_of if k[0] == split.image_ids[o]))] = c
    for r in (0, split.num_images - 1):
        want = [c for c in np.argsort(-s[:, r]) if cap_img[c] != r][:3]
        assert [row_of[(g["image_id"], g["caption"])] for g in i2t[r]["negatives"]] == want
    summary = json.loads((out / "mine.json").read_text())
    assert summary["k"] == 3 and summary["num_captions"] == len(t2i)
    assert summary["exclude_same_text"] is False and summary["captions_sharing_their_text_with_another_image"] is None

    # --exclude-same-text, over the whole pool (k: every other image): no caption's negatives hold its words
    assert main(["mine", "--checkpoint", str(tiny_checkpoint), "--data", str(test_split_dir), "--out", str(out),
                 "--k", str(split.num_images - 1), "--batch-size", "64", "--exclude-same-text"]) == 0
    capsys.readouterr()
    t2i = [json.loads(line) for line in (out / "txt2img.jsonl").read_text().splitlines()]
    words = [" ".join(c.lower().split()) for c in split.captions]
    holds = [{words[c] for c in range(len(words)) if cap_img[c] == i} for i in range(split.num_images)]
    for c in range(len(t2i)):
        want = [i for i in np.argsort(-s[c]) if i != cap_img[c] and words[c] not in holds[i]]
        assert t2i[c]["negatives"] == [split.image_ids[i] for i in want]
    summary = json.loads((out / "mine.json").read_text())
    shared = sum(sum(words[c] in h for h in holds) > 1 for c in range(len(words)))
    assert summary["exclude_same_text"] is True and summary["captions_sharing_their_text_with_another_image"] == shared
    assert summary["txt2img_negatives_holding_the_query_text"] == summary["img2txt_negatives_saying_an_own_caption"] == 0
    assert shared  # the split repeats some captions (synth's plainest phrasing), so the rule is exercised
    assert main(["mine", "--checkpoint", str(tiny_checkpoint), "--data", str(test_split_dir), "--out", str(out),
                 "--k", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --k must be positive, not 0"


@pytest.mark.torchrun
def test_mine_under_two_ranks_writes_what_one_process_writes(tmp_path, tiny_checkpoint, test_split_dir,
                                                           main_then_report):
    """torchrun, 2 gloo ranks: each encodes and searches half the split; the files equal the 1-process ones.
    Every rank closes its process group before it leaves: left to the interpreter's teardown, gloo aborts
    the process now and then after the work is done (CI saw it: exit 134, "terminate called without an
    active exception"); main_then_report says what `main` left behind, so the check does not rest on luck."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    common = ["mine", "--checkpoint", str(tiny_checkpoint), "--data", str(test_split_dir),
              "--k", "4", "--batch-size", "16", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    one = subprocess.run([sys.executable, "-m", "ldot.eval", *common, str(tmp_path / "one")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    two = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                          str(main_then_report), "ldot.eval.__main__", *common, str(tmp_path / "two")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-3000:])
    assert two.stdout.count("mined 4 hard negatives") == 1  # rank 0 alone reports and writes
    assert two.stdout.count("process group left open: False") == 2, two.stdout[-2000:]
    for name in ("txt2img.jsonl", "img2txt.jsonl"):
        a = [json.loads(x) for x in (tmp_path / "one" / name).read_text().splitlines()]
        b = [json.loads(x) for x in (tmp_path / "two" / name).read_text().splitlines()]
        assert [r["negatives"] for r in a] == [r["negatives"] for r in b]
        np.testing.assert_allclose([r["scores"] for r in a], [r["scores"] for r in b], atol=1e-4)


def test_search_reranks_with_a_cross_encoder(index_dir, tiny_checkpoint, cross_checkpoint, embeddings, capsys):
    """--rerank takes the cross-encoder export (told apart by its ldot.json): the top M in the order of its
    scores, each pair scored by the model itself."""
    import torch

    from ldot.data import schema
    from ldot.data.batching import collate_images
    from ldot.data.loader import tokenize
    from ldot.eval.image_store import ImageStore
    from ldot.eval.recall import encode_queries
    from ldot.model import load_cross_encoder

    tok, model, enc = embeddings
    split, _, img = enc["test"]
    query = "a small red circle at the top left, white background"
    capsys.readouterr()
    assert main(["search", "--index", str(index_dir), "--checkpoint", str(tiny_checkpoint), "--query", query,
                 "-k", "8", "--rerank", str(cross_checkpoint), "--rerank-top", "8", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"][0]["hits"]
    first = np.argsort(-(encode_queries(model, tok, [query]) @ img.T)[0])[:8]
    ctok, cross, _ = load_cross_encoder(cross_checkpoint)
    store = ImageStore(split.data_dir, split.keys)
    scores = []
    with torch.no_grad():
        for r in first:
            feat, box = store.regions(int(r))
            im, t = collate_images([{schema.FEAT: feat, schema.BOX: box}]), tokenize(ctok, [query], 32)
            scores.append(cross(t["input_ids"], t["attention_mask"], im["img_feat"], im["img_pos"], im["img_mask"]).item())
    want = first[np.argsort(-np.array(scores), kind="stable")]
    assert [h["image_id"] for h in hits] == [split.image_ids[i] for i in want]
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(scores)[::-1], rtol=1e-4, atol=1e-5)


def test_recall_on_a_split_smaller_than_the_largest_k(tmp_path, tiny_checkpoint, test_split_dir):
    """4 images x 5 captions, recall@10: IR has only 4 images to rank (R@10 = 1), TR 20 captions; the search
    must still go 10 (+ positives) deep for TR, and the numbers equal the dense ranking's."""
    from ldot.data.loader import load_eval_split
    from ldot.data.schema import read_manifest
    from ldot.data.writer import DatasetWriter

    rng = np.random.default_rng(0)
    fd = read_manifest(test_split_dir).feature_dim
    small = tmp_path / "small"
    with DatasetWriter(small, feature_dim=fd, source="test", split="test", shard_size=10, command="pytest") as w:
        for k in range(4):
            xy = rng.uniform(0, 0.5, size=(3, 2)).astype(np.float32)
            meta = {"image_id": f"img{k}", "captions": [f"image {k} caption {i}" for i in range(5)],
                    "split": "test", "source": "test"}
            w.write(rng.standard_normal((3, fd)).astype(np.float16), np.concatenate([xy, xy + 0.3], 1), meta)
    out = tmp_path / "recall.json"
    assert main(["recall", "--checkpoint", str(tiny_checkpoint), "--data", str(small), "--out", str(out),
                 "--no-log", "--figure-queries", "0"]) == 0
    dense = tmp_path / "dense.json"
    assert main(["recall", "--checkpoint", str(tiny_checkpoint), "--data", str(small), "--out", str(dense),
                 "--no-log", "--figure-queries", "0", "--dense"]) == 0
    rec, ref = json.loads(out.read_text()), json.loads(dense.read_text())
    assert rec["recall"] == pytest.approx(ref["recall"], abs=1e-9)
    assert rec["recall"]["ir_r10"] == 1.0 and len(load_eval_split(small).caption_image) == 20
