"""data/synth.py: valid shards, 5 discriminative captions, held-out colour×shape pairs, determinism."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ldot.data import schema, synth
from ldot.data.reader import ErrorPolicy, read_shard
from ldot.data.validate import check_dataset

REPO = Path(__file__).resolve().parents[2]


def metas(data_dir):
    out = []
    for path in schema.shard_paths(data_dir, schema.read_manifest(data_dir)):
        for raw in read_shard(path, ErrorPolicy("error")):
            out.append(schema.decode_sample(raw))
    return out


def test_synth_writes_valid_train_and_test(synth_dir):
    for split, n in (("train", 60), ("test", 20)):
        report = check_dataset(synth_dir / split, progress=False)
        assert report.ok, report.format()
        m = report.manifest
        assert (m.num_samples, m.num_captions, m.split, m.source) == (n, 5 * n, split, "synth")
        assert (m.feature_dim, m.min_regions, m.max_regions, m.has_thumbnails) == (1280, 49, 49, True)
    assert len(schema.read_manifest(synth_dir / "train").shards) == 4  # 60 samples, 16 per shard


def test_held_out_pairs_absent_from_train_and_present_in_every_test_scene(synth_dir):
    held = {tuple(p) for p in synth.HELD_OUT}
    train = metas(synth_dir / "train")
    train_pairs = {(o["color"], o["shape"]) for s in train for o in s["json"]["scene"]["objects"]}
    assert not train_pairs & held
    assert len(train_pairs) >= 15  # the other pairs really are used
    train_text = " ".join(c for s in train for c in s["json"]["captions"])
    for color, shape in held:
        assert f"{color} {shape}" not in train_text
    for s in metas(synth_dir / "test"):
        pairs = {(o["color"], o["shape"]) for o in s["json"]["scene"]["objects"]}
        assert pairs & held, s["json"]


def test_captions_name_every_object_and_differ(tokenizer):
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = synth.make_scene(rng, "train")
        caps = synth.captions(scene, rng)
        assert len(caps) == 5 and len(set(caps)) == 5
        for cap in caps:
            for o in scene.objects:
                assert o.color in cap and o.shape in cap, (cap, scene)
            assert len(tokenizer(cap)["input_ids"]) <= 32, cap  # never truncated at the default max_text_len


def test_scenes_render_their_objects():
    scene = synth.Scene("black", [synth.Obj("red", "square", "large", 1, 1, 0.5, 0.5)])
    img = np.asarray(synth.render(scene))
    assert tuple(img[112, 112]) == synth.COLORS["red"] and tuple(img[5, 5]) == synth.BACKGROUNDS["black"]


def test_deterministic_given_seed(tmp_path, synth_dir):
    synth.synth(tmp_path, images=60, test_images=20, seed=3, shard_size=16, progress=False)
    for split in ("train", "test"):
        a, b = metas(synth_dir / split), metas(tmp_path / split)
        assert [s["json"]["captions"] for s in a] == [s["json"]["captions"] for s in b]
        assert [s["jpg"] for s in a] == [s["jpg"] for s in b]  # renders are bit-identical
        # Features: identical at equal thread counts; the extractor may pick 1 or 2 threads per batch
        # (data/features.py), which moves float16 results by an ulp at most.
        assert all(np.allclose(x["feat.npy"], y["feat.npy"], rtol=2e-3, atol=2e-3) for x, y in zip(a, b))
    other = tmp_path / "other"
    synth.synth(other, images=8, test_images=1, seed=4, shard_size=16, progress=False)
    assert [s["json"]["captions"] for s in metas(other / "train")] != [s["json"]["captions"] for s in metas(synth_dir / "train")[:8]]


@pytest.mark.slow  # a subprocess loading torch and EfficientNet; the tiny_shards fixture runs the same command
def test_command_line(tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "ldot.data", "synth", "--out", str(out), "--images", "8", "--test-images", "4"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^synth: 8 train \+ 4 test images\b", r.stdout, re.MULTILINE), r.stdout  # "18 train" holds "8 train"
    assert schema.read_manifest(out / "train").command.startswith("ldot data synth --out")
    again = subprocess.run([sys.executable, "-m", "ldot.data", "synth", "--out", str(out), "--images", "8"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already holds a dataset" in again.stderr and "Traceback" not in again.stderr


# -- the relations set (--relations) ---------------------------------------------------------------------------

def _phrasings(scene):
    """Every caption the relations grammar can write of a scene (both orders of its two objects)."""
    out = set()
    for seed in range(16):  # the grammar's only draw is the order of the two objects
        out |= set(synth._relation_templates(scene, np.random.default_rng(seed)))
    return out


def _twins(split, n=300):
    rng = np.random.default_rng(5)
    return [synth.make_relation_twins(rng, split) for _ in range(n)]


def test_relation_twins_swap_places_or_colours_and_nothing_else():
    kinds = set()
    for a, b in _twins("train"):
        assert a.background == b.background and len(a.objects) == len(b.objects) == 2
        assert len({o.color for o in a.objects}) == 2 and len({o.shape for o in a.objects}) == 2
        places = [(o.row, o.col) for o in a.objects]
        if [(o.color, o.shape) for o in a.objects] == [(o.color, o.shape) for o in b.objects]:
            assert [(o.row, o.col) for o in b.objects] == places[::-1]
            kinds.add("places")
        else:
            assert [(o.row, o.col, o.shape, o.size) for o in b.objects] == [(o.row, o.col, o.shape, o.size) for o in a.objects]
            assert [o.color for o in b.objects] == [o.color for o in a.objects][::-1]
            kinds.add("colours")
    assert kinds == {"places", "colours"}


def test_relation_captions_tell_twins_apart_with_the_same_words(tokenizer):
    for a, b in _twins("train", 100):
        pa, pb = _phrasings(a), _phrasings(b)
        assert len(pa) == 12 and not pa & pb  # no caption of a scene describes its twin
        bags_b = {tuple(sorted(c.split())) for c in pb}
        # ... and a bag of words cannot tell them apart: all but "a X and a Y, the X on the left" (whose twin with
        # places swapped says "the Y on the left") have a twin caption of the same words
        assert sum(tuple(sorted(c.split())) in bags_b for c in pa) >= 10
        for cap in pa:
            assert not {"top", "bottom", "center", "middle", "small", "large"} & set(cap.split()), cap
            assert len(tokenizer(cap)["input_ids"]) <= 32, cap
        caps = synth.captions(a, np.random.default_rng(0), relations=True)
        assert len(set(caps)) == 5 and set(caps) <= pa


def test_relation_twins_keep_the_held_out_rule():
    held = set(synth.HELD_OUT)
    for split in ("train", "test"):
        for twins in _twins(split):
            for scene in twins:
                shown = {(o.color, o.shape) for o in scene.objects} & held
                assert bool(shown) == (split == "test"), (split, scene)


def test_relations_set_writes_twins_side_by_side(tmp_path):
    synth.synth(tmp_path, images=6, test_images=3, seed=1, shard_size=4, progress=False, relations=True)
    assert schema.read_manifest(tmp_path / "train").extra["kind"] == "relations"
    train = [s["json"] for s in metas(tmp_path / "train")]
    assert len(train) == 6 and len(metas(tmp_path / "test")) == 3  # an odd count leaves the last twin out
    for first, second in zip(train[::2], train[1::2]):
        a = synth.Scene(first["scene"]["background"], [synth.Obj(**o) for o in first["scene"]["objects"]])
        b = synth.Scene(second["scene"]["background"], [synth.Obj(**o) for o in second["scene"]["objects"]])
        assert set(first["captions"]) <= _phrasings(a) and set(second["captions"]) <= _phrasings(b)
        assert not _phrasings(a) & _phrasings(b)
