"""eval.image_store: random access by row equals the streaming EvalSplit; thumbnails and the
feature-map stand-in; a key the shards lack is a clear error."""
import numpy as np
import pytest
import torch

from ldot.eval.errors import EvalError
from ldot.eval.image_store import ImageStore, feature_map_pictures


def test_rows_equal_the_split_and_thumbnails_decode(test_split_dir):
    from ldot.data.loader import load_eval_split

    split = load_eval_split(test_split_dir)
    store = ImageStore(test_split_dir, split.keys)
    assert store.keys == split.keys
    full = next(split.image_batches(split.num_images))
    rows = [5, 0, split.num_images - 1]
    got = store.batch(rows)
    for name in ("img_feat", "img_pos", "img_mask"):
        torch.testing.assert_close(got[name], full[name][rows])
    pics = store.thumbnails(rows, size=48)
    assert all(p.shape == (48, 48, 3) and p.dtype == np.uint8 for p in pics)
    assert store.has_thumbnail(0) and pics[0].std() > 0  # the synth shards carry real thumbnails


def test_feature_map_pictures_paint_regions_by_their_features():
    from ldot.data.schema import grid_boxes

    rng = np.random.default_rng(0)
    box = grid_boxes(2, 2)
    feat = rng.normal(size=(4, 16)).astype(np.float32)
    a, b = feature_map_pictures([(feat, box), (feat[::-1].copy(), box)], size=20)
    assert a.shape == (20, 20, 3)
    # four distinct features -> four distinct colours in the four quadrants; reversed order mirrors them
    quads = [tuple(a[y, x]) for y, x in ((2, 2), (2, 12), (12, 2), (12, 12))]
    assert len(set(quads)) == 4
    assert tuple(b[2, 2]) == quads[3] and tuple(b[12, 12]) == quads[0]


def test_unknown_key_is_a_clear_error(test_split_dir):
    with pytest.raises(EvalError, match="no sample 'nope'"):
        ImageStore(test_split_dir, ["nope"])
