"""data/convert: every format on real caption files (../shared/data) or on small arrays written here."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datafixtures import real_data
from ldot.data import DataError, schema
from ldot.data.__main__ import build_parser
from ldot.data.convert import run_convert
from ldot.data.convert.captions import normalize_caption, read_flickr8k, read_multi30k, multi30k_files
from ldot.data.reader import ErrorPolicy, read_shard
from ldot.data.validate import check_dataset

REPO = Path(__file__).resolve().parents[2]
# The real photos: 7 are in the Flickr30k train list, 6338542128.jpg in test_2016.
TRAIN_PHOTOS = ["100652400.jpg", "1016887272.jpg", "101958970.jpg", "3359636318.jpg", "4945942737.jpg",
                "6959556104.jpg", "7162685234.jpg"]


def convert(*argv):
    return run_convert(build_parser().parse_args(["convert", *map(str, argv)]))


def samples(data_dir):
    m = schema.read_manifest(data_dir)
    return [schema.decode_sample(raw) for p in schema.shard_paths(data_dir, m) for raw in read_shard(p, ErrorPolicy())]


def ok(data_dir):
    report = check_dataset(data_dir, progress=False)
    assert report.ok, report.format()
    return report.manifest


def test_normalize_caption():
    assert normalize_caption("  A Texas A&amp;M  player\truns.\n") == "A Texas A&M player runs."


def test_multi30k_real_captions_with_precomp_features(tmp_path):
    prefix = real_data("flickr30k") / "test_2016"
    ims = tmp_path / "ims.npy"
    np.save(ims, np.random.default_rng(0).standard_normal((1000, 4, 16)).astype(np.float32))
    assert convert("--format", "multi30k", "--prefix", prefix, "--features", "precomp", "--ims", ims,
                   "--out", tmp_path / "out", "--shard-size", 400) == 0
    m = ok(tmp_path / "out")
    assert (m.num_samples, m.num_captions, m.split, len(m.shards), m.feature_dim) == (1000, 5000, "test", 3, 16)
    got = samples(tmp_path / "out")
    names = (prefix.parent / "test_2016_images.txt").read_text().split()
    assert [s["json"]["image_id"] for s in got] == names  # ids kept, order kept
    assert got[904]["json"]["captions"][0].startswith("On a sunny, dry day, wearing full football gear, a Texas A&M")
    assert np.allclose(got[7]["feat.npy"], np.load(ims)[7].astype(np.float16))
    assert (got[0]["box.npy"] == [0, 0, 1, 1]).all() and "whole image" in m.extra["boxes"]


def test_multi30k_line_count_mismatch_names_the_file(tmp_path):
    images, files = multi30k_files(real_data("flickr30k") / "test_2016")
    short = tmp_path / "short.en"
    short.write_text("one caption\n")
    with pytest.raises(DataError, match=r"short.en: 1 lines, but the image list .* has 1000"):
        read_multi30k(images, files[:4] + [short])


def test_flickr8k_real_captions(tmp_path):
    folder = real_data("flickr8k")
    records = read_flickr8k(folder / "Flickr8k.token.txt.gz", split_list=folder / "Flickr_8k.testImages.txt")
    assert len(records) == 1000 and all(len(r.captions) == 5 for r in records) and records[0].split == "test"
    ims = tmp_path / "ims.npy"
    np.save(ims, np.ones((1000, 2, 8), np.float32))
    convert("--format", "flickr8k", "--token-file", folder / "Flickr8k.token.txt.gz", "--split-list",
            folder / "Flickr_8k.testImages.txt", "--features", "precomp", "--ims", ims, "--out", tmp_path / "out")
    m = ok(tmp_path / "out")
    assert (m.num_samples, m.num_captions) == (1000, 5000)
    first = samples(tmp_path / "out")[0]["json"]
    assert first["image_id"] == records[0].image_id and first["captions"] == records[0].captions


def test_flickr8k_bad_line_under_both_policies(tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("a.jpg#0\tA dog .\nthis line is broken\nb.jpg#0\tA cat &amp; a dog .\n")
    with pytest.raises(DataError, match=r"tokens.txt: line 2 is not NAME.jpg#i<TAB>caption"):
        read_flickr8k(tokens)
    policy = ErrorPolicy("skip")
    records = read_flickr8k(tokens, policy=policy)
    assert [r.captions for r in records] == [["A dog ."], ["A cat & a dog ."]] and policy.counts == {"invalid_json": 1}


def test_karpathy_json_with_precomp_features(tmp_path):
    data = {"images": [
        {"filename": "1.jpg", "split": "train", "sentences": [{"raw": "a dog"}, {"raw": "a brown  dog"}]},
        {"filename": "2.jpg", "split": "test", "cocoid": 42, "filepath": "val2014", "sentences": [{"raw": "a cat"}]},
        {"filename": "3.jpg", "split": "test", "sentences": [{"raw": "two cats &amp; a bird"}]}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    np.save(tmp_path / "ims.npy", np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4))
    convert("--format", "karpathy", "--karpathy-json", tmp_path / "dataset_coco.json", "--karpathy-split", "test",
            "--features", "precomp", "--ims", tmp_path / "ims.npy", "--out", tmp_path / "out")
    ok(tmp_path / "out")
    got = [s["json"] for s in samples(tmp_path / "out")]
    assert [(g["image_id"], g["captions"], g["split"]) for g in got] == [("42", ["a cat"], "test"),
                                                                        ("3.jpg", ["two cats & a bird"], "test")]


def write_precomp(folder, n=6, rows_per_image=1, ids=True):
    folder.mkdir(parents=True, exist_ok=True)
    caps = [f"image {i} caption {j} &amp; more  spaces" for i in range(n) for j in range(5)]
    (folder / "test_caps.txt").write_text("\n".join(caps) + "\n")
    feats = np.random.default_rng(1).standard_normal((n * rows_per_image, 3, 16)).astype(np.float32)
    np.save(folder / "test_ims.npy", feats)
    if ids:
        (folder / "test_ids.txt").write_text("\n".join(str(100 + i) for i in range(n)) + "\n")
    return feats


@pytest.mark.parametrize("rows_per_image", [1, 5])
def test_precomp(tmp_path, rows_per_image):
    feats = write_precomp(tmp_path / "pre", rows_per_image=rows_per_image)
    np.save(tmp_path / "boxes.npy", np.tile([0.1, 0.2, 0.6, 0.7], (6 * rows_per_image, 3, 1)).astype(np.float32))
    convert("--format", "precomp", "--precomp-dir", tmp_path / "pre", "--split", "test", "--boxes",
            tmp_path / "boxes.npy", "--out", tmp_path / "out")
    m = ok(tmp_path / "out")
    got = samples(tmp_path / "out")
    assert (m.num_samples, m.num_captions, m.feature_dim) == (6, 30, 16)
    assert [s["json"]["image_id"] for s in got] == [str(100 + i) for i in range(6)]
    assert got[2]["json"]["captions"][1] == "image 2 caption 1 & more spaces"
    assert np.allclose(got[2]["feat.npy"], feats[2 * rows_per_image].astype(np.float16))
    assert np.allclose(got[0]["box.npy"][0], [0.1, 0.2, 0.6, 0.7])


def test_precomp_bad_inputs(tmp_path):
    write_precomp(tmp_path / "pre", ids=False)
    np.save(tmp_path / "pre" / "test_ims.npy", np.zeros((7, 3, 16), np.float32))  # 7 rows for 6 images
    with pytest.raises(DataError, match=r"test_ims.npy: 7 rows for 6 images"):
        convert("--format", "precomp", "--precomp-dir", tmp_path / "pre", "--split", "test", "--out", tmp_path / "o")
    feats = np.zeros((6, 3, 16), np.float32)
    feats[4, 1, 2] = np.nan
    np.save(tmp_path / "pre" / "test_ims.npy", feats)
    with pytest.raises(DataError, match=r"key test-4: feat.npy holds NaN"):
        convert("--format", "precomp", "--precomp-dir", tmp_path / "pre", "--split", "test", "--out", tmp_path / "o")
    convert("--format", "precomp", "--precomp-dir", tmp_path / "pre", "--split", "test", "--out", tmp_path / "o",
            "--on-error", "skip", "--overwrite")
    m = ok(tmp_path / "o")
    assert m.num_samples == 5 and m.extra["skipped"] == {"nonfinite": 1}


def photos_copy(tmp_path, names):
    src = real_data("images", "flickr30k")
    dst = tmp_path / "photos"
    dst.mkdir()
    for n in names:
        shutil.copy(src / n, dst / n)
    return dst


def test_images_with_flickr30k_captions_and_class_distributions(tmp_path):
    photos = real_data("images", "flickr30k")
    convert("--format", "images", "--input", photos, "--captions-format", "multi30k", "--prefix",
            real_data("flickr30k") / "train", "--out", tmp_path / "out", "--with-cls", "--shard-size", 3)
    m = ok(tmp_path / "out")
    assert (m.num_samples, m.num_captions, m.feature_dim, m.class_dim, m.has_thumbnails) == (7, 35, 1280, 1000, True)
    got = samples(tmp_path / "out")
    names = (real_data("flickr30k") / "train_images.txt").read_text().split()
    assert sorted(s["json"]["image_id"] for s in got) == sorted(TRAIN_PHOTOS)
    assert [s["json"]["image_id"] for s in got] == sorted(TRAIN_PHOTOS, key=names.index)  # caption-file order
    import gzip

    line = names.index("1016887272.jpg")
    with gzip.open(real_data("flickr30k") / "train.1.en.gz", "rt") as f:
        first_caption = f.read().splitlines()[line]
    climbing = next(s for s in got if s["json"]["image_id"] == "1016887272.jpg")
    assert climbing["json"]["captions"][0] == normalize_caption(first_caption)
    assert climbing["cls.npy"].shape == (49, 1000) and climbing["box.npy"].shape == (49, 4)


def test_images_resume_after_interruption(tmp_path):
    names = sorted(TRAIN_PHOTOS)
    folder = photos_copy(tmp_path, names)
    for n in names:
        (folder / n).with_suffix(".txt").write_text(f"caption of {n}\nanother caption\n")
    good = (folder / names[5]).read_bytes()
    (folder / names[5]).write_bytes(b"not a jpeg")  # the run stops here, after two complete shards of 2
    args = ["--format", "images", "--input", folder, "--out", tmp_path / "out", "--batch-size", 1, "--shard-size", 2]
    with pytest.raises(DataError, match=rf"{names[5]} key {names[5]}: image does not decode"):
        convert(*args)
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert [s["name"] for s in progress["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    kept = (tmp_path / "out" / "shard-000000.tar").stat().st_mtime_ns
    (folder / names[5]).write_bytes(good)
    convert(*args)  # resumes: the finished shards are kept as they are
    assert (tmp_path / "out" / "shard-000000.tar").stat().st_mtime_ns == kept
    assert not (tmp_path / "out" / "progress.json").exists()
    m = ok(tmp_path / "out")
    convert("--format", "images", "--input", folder, "--out", tmp_path / "fresh", "--batch-size", 1, "--shard-size", 2)
    a, b = samples(tmp_path / "out"), samples(tmp_path / "fresh")
    assert m.num_samples == 7 and [s["json"] for s in a] == [s["json"] for s in b]
    assert all(np.allclose(x["feat.npy"], y["feat.npy"], rtol=2e-3, atol=2e-3) for x, y in zip(a, b))  # thread count may differ
    with pytest.raises(DataError, match="unfinished conversion with other options"):
        (tmp_path / "out" / "manifest.json").unlink()
        (tmp_path / "out" / "progress.json").write_text(json.dumps({"fingerprint": "x", "shards": [], "position": {}}))
        convert(*args[:-1], 3)


def test_images_bad_inputs_under_both_policies(tmp_path):
    folder = photos_copy(tmp_path, TRAIN_PHOTOS[:3])
    for n in TRAIN_PHOTOS[:2]:
        (folder / n).with_suffix(".txt").write_text("a caption\n")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (folder / "broken.txt").write_text("a caption\n")
    # TRAIN_PHOTOS[2] (101958970.jpg, sorted before broken.jpg) has no caption file.
    with pytest.raises(DataError, match=r"101958970.jpg key 101958970.jpg: no captions"):
        convert("--format", "images", "--input", folder, "--out", tmp_path / "a")
    (folder / TRAIN_PHOTOS[2]).with_suffix(".txt").write_text("a caption\n")
    with pytest.raises(DataError, match=r"broken.jpg key broken.jpg: image does not decode"):
        convert("--format", "images", "--input", folder, "--out", tmp_path / "a")
    (folder / TRAIN_PHOTOS[2]).with_suffix(".txt").unlink()
    convert("--format", "images", "--input", folder, "--out", tmp_path / "b", "--on-error", "skip")
    m = ok(tmp_path / "b")
    assert m.num_samples == 2 and m.extra["skipped"] == {"undecodable": 1, "empty_caption": 1}


def test_img2dataset_shards(tmp_path):
    import webdataset as wds

    photos = real_data("images", "flickr30k")
    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "00000.tar")) as tw:
        for i, n in enumerate(TRAIN_PHOTOS[:3]):
            tw.write({"__key__": f"{i:09d}", "jpg": (photos / n).read_bytes(), "txt": f"photo  {i} &amp; more",
                      "json": json.dumps({"key": f"{i:09d}", "url": f"http://x/{n}", "caption": "ignored"})})
        tw.write({"__key__": "000000009", "jpg": b"junk", "txt": "x", "json": "{}"})
    convert("--format", "images", "--input", tmp_path / "shards", "--out", tmp_path / "out", "--on-error", "skip",
            "--split", "train")
    m = ok(tmp_path / "out")
    got = [s["json"] for s in samples(tmp_path / "out")]
    assert m.num_samples == 3 and m.extra["skipped"] == {"undecodable": 1}
    assert [(g["image_id"], g["captions"], g["split"]) for g in got][1] == ("000000001", ["photo 1 & more"], "train")


def test_hf_backbone_from_a_local_folder(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    model_dir = tmp_path / "vit"
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32)
    ViTModel(cfg).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    folder = photos_copy(tmp_path, TRAIN_PHOTOS[:2])
    for n in TRAIN_PHOTOS[:2]:
        (folder / n).with_suffix(".txt").write_text("a caption\n")
    convert("--format", "images", "--input", folder, "--backbone", f"hf:{model_dir}", "--out", tmp_path / "out")
    m = ok(tmp_path / "out")
    s = samples(tmp_path / "out")[0]
    assert m.feature_dim == 24 and s["feat.npy"].shape == (16, 24)  # 4×4 patches, [CLS] dropped
    assert np.allclose(s["box.npy"][5], [0.25, 0.25, 0.5, 0.5])


def test_lmdb_converter(tmp_path):
    lmdb = pytest.importorskip("lmdb", reason="the lmdb package is not installed (pyproject: lmdb)")
    env = lmdb.open(str(tmp_path / "feat.lmdb"), map_size=1 << 24)
    rng = np.random.default_rng(0)
    with env.begin(write=True) as txn:
        for name in ("a", "b"):
            buf = io.BytesIO()
            xy = rng.uniform(0, 0.5, (20, 2))
            wh = rng.uniform(0.1, 0.5, (20, 2))
            norm_bb = np.concatenate([xy, xy + wh, wh, wh[:, :1] * wh[:, 1:]], 1).astype(np.float32)  # UNITER's 7 columns
            np.savez(buf, features=rng.standard_normal((20, 6)).astype(np.float16), norm_bb=norm_bb,
                     conf=np.linspace(1, 0, 20).astype(np.float32),
                     soft_labels=rng.dirichlet(np.ones(4), 20).astype(np.float32))
            txn.put(f"{name}.npz".encode(), buf.getvalue())
    env.close()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("a.jpg#0\tA dog .\nb.jpg#0\tA cat .\nc.jpg#0\tA bird .\n")
    convert("--format", "lmdb", "--lmdb", tmp_path / "feat.lmdb", "--captions-format", "flickr8k", "--token-file",
            tokens, "--with-cls", "--out", tmp_path / "out", "--on-error", "skip")
    m = ok(tmp_path / "out")
    assert (m.num_samples, m.feature_dim, m.class_dim, m.extra["skipped"]) == (2, 6, 4, {"missing_image": 1})
    assert samples(tmp_path / "out")[0]["feat.npy"].shape == (16, 6)  # conf > 0.2: the first 16 of the 20 regions


def test_convert_command_line_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ldot.data", "convert", "--format", "multi30k", "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --format multi30k needs --images-list and --caption-files"
