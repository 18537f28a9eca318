"""`shard-%06d.tar` files byte for byte as webdataset's ShardWriter(mtime=0) writes them, at the disk's speed.

ShardWriter goes through tarfile, which copies each member through a BytesIO in 16 KiB pieces and re-slices
its record buffer on every piece, and builds every header with TarInfo.tobuf; encoding an array first
copies it into a BytesIO. Here a member is its header (a template with the name, size and checksum filled
in; tobuf for what the template cannot hold), then the payload's own memory, then the padding to 512
bytes: an array is written from its buffer behind its .npy header. tests/data/test_writer.py holds the
output against ShardWriter's.

Each sample is checked as it is encoded, from the bytes about to be written: the .npy header of every
array is read back with numpy's parser and must give the array's shape and dtype, the ``json`` member is
parsed and its fields validated. When a shard is complete its file is checked on disk: the size is what
was written, every member header reads back as written, and the archive ends as tar ends.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Callable

import numpy as np
import numpy.lib.format as npy_format
import webdataset as wds

from ldot.data import schema
from ldot.data.errors import DataError

BLOCK, RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
# What tarfile.open(mode="w|") uses, as webdataset's TarWriter opens it (format is not passed through).
_FORMAT, _ENCODING, _ERRORS = tarfile.TarFile.format, tarfile.ENCODING, "surrogateescape"
_ZEROS = bytes(BLOCK)


def member_header(name: str, size: int) -> bytes:
    """The header tarfile writes for a member of webdataset's TarWriter (mode 0444, bigdata:bigdata, mtime 0)."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = size, 0, 0o444, "bigdata", "bigdata"
    return ti.tobuf(_FORMAT, _ENCODING, _ERRORS)


_TEMPLATE = member_header("", 0)
# The checksum is 256 (its own field as spaces) plus every other byte; name and size are added per member.
_BASE_SUM = 256 + sum(_TEMPLATE[100:124]) + sum(_TEMPLATE[136:148]) + sum(_TEMPLATE[156:])


def fast_header(name: str, size: int) -> bytes:
    """member_header without tarfile's per-call work: an ASCII name of at most 100 bytes and a size under
    8 GiB fill the template's fields; anything else (which tar puts in a pax header) goes to tobuf."""
    if not name.isascii() or len(name) > 100 or not 0 <= size < 8 ** 11:
        return member_header(name, size)
    raw_name = name.encode("ascii")
    raw_size = b"%011o\0" % size
    chksum = _BASE_SUM + sum(raw_name) + sum(raw_size)
    return b"".join((raw_name.ljust(100, b"\0"), _TEMPLATE[100:124], raw_size, _TEMPLATE[136:148],
                     b"%06o\0" % chksum, _TEMPLATE[155:]))


_NPY_HEADERS: dict[tuple, bytes] = {}


def _unreadable(arr: np.ndarray) -> DataError:
    return DataError(f"the .npy encoding of a {arr.dtype} {arr.shape} array does not read back as it",
                     reason="undecodable")


def _npy_header(arr: np.ndarray) -> bytes:
    """np.save's header for a C-contiguous array, parsed back with numpy's reader once per (dtype, shape)."""
    key = (arr.dtype.str, arr.shape)
    header = _NPY_HEADERS.get(key)
    if header is None:
        buf = io.BytesIO()
        npy_format.write_array_header_1_0(buf, npy_format.header_data_from_array_1_0(arr))
        header = buf.getvalue()
        buf.seek(0)
        if (npy_format.read_magic(buf) != (1, 0)
                or npy_format.read_array_header_1_0(buf) != (arr.shape, False, arr.dtype) or buf.tell() != len(header)):
            raise _unreadable(arr)
        if len(_NPY_HEADERS) < 4096:
            _NPY_HEADERS[key] = header
    return header


def encode_npy(arr: np.ndarray, check: bool = True) -> list:
    """What webdataset's npy encoder (numpy.lib.format.write_array) gives, as pieces: the header and the array's
    own buffer when it is a C-contiguous array of a plain dtype (no copy), else write_array's bytes."""
    if arr.flags.c_contiguous and arr.dtype.fields is None and not arr.dtype.hasobject and arr.dtype.kind in "biufc":
        try:
            data = memoryview(arr).cast("B")
            return [_npy_header(arr), data]
        except (ValueError, TypeError):  # a header too long for format 1.0 (write_array picks 2.0), an odd buffer
            pass
    raw = wds.writer.numpy_dumps(arr)
    if not check:
        return [raw]
    back = npy_format.read_array(io.BytesIO(raw), allow_pickle=False)
    if back.shape != arr.shape or back.dtype != arr.dtype or back.tobytes() != arr.tobytes():
        raise _unreadable(arr)
    return [raw]


