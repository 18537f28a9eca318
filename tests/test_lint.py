"""The code base passes `ruff check` (pyproject.toml's [tool.ruff]: pyflakes and pycodestyle): undefined
names, unused imports, shadowed variables and the like fail here rather than in a job."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).parent / "ruff"


def test_ruff_check_passes():
    # ruff is a dev dependency (pyproject.toml, constraints.txt): `make setup` installs it
    assert RUFF.is_file(), f"{RUFF} missing: ruff is in the dev extras; run make setup"
    proc = subprocess.run([str(RUFF), "check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
