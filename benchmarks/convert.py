"""Converter benchmark: images/s of `ldot data convert --format uniter` on a UNITER db against reading the
same LMDB with plain lmdb + msgpack (the floor: every value unpacked to arrays, nothing written). Appends a
"## convert" run to RESULTS.md.

    PYTHONPATH=. python benchmarks/convert.py [--images 5000] [--dim 2048] [--compressed] [--no-record]

Data, written to a temporary directory as UNITER's scripts write it: an img_db (feat_th0.2_max100_min10
LMDB of msgpack_numpy values, or npz with --compressed; float16 features and boxes, 10–100 regions an
image, random; __keys__ and the nbb json) and a txt_db of 5 captions an image (lz4-frame msgpack). The
converter's time is the whole command: reading the txt_db, the regions, writing the shards and its
verification (every sample's encoding checked in memory, each shard's size and member headers on disk).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from results import append_run, device  # noqa: E402


def write_dbs(root: Path, n: int, dim: int, lo: int, hi: int, compressed: bool, seed: int = 0) -> tuple[Path, Path]:
    import lmdb
    import lz4.frame
    import msgpack
    import msgpack_numpy

    rng = np.random.default_rng(seed)
    img_dir = root / "img_db" / "coco_val2014"
    img_dir.mkdir(parents=True)
    name = "feat_th0.2_max100_min10" + ("_compressed" if compressed else "")
    env = lmdb.open(str(img_dir / name), map_size=1 << 36)
    names, nbb = [], {}
    txn = env.begin(write=True)
    for i in range(n):
        k = int(rng.integers(lo, hi + 1))
        xy = rng.uniform(0, 0.6, (k, 2))
        wh = rng.uniform(0.05, 0.4, (k, 2))
        dump = {"features": rng.standard_normal((k, dim), dtype=np.float32).astype(np.float16),
                "norm_bb": np.concatenate([xy, xy + wh, wh], 1).astype(np.float16),
                "conf": rng.uniform(0.2, 1, k).astype(np.float16),
                "soft_labels": rng.dirichlet(np.ones(8), k).astype(np.float16)}
        fname = f"coco_val2014_{i:012d}.npz"
        if compressed:
            import io

            buf = io.BytesIO()
            np.savez_compressed(buf, **dump)
            value = buf.getvalue()
        else:
            value = msgpack.packb(dump, default=msgpack_numpy.encode, use_bin_type=True)
        txn.put(fname.encode(), value)
        names.append(fname)
        nbb[fname] = k
        if i % 1000 == 999:
            txn.commit()
            txn = env.begin(write=True)
    txn.put(b"__keys__", json.dumps(names).encode())
    txn.commit()
    env.close()
    (img_dir / "nbb_th0.2_max100_min10.json").write_text(json.dumps(nbb))

    txt_db = root / "itm_coco_test_base-cased.db"
    env = lmdb.open(str(txt_db), map_size=1 << 30)
    txt2img = {}
    with env.begin(write=True) as txn:
        for i, fname in enumerate(names):
            for j in range(5):
                sid = str(5 * i + j)
                ex = {"raw": f"a photo {i} caption {j}", "input_ids": [170, 3219, 1], "img_fname": fname,
                      "image_id": i, "sentid": 5 * i + j}
                txn.put(sid.encode(), lz4.frame.compress(msgpack.packb(ex, use_bin_type=True)))
                txt2img[sid] = fname
    env.close()
    (txt_db / "txt2img.json").write_text(json.dumps(txt2img))
    (txt_db / "meta.json").write_text(json.dumps({"bert": "bert-base-cased", "CLS": 101, "SEP": 102}))
    return img_dir, txt_db


def floor(img_dir: Path, compressed: bool) -> float:
    """Seconds to read every value with plain lmdb + msgpack (msgpack_numpy arrays) or np.load."""
    import io

    import lmdb
    import msgpack
    import msgpack_numpy

    name = "feat_th0.2_max100_min10" + ("_compressed" if compressed else "")
    nbb = json.loads((img_dir / "nbb_th0.2_max100_min10.json").read_text())
    t = time.perf_counter()
    env = lmdb.open(str(img_dir / name), readonly=True, lock=False, readahead=False)
    total = 0
    with env.begin() as txn:
        for fname in json.loads(txn.get(b"__keys__")):
            raw = txn.get(fname.encode())
            if compressed:
                with np.load(io.BytesIO(raw)) as z:
                    v = {"features": z["features"], "norm_bb": z["norm_bb"]}
            else:
                v = msgpack.unpackb(raw, raw=False, object_hook=msgpack_numpy.decode)
            total += v["features"][: nbb[fname]].shape[0] + v["norm_bb"].shape[0]
    env.close()
    return time.perf_counter() - t


def io_floor(img_dir: Path, out: Path) -> float:
    """Seconds to read every value as the floor does and write its regions' bytes to one file: what any
    converter that writes the regions once cannot beat (no tar, no checks, no read-back)."""
    import lmdb
    import msgpack
    import msgpack_numpy

    nbb = json.loads((img_dir / "nbb_th0.2_max100_min10.json").read_text())
    t = time.perf_counter()
    env = lmdb.open(str(img_dir / "feat_th0.2_max100_min10"), readonly=True, lock=False, readahead=False)
    with env.begin() as txn, open(out, "wb") as f:
        for fname in json.loads(txn.get(b"__keys__")):
            v = msgpack.unpackb(txn.get(fname.encode()), raw=False, object_hook=msgpack_numpy.decode)
            f.write(v["features"][: nbb[fname]].tobytes())
            f.write(v["norm_bb"][: nbb[fname], :4].astype(np.float32).tobytes())
    env.close()
    dt = time.perf_counter() - t
    out.unlink()
    return dt


def convert(img_dir: Path, txt_db: Path, out: Path, compressed: bool) -> tuple[float, object]:
    from ldot.data.__main__ import build_parser
    from ldot.data.convert import run_convert
    from ldot.data.schema import read_manifest

    argv = ["convert", "--format", "uniter", "--img-db", str(img_dir), "--txt-db", str(txt_db), "--out", str(out),
            "--overwrite"] + (["--compressed"] if compressed else [])
    t = time.perf_counter()
    run_convert(build_parser().parse_args(argv))
    return time.perf_counter() - t, read_manifest(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--dim", type=int, default=2048, help="feature dim (the paper's detector: 2048)")
    p.add_argument("--regions", type=int, nargs=2, default=[10, 100], help="fewest and most regions an image")
    p.add_argument("--compressed", action="store_true", help="the _compressed img_db (npz values)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best is reported")
    p.add_argument("--workdir", default=None, help="where the dbs and shards go (default: a temporary directory)")
    p.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args()

    os.environ.setdefault("TQDM_DISABLE", "1")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        img_dir, txt_db = write_dbs(root, args.images, args.dim, *args.regions, args.compressed)
        made = time.perf_counter() - t
        db_bytes = sum(f.stat().st_size for f in (img_dir).rglob("*.mdb"))
        floors = [floor(img_dir, args.compressed) for _ in range(args.repeats)]
        io_floors = [] if args.compressed else [io_floor(img_dir, root / "raw.bin") for _ in range(args.repeats)]
        runs = [convert(img_dir, txt_db, root / "out", args.compressed) for _ in range(args.repeats)]
        conv, manifest = min(runs, key=lambda r: r[0])
        out_bytes = sum(f.stat().st_size for f in (root / "out").glob("shard-*.tar"))
    f = min(floors)
    n = args.images
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    kind = "npz (_compressed)" if args.compressed else "msgpack_numpy"
    text = "\n".join([
        f"### {stamp} · {device(gpu=False)}", "",
        f"`PYTHONPATH=. python {shlex.join(['benchmarks/convert.py', *sys.argv[1:]])}` — {n:,} images, "
        f"{args.dim}-d float16 features, {args.regions[0]}–{args.regions[1]} regions an image (random), {kind} "
        f"values, img_db {db_bytes / 2**30:.2f} GiB, shards {out_bytes / 2**30:.2f} GiB; 5 captions an image; "
        f"best of {args.repeats}.", "",
        "| reader | s | images/s | vs the floor |", "| --- | --- | --- | --- |",
        f"| plain lmdb + msgpack, values unpacked (the floor) | {f:.2f} | {n / f:,.0f} | 1.00× |",
        *([f"| the floor + writing the regions' bytes to one file (the I/O floor) | {min(io_floors):.2f} | "
           f"{n / min(io_floors):,.0f} | {f / min(io_floors):.2f}× |"] if io_floors else []),
        f"| `ldot data convert --format uniter` (txt_db, regions, shards, verification) | {conv:.2f} | "
        f"{n / conv:,.0f} | {f / conv:.2f}×" + (f" ({min(io_floors) / conv:.2f}× the I/O floor)" if io_floors else "")
        + " |", "",
        f"- wrote {manifest.num_samples:,} samples, {manifest.num_captions:,} captions in {len(manifest.shards)} "
        f"shards; writing the dbs took {made:.1f} s (not timed)",
        "- the floor writes nothing; the converter writes every region once and checks each sample's encoding in "
        "memory and each shard's size and member headers on disk (`ldot data inspect` reads every sample back)",
    ])
    print(text)
    if not args.no_record:
        append_run("convert", text)


if __name__ == "__main__":
    main()
