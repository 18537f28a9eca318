"""The eval commands end to end, in-process: recall (table, JSON, Markdown, pictures, MLflow, the full
setting), index and search (results equal a brute-force search; re-ranking; wrong checkpoint refused)."""
import json

import numpy as np
import pytest

from eval.__main__ import main


@pytest.fixture(scope="module")
def embeddings(tiny_checkpoint, tiny_shards):
    from data.loader import load_eval_split
    from eval.recall import encode_split
    from train.model import load_dual_encoder

    tok, model, _ = load_dual_encoder(tiny_checkpoint)
    out = {}
    for name in ("test", "train"):
        split = load_eval_split(tiny_shards / name)
        out[name] = (split, *encode_split(model, split, tok, batch_size=64, progress=False))
    return tok, model, out


def test_recall_command_table_files_pictures_full_setting_and_rerank(tmp_path, tiny_checkpoint, other_checkpoint,
                                                                     tiny_shards, embeddings, capsys):
    from PIL import Image

    from eval.image_store import ImageStore
    from eval.metrics import retrieval_recall
    from eval.recall import topk_from_embeddings
    from eval.rerank import DualEncoderReranker, rerank_topk

    out = tmp_path / "r" / "recall.json"
    assert main(["recall", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_shards / "test"),
                 "--out", str(out), "--no-log", "--curve-k", "20", "--pool", str(tiny_shards / "train"),
                 "--batch-size", "64", "--rerank", str(other_checkpoint), "--rerank-top", "8"]) == 0
    printed = capsys.readouterr().out
    assert "| model |" in printed and "| chance |" in printed and "Full setting" in printed
    assert "| re-ranked |" in printed
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


def test_recall_command_records_in_the_training_run(tmp_path, tiny_checkpoint, tiny_shards):
    import shutil

    from mlflow.tracking import MlflowClient

    from train.tracking import Tracker

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
    from eval.recall import encode_queries

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


def test_search_with_reranker_orders_the_top_m_by_the_second_model(index_dir, tiny_checkpoint, other_checkpoint,
                                                                   embeddings, test_split_dir, capsys):
    from data.loader import load_eval_split
    from eval.recall import encode_queries, encode_split
    from train.model import load_dual_encoder

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
