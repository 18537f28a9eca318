"""UNITER/LightningDOT detector features: the img_db LMDBs UNITER's scripts/convert_imgdir.py writes, read
as its DetectFeatLmdb reads them.

An img_db directory (``img_db/coco_val2014``) holds ``feat_th{conf}_max{max}_min{min}[_compressed]/``
(each value already cut to its first nbb regions) with ``nbb_th{conf}_max{max}_min{min}.json`` beside it;
or, with no nbb json, a keep-all ``all[_compressed]/`` whose nbb UNITER computes from each image's
detector confidences; or ``feat_numbb{N}/`` (conf_th -1: N regions each). A value is a msgpack map of
msgpack_numpy arrays or, in the ``_compressed`` variant, npz bytes: ``features``, ``norm_bb``
(x1, y1, x2, y2, w, h[, w·h], normalized), ``conf``, ``soft_labels``. Each LMDB also holds ``__keys__``,
a JSON list of its image names. The regions kept are the first nbb in stored order, nbb =
min(max_bb, max(min_bb, #(conf > conf_th))): UNITER's rule (not the most confident regions).
"""

from __future__ import annotations

import io
import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ldot.data.convert.join import Item
from ldot.data.errors import DataError
from ldot.data.reader import ErrorPolicy

log = logging.getLogger("data")

KEYS = b"__keys__"
# torch.save's legacy (pre-zip) files start with the pickled magic number 0x1950a86a20f9469cfc6c.
_TORCH_LEGACY = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def value_format(raw: bytes) -> str:
    """What a value is: 'npz', 'msgpack', or one this module does not read ('torch.save',
    'torch.save (legacy)', 'pickle', 'zip', 'raw bytes'), told by its first bytes."""
    raw = bytes(raw[:4096]) if len(raw) > 4096 and raw[:2] != b"PK" else bytes(raw)
    if raw[:4] == b"PK\x03\x04":
        try:
            names = zipfile.ZipFile(io.BytesIO(raw)).namelist()
        except zipfile.BadZipFile:
            return "raw bytes"
        if any(n.endswith("data.pkl") for n in names):
            return "torch.save"
        return "npz" if names and all(n.endswith(".npy") for n in names) else "zip"
    if raw.startswith(_TORCH_LEGACY):
        return "torch.save (legacy)"
    if len(raw) > 2 and raw[0] == 0x80 and 2 <= raw[1] <= 5:
        return "pickle"
    if raw[:1] and (0x81 <= raw[0] <= 0x8F or raw[0] in (0xDE, 0xDF)):  # a msgpack map
        return "msgpack"
    return "raw bytes"


class UnreadableValue(ValueError):
    """A value in a format this module does not read (``kind`` says which)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def decode_value(raw: bytes) -> dict[str, np.ndarray]:
    """npz bytes or a msgpack map of msgpack_numpy arrays → name → array (msgpack_numpy's own decoder:
    checked against writing the values with msgpack_numpy.patch(), as UNITER does)."""
    kind = value_format(raw)
    if kind == "npz":
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if kind != "msgpack":
        raise UnreadableValue(kind)
    import msgpack
    import msgpack_numpy

    obj = msgpack.unpackb(raw, raw=False, object_hook=msgpack_numpy.decode, strict_map_key=False)
    if not isinstance(obj, dict):
        raise UnreadableValue("raw bytes")
    return {(k.decode() if isinstance(k, bytes) else k): np.asarray(v) for k, v in obj.items()}


def compute_nbb(conf: np.ndarray, conf_th: float, min_bb: int, max_bb: int) -> int:
    """UNITER's number of regions for an image: min(max_bb, max(min_bb, #(conf > conf_th)))."""
    return int(min(max_bb, max(min_bb, int((np.asarray(conf).reshape(-1) > conf_th).sum()))))


def _is_lmdb(p: Path) -> bool:
    return p.is_file() or (p / "data.mdb").is_file()