def encode_sample(sample: dict, key: str, check: bool = True) -> list[tuple[str, list]]:
    """(member name, payload pieces) in webdataset's order (sorted), checked as the loader will decode them
    (``check``): every array's .npy header gives its shape and dtype, the json parses into a valid meta."""
    members = []
    for name in sorted(sample):
        if name.startswith("_"):  # __key__ and other metadata: not members (keep_meta=False)
            continue
        value = sample[name]
        if name.endswith(".npy"):
            try:
                pieces = encode_npy(np.asarray(value), check)
            except DataError as err:
                err.key = key
                raise
        elif name == schema.META:
            raw = json.dumps(value).encode("utf-8")
            problems = schema.validate_meta(json.loads(raw)) if check else []
            if problems:
                raise DataError(f"{schema.META} does not survive encoding: {problems[0][1]}", key=key,
                                reason=problems[0][0])
            pieces = [raw]
        elif isinstance(value, (bytes, bytearray, memoryview)):
            pieces = [value]
        else:
            raise DataError(f"member {name} is a {type(value).__name__}, not bytes", key=key, reason="undecodable")
        members.append((f"{key}.{name}", pieces))
    return members


class TarShards:
    """webdataset.ShardWriter's rules (a new shard once ``maxcount`` samples or ``maxsize`` payload bytes are
    in the current one, ``post(fname)`` after each, the first shard opened at once) writing encode_sample's
    members. ``check`` reads each finished shard's headers back from disk."""

    def __init__(self, pattern: str, *, maxcount: int, maxsize: float, start_shard: int = 0,
                 post: Callable[[str], None] | None = None, check: bool = True):
        self.pattern, self.maxcount, self.maxsize, self.post, self.check = pattern, maxcount, maxsize, post, check
        self.shard = start_shard
        self.file = None
        self.fname: str | None = None
        self._open()

    def _open(self) -> None:
        self.fname = self.pattern % self.shard
        self.shard += 1
        self.file = open(self.fname, "wb")
        self.count = self.size = self.offset = 0
        self._headers: list[tuple[int, bytes]] = []

    def write(self, members: list[tuple[str, list]]) -> None:
        if self.count >= self.maxcount or self.size >= self.maxsize:
            self._finish()
            self._open()
        f = self.file
        for name, pieces in members:
            size = sum(memoryview(p).nbytes for p in pieces)
            header = fast_header(name, size)
            if self.check:
                self._headers.append((self.offset, header))
            f.write(header)
            for p in pieces:
                f.write(p)
            pad = -size % BLOCK
            if pad:
                f.write(_ZEROS[:pad])
            self.offset += len(header) + size + pad
            self.size += size
        self.count += 1

    def _finish(self, check: bool = True) -> None:
        """End the archive as tarfile does (two zero blocks, then zeros to a whole record), check it, post it."""
        end = self.offset + 2 * BLOCK
        end += -end % RECORD
        self.file.write(bytes(end - self.offset))
        self.file.close()
        self.file = None
        if self.check and check:
            self._check(end)
        if self.post is not None:
            self.post(self.fname)

    def _check(self, end: int) -> None:
        size = os.path.getsize(self.fname)
        if size != end:
            raise DataError(f"shard is {size} bytes on disk, {end} were written", shard=self.fname,
                            reason="corrupt_tar")
        with open(self.fname, "rb", buffering=0) as f:
            fd = f.fileno()
            for offset, header in self._headers:
                if os.pread(fd, len(header), offset) != header:
                    raise DataError(f"the member header at byte {offset} does not read back as written",
                                    shard=self.fname, reason="corrupt_tar")
            tail = end - self.offset
            if os.pread(fd, tail, self.offset) != bytes(tail):
                raise DataError("the archive's end blocks do not read back as zeros", shard=self.fname,
                                reason="corrupt_tar")
        self._headers = []

    def close(self, check: bool = True) -> None:
        """Finish the last shard; ``check=False`` when abandoning the write (its error is the one to see)."""
        if self.file is not None:
            self._finish(check)
