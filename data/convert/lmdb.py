"""UNITER/LightningDOT detector features: an LMDB whose values hold ``features``, ``norm_bb``, ``conf``, ``soft_labels``.

A value is either npz bytes (UNITER's compressed dumps) or a msgpack map whose arrays are msgpack-numpy
dicts (``{nd, type, shape, data}``) or npy bytes. The paper's box selection: keep the regions whose
detector confidence exceeds ``conf_th`` (0.2), but at least ``min_bb`` (10) and at most ``max_bb`` (100),
the most confident first, in their stored order.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np

from ldot.data.convert.join import Item
from ldot.data.errors import DataError
from ldot.data.reader import ErrorPolicy

FIELDS = ("features", "norm_bb", "conf", "soft_labels")


def _msgpack_array(obj):
    """msgpack-numpy's encoding of an ndarray, decoded without needing msgpack-numpy."""
    if isinstance(obj, dict) and (b"nd" in obj or "nd" in obj):
        get = lambda k: obj.get(k.encode(), obj.get(k))
        dtype = get("type")
        dtype = dtype.decode() if isinstance(dtype, bytes) else dtype
        return np.frombuffer(get("data"), dtype=np.dtype(dtype)).reshape(get("shape"))
    return obj


def decode_value(raw: bytes) -> dict[str, np.ndarray]:
    if raw[:2] == b"PK":  # a zip: npz
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    import msgpack

    obj = msgpack.unpackb(raw, raw=False, object_hook=_msgpack_array, strict_map_key=False)
    out = {}
    for k, v in obj.items():
        k = k.decode() if isinstance(k, bytes) else k
        if isinstance(v, (bytes, bytearray)):  # npy bytes
            v = np.load(io.BytesIO(v), allow_pickle=False)
        out[k] = np.asarray(v)
    return out


def select_boxes(conf: np.ndarray, conf_th: float, min_bb: int, max_bb: int) -> np.ndarray:
    """Indices of the kept regions: clip(#conf > th, min_bb, max_bb) most confident, in stored order."""
    n = int(np.clip((conf > conf_th).sum(), min(min_bb, len(conf)), min(max_bb, len(conf))))
    return np.sort(np.argsort(-conf, kind="stable")[:n])


class LmdbFeatures:
    """Looks each record up by key (``key_format`` over ``{image_id}``, ``{filename}``, ``{stem}``)."""

    def __init__(self, path: str | Path, *, key_format: str = "{stem}.npz", conf_th: float = 0.2, min_bb: int = 10,
                 max_bb: int = 100, with_cls: bool = True):
        try:
            import lmdb
        except ImportError:
            raise DataError("the lmdb converter needs the `lmdb` package (pip install lmdb)", shard=str(path)) from None
        self.path, self.key_format = str(path), key_format
        self.conf_th, self.min_bb, self.max_bb = conf_th, min_bb, max_bb
        self.name = f"lmdb:{Path(path).name}"
        self.boxes_note = f"detector boxes, conf > {conf_th}, {min_bb}-{max_bb} per image"
        try:
            self.env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, subdir=Path(path).is_dir())
        except lmdb.Error as exn:
            raise DataError(f"cannot open LMDB ({exn})", shard=self.path, reason="corrupt_tar") from None
        with self.env.begin() as txn:
            first = next(iter(txn.cursor()), None)
        if first is None:
            raise DataError("LMDB is empty", shard=self.path, reason="missing_member")
        probe = self._decode(first[0].decode(errors="replace"), first[1])
        self.feature_dim = int(probe["features"].shape[1])
        has_cls = with_cls and "soft_labels" in probe
        self.class_dim = int(probe["soft_labels"].shape[1]) if has_cls else None

    def _decode(self, key: str, raw: bytes) -> dict[str, np.ndarray]:
        try:
            value = decode_value(raw)
        except Exception as exn:  # any codec failure is this entry's problem, named below
            raise DataError(f"value does not decode ({type(exn).__name__}: {exn})", shard=self.path, key=key,
                            reason="undecodable") from None
        missing = [f for f in ("features", "norm_bb") if f not in value]
        if missing:
            raise DataError(f"value lacks {', '.join(missing)}", shard=self.path, key=key, reason="missing_member")
        return value

    def key(self, item: Item) -> str:
        r = item.record
        return self.key_format.format(image_id=r.image_id, filename=r.filename, stem=Path(r.filename).stem)

    def features(self, items: Iterator[Item], policy: ErrorPolicy):
        with self.env.begin() as txn:
            for item in items:
                key = self.key(item)
                raw = txn.get(key.encode())
                try:
                    if raw is None:
                        raise DataError("no such key in the LMDB", shard=self.path, key=key, reason="missing_image")
                    v = self._decode(key, raw)
                    n = v["features"].shape[0]
                    conf = v["conf"].reshape(-1) if "conf" in v else np.ones(n, np.float32)
                    keep = select_boxes(conf, self.conf_th, self.min_bb, self.max_bb)
                    feat = v["features"][keep].astype(np.float16)
                    box = v["norm_bb"][keep, :4].astype(np.float32)  # UNITER stores x1,y1,x2,y2,w,h,area
                    cls = v["soft_labels"][keep].astype(np.float16) if self.class_dim else None
                except DataError as err:
                    policy(err)
                    continue
                except (IndexError, ValueError) as exn:
                    policy(DataError(f"inconsistent arrays ({exn})", shard=self.path, key=key, reason="wrong_dim"))
                    continue
                yield item, feat, box, cls, None
