"""Whole-dataset validation behind `ldot data inspect` and the writers' read-back check."""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path

from ldot.data import schema
from ldot.data.errors import DataError
from ldot.data.progress import progress_bar
from ldot.data.reader import ErrorPolicy, read_shard


class _Collect(ErrorPolicy):
    """Skip-and-remember: inspect wants every problem, not the first one."""

    def __init__(self, sink: list[DataError]):
        super().__init__("skip")
        self.sink = sink

    def skip(self, err: DataError, n: int = 1) -> None:
        self.counts[err.reason] += n
        self.sink.append(err)


@dataclasses.dataclass
class ShardRow:
    name: str
    expected: int | None  # samples the manifest promises (None: shard not in the manifest)
    samples: int = 0  # samples read
    valid: int = 0
    captions: int = 0
    regions_min: int | None = None
    regions_max: int | None = None
    problems: int = 0


@dataclasses.dataclass
class Report:
    data_dir: str
    manifest: schema.Manifest | None
    rows: list[ShardRow]
    problems: list[DataError]
    reasons: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.problems

    def first_error(self) -> DataError:
        return self.problems[0]

    def format(self, max_problems: int = 20) -> str:
        m = self.manifest
        lines = [f"dataset {self.data_dir}"]
        if m is not None:
            lines.append(f"  schema v{m.schema_version} · source {m.source!r} · split {m.split} · feature dim "
                         f"{m.feature_dim} · class dim {m.class_dim} · thumbnails {m.has_thumbnails}")
            lines.append(f"  made by: {m.command}")
        samples = sum(r.samples for r in self.rows)
        valid = sum(r.valid for r in self.rows)
        caps = sum(r.captions for r in self.rows)
        lines.append(f"  totals: {len(self.rows)} shards · {samples} samples read ({valid} valid) · {caps} captions"
                     + (f" · manifest says {m.num_samples} samples, {m.num_captions} captions" if m else ""))
        lines.append("")
        lines.append(f"  {'shard':<22} {'manifest':>8} {'read':>7} {'valid':>7} {'captions':>8} {'regions':>9} {'bad':>5}")
        for r in self.rows:
            regions = f"{r.regions_min}-{r.regions_max}" if r.regions_min is not None else "-"
            expected = "-" if r.expected is None else str(r.expected)
            lines.append(f"  {r.name:<22} {expected:>8} {r.samples:>7} {r.valid:>7} {r.captions:>8} {regions:>9} "
                         f"{r.problems:>5}")
        lines.append("")
        if self.ok:
            lines.append("OK: every sample valid, counts match the manifest")
        else:
            lines.append(f"FAILED: {len(self.problems)} problem(s) · by reason {dict(self.reasons)}")
            for err in self.problems[:max_problems]:
                lines.append(f"  error: {err}")
            if len(self.problems) > max_problems:
                lines.append(f"  ... and {len(self.problems) - max_problems} more")
        return "\n".join(lines)


def check_dataset(data_dir: str | os.PathLike, *, progress: bool | None = None) -> Report:
    """Read every sample of a dataset directory; collect every problem instead of stopping at one."""
    data_dir = Path(data_dir)
    problems: list[DataError] = []
    manifest = schema.read_manifest(data_dir)  # unreadable manifest: nothing else can be checked
    policy = _Collect(problems)

    listed = [s.name for s in manifest.shards]
    on_disk = sorted(p.name for p in data_dir.glob(schema.SHARD_GLOB))
    for name in sorted(set(on_disk) - set(listed)):
        problems.append(DataError("shard file is not in the manifest", shard=str(data_dir / name), reason="corrupt_tar"))

    rows: list[ShardRow] = []
    keys: set[str] = set()
    bar = progress_bar(total=manifest.num_samples, desc="inspect", unit="sample", disable=progress is False)
    for info in manifest.shards:
        row = ShardRow(info.name, info.samples)
        rows.append(row)
        path = str(data_dir / info.name)
        if not os.path.isfile(path):
            problems.append(DataError("shard listed in the manifest is missing", shard=path, reason="corrupt_tar"))
            row.problems += 1
            continue
        before = len(problems)
        for raw in read_shard(path, policy, expected=info.samples):
            row.samples += 1
            bar.update(1)
            key = raw.get("__key__")
            if key in keys:
                problems.append(DataError("duplicate sample key", shard=path, key=key, reason="invalid_json"))
            keys.add(key)
            try:
                sample = schema.decode_sample(raw)
            except DataError as err:
                problems.append(err)
                continue
            found = schema.validate_sample(sample, manifest.feature_dim, manifest.class_dim)
            for reason, text in found:
                problems.append(DataError(text, shard=path, key=key, reason=reason))
            if found:
                continue
            row.valid += 1
            row.captions += len(sample[schema.META]["captions"])
            n = sample[schema.FEAT].shape[0]
            row.regions_min = n if row.regions_min is None else min(row.regions_min, n)
            row.regions_max = n if row.regions_max is None else max(row.regions_max, n)
        if row.samples > info.samples:
            problems.append(DataError(f"shard holds {row.samples} samples, the manifest says {info.samples}",
                                      shard=path, reason="corrupt_tar"))
        if row.valid == row.samples == info.samples and row.captions != info.captions:
            problems.append(DataError(f"shard holds {row.captions} captions, the manifest says {info.captions}",
                                      shard=path, reason="invalid_json"))
        row.problems = len(problems) - before
    bar.close()
    reasons = collections.Counter(err.reason for err in problems)
    return Report(str(data_dir), manifest, rows, problems, dict(reasons))