class ImgDb:
    """One UNITER img_db: the directory DetectFeatLmdb takes, or the LMDB inside it (or any LMDB of such
    values, whose nbb is then computed from conf unless an nbb json for these settings lies beside it).

    ``read(name)`` gives (features float16 [n, D], boxes float32 [n, 4], soft labels float16 or None) of
    the first nbb regions.
    """

    def __init__(self, path: str | Path, *, conf_th: float = 0.2, max_bb: int = 100, min_bb: int = 10,
                 num_bb: int = 36, compressed: bool | None = None, keep_cls: bool = True):
        try:
            import lmdb
        except ImportError:
            raise DataError("reading img_dbs needs the `lmdb` package (pip install lmdb)", shard=str(path)) from None
        self.conf_th, self.max_bb, self.min_bb = conf_th, max_bb, min_bb
        p = Path(path)
        self.nbb_note, self.name2nbb, self.fixed_nbb = "", None, None
        tag = f"th{conf_th}_max{max_bb}_min{min_bb}"
        if _is_lmdb(p):
            self.lmdb_path = p
            nbb_json = p.parent / f"nbb_{tag}.json"
            if p.name.startswith(f"feat_{tag}") and nbb_json.is_file():
                self._load_nbb(nbb_json)
        elif p.is_dir():
            self.lmdb_path = self._resolve(p, conf_th, num_bb, tag, compressed)
        else:
            raise DataError("no such img_db directory or LMDB", shard=str(p), reason="missing_member")
        if self.name2nbb is None and self.fixed_nbb is None:
            self.nbb_note = f"nbb from conf (> {conf_th}, {min_bb}-{max_bb} regions)"
        self.path = str(self.lmdb_path)
        try:
            self.env = lmdb.open(self.path, readonly=True, lock=False, readahead=False,
                                 subdir=self.lmdb_path.is_dir())
        except lmdb.Error as exn:
            raise DataError(f"cannot open LMDB ({exn})", shard=self.path, reason="corrupt_tar") from None
        self.txn = self.env.begin(buffers=False)
        keys = self.txn.get(KEYS)
        if keys is not None:
            try:
                self.names = json.loads(bytes(keys).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exn:
                raise DataError(f"__keys__ is not a JSON list of names ({exn})", shard=self.path, key="__keys__",
                                reason="invalid_json") from None
        else:  # LMDBs written by other tools: every key is an image
            self.names = [bytes(k).decode("utf-8", "replace") for k in self.txn.cursor().iternext(values=False)]
        if not self.names:
            raise DataError("LMDB holds no images", shard=self.path, reason="missing_member")
        self._probe(self.names[0], keep_cls)

    def _resolve(self, img_dir: Path, conf_th, num_bb, tag, compressed) -> Path:
        """DetectFeatLmdb's choice of LMDB (and nbb) inside an img_db directory."""
        suffixes = {True: ["_compressed"], False: [""], None: ["", "_compressed"]}[compressed]
        if conf_th == -1:
            self.fixed_nbb, self.nbb_note = num_bb, f"{num_bb} regions each (feat_numbb{num_bb})"
            names = [f"feat_numbb{num_bb}{s}" for s in suffixes]
        else:
            names = [f"feat_{tag}{s}" for s in suffixes]
            nbb_json = img_dir / f"nbb_{tag}.json"
            found = [n for n in names if _is_lmdb(img_dir / n)]
            if nbb_json.is_file():
                if not found:
                    raise DataError(f"holds {nbb_json.name} but no {' or '.join(names)} LMDB", shard=str(img_dir),
                                    reason="missing_member")
                self._load_nbb(nbb_json)
                return img_dir / found[0]
            if found:
                raise DataError(f"holds {found[0]}/ but not {nbb_json.name}, which UNITER's loader reads with it "
                                f"(convert_imgdir.py writes both; without it UNITER reads all/)", shard=str(img_dir),
                                reason="missing_member")
            names = [f"all{s}" for s in suffixes]  # keep-all: nbb from conf
        for n in names:
            if _is_lmdb(img_dir / n):
                return img_dir / n
        held = ", ".join(sorted(x.name for x in img_dir.iterdir())[:6]) or "nothing"
        wanted = (f"feat_numbb{num_bb}/" if conf_th == -1 else
                  f"feat_{tag}/ with nbb_{tag}.json, nor a keep-all all/")
        raise DataError(f"no {wanted} LMDB{' (_compressed)' if compressed else ''} (holds {held})",
                        shard=str(img_dir), reason="missing_member")

    def _load_nbb(self, path: Path) -> None:
        try:
            self.name2nbb = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exn:
            raise DataError(f"unreadable nbb json ({exn})", shard=str(path), reason="invalid_json") from None
        self.nbb_note = f"nbb from {path.name}"

    def _probe(self, name: str, keep_cls: bool) -> None:
        raw = self.txn.get(name.encode())
        if raw is None:
            raise DataError("listed in __keys__ but absent", shard=self.path, key=name, reason="missing_image")
        try:
            v = decode_value(raw)
        except UnreadableValue as exn:
            allen = " (an allennlp-style LMDB?)" if exn.kind.startswith("torch") else ""
            raise DataError(f"values are {exn.kind}{allen}, which this converter does not read: it reads UNITER's "
                            "img_db values (msgpack_numpy maps or npz)", shard=self.path, key=name,
                            reason="undecodable") from None
        except Exception as exn:  # a codec failure on the first value says the format is not what it seems
            raise DataError(f"value does not decode ({type(exn).__name__}: {exn})", shard=self.path, key=name,
                            reason="undecodable") from None
        self._check(name, v)
        self.feature_dim = int(v["features"].shape[1])
        self.class_dim = int(v["soft_labels"].shape[1]) if keep_cls and "soft_labels" in v else None
        self.box_columns = int(v["norm_bb"].shape[1])

    def _check(self, name: str, v: dict) -> None:
        missing = [f for f in ("features", "norm_bb") if f not in v]
        if self.name2nbb is None and self.fixed_nbb is None and "conf" not in v:
            missing.append("conf (needed to compute nbb)")
        if missing:
            raise DataError(f"value lacks {', '.join(missing)} (holds {', '.join(sorted(v)) or 'nothing'})",
                            shard=self.path, key=name, reason="missing_member")
        if v["features"].ndim != 2 or v["norm_bb"].ndim != 2 or v["norm_bb"].shape[1] < 4:
            raise DataError(f"features {v['features'].shape} and norm_bb {v['norm_bb'].shape} are not [n, D] and "
                            "[n, 6 or 7]", shard=self.path, key=name, reason="wrong_dim")

    def __contains__(self, name: str) -> bool:
        with self.txn.cursor() as cur:  # not txn.get: that copies the value (the image's regions) out
            return cur.set_key(name.encode())

    def nbb(self, name: str, value: dict) -> int:
        if self.fixed_nbb is not None:
            return self.fixed_nbb
        if self.name2nbb is not None:
            if name not in self.name2nbb:
                raise DataError("not in the nbb json", shard=self.path, key=name, reason="missing_image")
            return int(self.name2nbb[name])
        return compute_nbb(value["conf"], self.conf_th, self.min_bb, self.max_bb)

    def read(self, name: str, raw: bytes | None = None):
        raw = self.txn.get(name.encode()) if raw is None else raw
        if raw is None:
            raise DataError("not in the img_db", shard=self.path, key=name, reason="missing_image")
        try:
            v = decode_value(raw)
        except Exception as exn:  # one broken value is that image's problem
            what = f"is {exn.kind}" if isinstance(exn, UnreadableValue) else f"does not decode ({type(exn).__name__}: {exn})"
            raise DataError(f"value {what}", shard=self.path, key=name, reason="undecodable") from None
        self._check(name, v)
        n = self.nbb(name, v)
        feat = v["features"][:n]
        if feat.shape[1] != self.feature_dim:
            raise DataError(f"{feat.shape[1]}-d features, the img_db's first image has {self.feature_dim}",
                            shard=self.path, key=name, reason="wrong_dim")
        box = np.ascontiguousarray(v["norm_bb"][:n, :4], dtype=np.float32)  # x1,y1,x2,y2 (w, h, area follow)
        cls = None
        if self.class_dim:
            if "soft_labels" not in v:
                raise DataError("value lacks soft_labels (the img_db's first image has them)", shard=self.path,
                                key=name, reason="missing_member")
            cls = v["soft_labels"][:n].astype(np.float16, copy=False)
        return feat.astype(np.float16, copy=False), box, cls

    def close(self) -> None:
        self.txn.abort()
        self.env.close()


def uniter_name(filename: str) -> str | None:
    """The img_db key UNITER's prepro gives an image file: COCO_val2014_000000391895.jpg →
    coco_val2014_000000391895.npz, 1000092795.jpg (Flickr30k) → flickr30k_001000092795.npz."""
    stem = Path(filename).stem
    m = re.fullmatch(r"COCO_(train|val|test)(\d{4})_(\d+)", stem, flags=re.IGNORECASE)
    if m:
        return f"coco_{m[1].lower()}{m[2]}_{int(m[3]):012d}.npz"
    if stem.isdigit():
        return f"flickr30k_{int(stem):012d}.npz"
    return None


class ImgDbFeatures:
    """A FeatureSource over img_dbs: each record's regions from the first img_db holding one of its keys."""

    def __init__(self, dbs: list[ImgDb], keys, name: str):
        self.dbs, self.keys, self.name = dbs, keys, name
        self.feature_dim, self.class_dim = joint_dims(dbs)
        self.boxes_note = "detector boxes (norm_bb), first nbb regions: " + "; ".join(sorted({d.nbb_note for d in dbs}))

    def features(self, items: Iterator[Item], policy: ErrorPolicy):
        for item in items:
            keys = self.keys(item.record)
            try:
                found = next(((db, k, raw) for k in keys for db in self.dbs
                              if (raw := db.txn.get(k.encode())) is not None), None)
                if found is None:
                    raise DataError(f"no such key in {' or '.join(d.path for d in self.dbs)}",
                                    shard=item.record.filename, key=" / ".join(keys), reason="missing_image")
                db, key, raw = found
                feat, box, cls = db.read(key, raw)
            except DataError as err:
                policy(err)
                continue
            yield item, feat, box, cls, None

    def close(self) -> None:
        for db in self.dbs:
            db.close()


class LmdbFeatures(ImgDbFeatures):
    """Caption records joined to one or more img_dbs by key: ``key_format`` over ``{image_id}``,
    ``{filename}``, ``{stem}``, or ``auto``: the file's stem + .npz as it is, lower-cased, or UNITER's name
    for it (uniter_name; Karpathy's COCO train mixes train2014 and val2014 images, and each file name says
    which, so give both img_dbs)."""

    def __init__(self, paths, *, key_format: str = "auto", conf_th: float = 0.2, min_bb: int = 10,
                 max_bb: int = 100, num_bb: int = 36, compressed: bool | None = None, keep_cls: bool = True):
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        dbs = [ImgDb(p, conf_th=conf_th, max_bb=max_bb, min_bb=min_bb, num_bb=num_bb, compressed=compressed,
                     keep_cls=keep_cls) for p in paths]
        self.key_format = key_format
        super().__init__(dbs, self.record_keys,
                         "lmdb:" + ",".join(Path(d.path).parent.name + "/" + Path(d.path).name for d in dbs))

    def record_keys(self, r) -> list[str]:
        stem = Path(r.filename).stem
        if self.key_format != "auto":
            return [self.key_format.format(image_id=r.image_id, filename=r.filename, stem=stem)]
        return list(dict.fromkeys(k for k in (f"{stem}.npz", f"{stem.lower()}.npz", uniter_name(r.filename)) if k))


def joint_dims(dbs: list[ImgDb]) -> tuple[int, int | None]:
    """The feature dim all img_dbs share, and the class dim when every one has soft labels."""
    dims = {d.feature_dim for d in dbs}
    if len(dims) > 1:
        raise DataError("img_dbs disagree on the feature dim: " + ", ".join(f"{d.path} {d.feature_dim}" for d in dbs))
    classes = {d.class_dim for d in dbs}
    if len(classes) > 1:
        log.warning("not every img_db has soft labels (%s): the shards get none",
                    ", ".join(f"{d.path}: {d.class_dim}" for d in dbs))
        for d in dbs:
            d.class_dim = None
        return dims.pop(), None
    return dims.pop(), classes.pop()
