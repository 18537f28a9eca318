"""`make setup` installs once and then does nothing until pyproject.toml or constraints.txt changes
(the README's promise; the stamp rule in the Makefile).

The project's own Makefile runs in a scratch copy of the two dependency files, with VENV pointing at a
stand-in venv whose `python` only records how it was called: the rule's decisions are what is tested,
and creating or installing a real venv here would take minutes."""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup(work: Path) -> list[str]:
    """Runs `make setup`; returns the python calls it made."""
    log = work / "calls.log"
    log.unlink(missing_ok=True)
    proc = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "setup", f"VENV={work / 'venv'}"], cwd=work,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return log.read_text().splitlines() if log.exists() else []


def test_make_setup_does_nothing_the_second_time(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "calls.log"}\n')
    python.chmod(0o755)

    first = _setup(tmp_path)
    assert len(first) == 3 and all(call.startswith("-m pip install") for call in first), first
    assert (tmp_path / "venv" / ".ldot-installed").is_file()
    assert _setup(tmp_path) == []  # the second time: nothing

    # a changed dependency file installs again, then nothing again
    for name in ("constraints.txt", "pyproject.toml"):
        # installed at now - 100, both files older, then this one changed (make compares mtimes)
        now = time.time()
        for path, age in ((tmp_path / "pyproject.toml", 200), (tmp_path / "constraints.txt", 200),
                          (tmp_path / "venv" / ".ldot-installed", 100), (tmp_path / name, 50)):
            os.utime(path, (now - age, now - age))
        assert len(_setup(tmp_path)) == 3, name
        assert _setup(tmp_path) == [], name
