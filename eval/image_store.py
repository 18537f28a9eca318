"""Random access to a split's images by row: region features for re-rankers, thumbnails for pictures.

The shards are plain tars, so one pass over their headers gives every member's offset; a row is then
read with one seek per member. Where a shard holds no ``{key}.jpg`` thumbnail, a picture of the
feature map stands in (each region painted with its features projected to RGB).
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import torch

from ldot.eval.errors import EvalError


class ImageStore:
    """Images of one dataset directory, addressed by row = position in shard order (EvalSplit's order)."""

    def __init__(self, data_dir: str | Path, keys: list[str] | None = None):
        from ldot.data import schema

        self.data_dir = Path(data_dir)
        self.manifest = schema.read_manifest(self.data_dir)
        self.feature_dim = self.manifest.feature_dim
        self._members: dict[str, dict[str, tuple[str, int, int]]] = {}
        order: list[str] = []
        for path in schema.shard_paths(self.data_dir, self.manifest):
            with tarfile.open(path, "r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    base = os.path.basename(info.name)
                    key = os.path.join(os.path.dirname(info.name), base.split(".", 1)[0])
                    if key not in self._members:
                        self._members[key] = {}
                        order.append(key)
                    self._members[key][base.split(".", 1)[1]] = (path, info.offset_data, info.size)
        self.keys = keys if keys is not None else order
        missing = [k for k in self.keys if k not in self._members]
        if missing:
            raise EvalError(f"{self.data_dir}: no sample {missing[0]!r} in its shards "
                            f"({len(missing)} of {len(self.keys)} keys missing; is this the data the index was built from?)")

    def __len__(self) -> int:
        return len(self.keys)

    def _read(self, key: str, member: str) -> bytes | None:
        where = self._members[key].get(member)
        if where is None:
            return None
        path, offset, size = where
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def _npy(self, key: str, member: str) -> np.ndarray:
        raw = self._read(key, member)
        if raw is None:
            raise EvalError(f"{self.data_dir}: sample {key} has no {member}")
        return np.load(io.BytesIO(raw), allow_pickle=False)

    def regions(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(features [N, D] float32, boxes [N, 4]) of one image."""
        from ldot.data import schema

        key = self.keys[row]
        return self._npy(key, schema.FEAT).astype(np.float32), self._npy(key, schema.BOX).astype(np.float32)

    def batch(self, rows) -> dict[str, torch.Tensor]:
        """Collated img_feat / img_pos / img_mask for the image encoder, in the order of rows."""
        from ldot.data import schema
        from ldot.data.batching import collate_images

        samples = []
        for r in rows:
            feat, box = self.regions(int(r))
            samples.append({schema.FEAT: feat, schema.BOX: box})
        return collate_images(samples)

    def has_thumbnail(self, row: int) -> bool:
        return "jpg" in self._members[self.keys[row]]

    def thumbnails(self, rows, size: int = 96) -> list[np.ndarray]:
        """[size, size, 3] uint8 pictures: the shard's JPEG where it has one, else the feature map."""
        from PIL import Image

        out: list[np.ndarray | None] = []
        no_jpeg = []
        for r in rows:
            raw = self._read(self.keys[int(r)], "jpg")
            if raw is None:
                out.append(None)
                no_jpeg.append(int(r))
                continue
            img = Image.open(io.BytesIO(raw)).convert("RGB")
            img.thumbnail((size, size))
            canvas = Image.new("RGB", (size, size), (255, 255, 255))
            canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
            out.append(np.asarray(canvas))
        if no_jpeg:
            maps = iter(feature_map_pictures([self.regions(r) for r in no_jpeg], size))
            out = [o if o is not None else next(maps) for o in out]
        return out


def feature_map_pictures(regions: list[tuple[np.ndarray, np.ndarray]], size: int = 96) -> list[np.ndarray]:
    """Each image's regions painted at their boxes, coloured by the first three principal components of
    the features (fitted on all the given images together, so colours compare across pictures)."""
    feats = np.concatenate([f for f, _ in regions]).astype(np.float64)
    mean = feats.mean(0)
    _, _, vt = np.linalg.svd(feats - mean, full_matrices=False)
    proj = (feats - mean) @ vt[:3].T
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    lo, hi = np.percentile(proj, 2, axis=0), np.percentile(proj, 98, axis=0)
    colours = np.clip((proj - lo) / np.maximum(hi - lo, 1e-9), 0, 1)
    pictures, at = [], 0
    for feat, box in regions:
        canvas = np.full((size, size, 3), 0.5)
        # paint larger regions first so small ones stay visible on top
        for j in np.argsort(-(box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])):
            x1, y1, x2, y2 = (np.clip(box[j], 0, 1) * size).round().astype(int)
            canvas[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)] = colours[at + j]
        at += len(feat)
        pictures.append((canvas * 255).astype(np.uint8))
    return pictures
