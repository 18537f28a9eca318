"""data/validate.py and `ldot data inspect`: every problem found, named by shard, key and problem."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from datafixtures import BAD_SAMPLES, good_members, truncate, write_raw_dataset
from ldot.data.validate import check_dataset

REPO = Path(__file__).resolve().parents[2]


def test_clean_dataset_passes(small_dataset):
    report = check_dataset(small_dataset, progress=False)
    assert report.ok, report.format()
    assert [r.samples for r in report.rows] == [10, 10, 10, 10, 7]
    assert sum(r.captions for r in report.rows) == 47 * 3
    assert "OK: every sample valid" in report.format()


@pytest.mark.parametrize("name, corrupt, reason", BAD_SAMPLES, ids=[b[0] for b in BAD_SAMPLES])
def test_each_bad_sample_is_reported(tmp_path, name, corrupt, reason):
    samples = [good_members(k) for k in range(4)]
    samples[2] = corrupt(samples[2])
    out = write_raw_dataset(tmp_path / "ds", [samples[:2], samples[2:]])
    report = check_dataset(out, progress=False)
    assert not report.ok
    err = report.first_error()
    assert (Path(err.shard).name, err.key, err.reason) == ("shard-000001.tar", "00000002", reason)
    assert report.rows[0].problems == 0 and report.rows[1].valid == 1


def test_truncated_tar_and_count_mismatches(tmp_path):
    out = write_raw_dataset(tmp_path / "ds", [[good_members(k) for k in range(5)], [good_members(5)]])
    truncate(out / "shard-000000.tar", 0.5)
    (out / "shard-000007.tar").write_bytes(b"")
    report = check_dataset(out, progress=False)
    text = report.format()
    assert report.reasons.get("corrupt_tar", 0) >= 2
    assert "shard-000007.tar: shard file is not in the manifest" in text
    assert "sample(s) lost" in text and "shard-000000.tar" in text


def test_inspect_command_exit_codes(tmp_path, small_dataset):
    ok = subprocess.run([sys.executable, "-m", "ldot.data", "inspect", str(small_dataset)], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and "shard-000004.tar" in ok.stdout, ok.stdout
    assert re.search(r"\b47 samples read \(47 valid\)", ok.stdout), ok.stdout  # "147 samples read" held "47 samples read"
    samples = [good_members(k) for k in range(3)]
    samples[1] = BAD_SAMPLES[2][1](samples[1])  # NaN
    bad = write_raw_dataset(tmp_path / "bad", [samples])
    r = subprocess.run([sys.executable, "-m", "ldot.data", "inspect", str(bad)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert "shard-000000.tar key 00000001: feat.npy holds NaN or inf" in r.stdout
    missing = subprocess.run([sys.executable, "-m", "ldot.data", "inspect", str(tmp_path / "nope")], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
