"""data/features.py: EfficientNet-lite0 grid features (and per-cell ImageNet distributions) on real photos."""

import numpy as np
import pytest
from PIL import Image

from datafixtures import real_data
from ldot.data.features import EfficientNetLite0Grid, thumbnail_jpeg

CLIFF, FOOTBALL_HELMET = 972, 560  # ImageNet class indices


@pytest.fixture(scope="module")
def photos():
    folder = real_data("images", "flickr30k")
    return {p.stem: Image.open(p) for p in sorted(folder.glob("*.jpg"))}


def test_grid_features_on_real_photos(photos):
    ex = EfficientNetLite0Grid(with_cls=True, batch_size=3)  # 8 photos: batches of 3, 3, 2
    out = list(ex.extract(photos.values(), progress=False))
    assert len(out) == 8
    feat, box, cls = out[0]
    assert feat.shape == (49, 1280) and feat.dtype == np.float16 and np.isfinite(feat).all()
    assert box.shape == (49, 4) and np.allclose(box[-1], [6 / 7, 6 / 7, 1, 1])
    assert cls.shape == (49, 1000) and cls.dtype == np.float16
    assert np.allclose(cls.astype(np.float32).sum(1), 1, atol=0.02)
    assert not np.allclose(out[0][0], out[1][0])  # different photos, different features
    # The preprocessing matches the weights: whole-image predictions are sensible on real photos.
    names = list(photos)
    pooled = {n: ex.model._fc(__import__("torch").from_numpy(f.astype(np.float32)).mean(0)).argsort(descending=True)[:5]
              for n, (f, _, _) in zip(names, out)}
    assert FOOTBALL_HELMET in pooled["6338542128"].tolist()  # american football players
    assert CLIFF in pooled["1016887272"].tolist()  # people climbing a rock face
    # Batching does not change the result.
    single = EfficientNetLite0Grid(batch_size=1)
    alone = next(single.extract([photos[names[0]]], progress=False))[0]
    assert np.allclose(alone.astype(np.float32), feat.astype(np.float32), atol=2e-2)


def test_thumbnail(photos):
    jpeg = thumbnail_jpeg(next(iter(photos.values())))
    import io

    img = Image.open(io.BytesIO(jpeg))
    assert img.format == "JPEG" and max(img.size) == 96 and len(jpeg) < 10_000
