"""`ldot train` outside Slurm refuses bad input with one line `error: ...` on stderr and exit 2, before
torch, DeepSpeed or transformers are imported (so before any model is built, and in a fraction of a
second instead of the trainer's start-up). Each case is one the issue found costing a whole job."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LDOT = Path(sys.executable).parent / "ldot"
HEAVY = ("torch", "deepspeed", "transformers")
# The real command's entry point, then which heavy modules it had imported by the time it returned.
PROBE = ("import sys\nfrom ldot.cli import main\nrc = main(sys.argv[1:])\n"
         f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\nsys.exit(rc)")


def _env():
    # outside Slurm: no SLURM_* variables, whatever the machine running the tests has
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def _dataset(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"num_samples": 1}))
    return path


def _refused(*overrides: str) -> str:
    """Runs `ldot train --config demo.yaml OVERRIDES` from the checkout; returns its one stderr line."""
    proc = subprocess.run([sys.executable, "-c", PROBE, "train", "--config", "train/configs/demo.yaml", *overrides],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert proc.stdout.strip() == "", f"imported before the input was checked: {proc.stdout}"
    return lines[0]


def test_a_config_typo_is_reported_at_once():
    start = time.perf_counter()
    proc = subprocess.run([str(LDOT), "train", "--config", "train/configs/demo.yaml", "optim.lrr=1e-5"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "error: unknown config key in section 'optim': lrr "
        "(known: betas, eps, grad_accum, grad_clip, lr, max_steps, warmup_ratio, weight_decay)"]
    # ~0.2 s here; importing the trainer first took ~6 s (issue 12)
    assert elapsed < 2.0, f"{elapsed:.1f} s to report a typo"
    assert _refused("optim.lrr=1e-5") == proc.stderr.strip()


def test_an_output_dir_under_a_file(tmp_path):
    data = _dataset(tmp_path / "train")
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "run"
    assert _refused(f"data.train={data}", f"output_dir={out}") == \
        f"error: output_dir: {out} cannot be created: {tmp_path / 'afile'} is a file"


@pytest.mark.parametrize("out", ["/sys/kernel", "/sys/ldot-test-run/out"], ids=["existing", "to-create"])
def test_an_unwritable_output_dir(tmp_path, out):
    """Tests run as root here, for whom a chmod'ed directory is writable and a read-only bind mount needs
    privileges. sysfs refuses new files and directories to everyone, root included (EPERM to root,
    EACCES to others)."""
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs at /sys on this machine")
    data = _dataset(tmp_path / "train")
    line = _refused(f"data.train={data}", f"output_dir={out}")
    assert line in (f"error: output_dir: {out} is not writable (Permission denied)",
                    f"error: output_dir: {out} is not writable (Operation not permitted)"), line


def test_missing_datasets_and_checkpoints(tmp_path):
    data, out = _dataset(tmp_path / "train"), tmp_path / "run"
    assert _refused(f"data.train={tmp_path / 'tarin'}", f"output_dir={out}") == \
        f"error: data.train: no dataset directory at {tmp_path / 'tarin'}"
    (tmp_path / "empty").mkdir()
    assert _refused(f"data.train={tmp_path / 'empty'}", f"output_dir={out}") == (
        f"error: data.train: {tmp_path / 'empty'} is not a dataset directory (no manifest.json; make one with "
        "`ldot data`)")
    assert _refused(f"data.train={data}", f"data.val={tmp_path / 'vla'}", f"output_dir={out}") == \
        f"error: data.val: no dataset directory at {tmp_path / 'vla'}"
    assert _refused(f"data.train={data}", f"model.init_from={tmp_path / 'export'}", f"output_dir={out}") == \
        f"error: model.init_from: {tmp_path / 'export'} is not an exported ldot checkpoint (no ldot.json)"
    assert not out.exists()  # refused before the output directory was made


def test_missing_rerank_inputs(tmp_path):
    """task=rerank's own inputs are checked before anything is imported, like the dataset's."""
    data, out = _dataset(tmp_path / "train"), tmp_path / "run"
    rerank = ["task=rerank", f"data.train={data}", f"output_dir={out}"]
    assert _refused(*rerank, f"rerank.mined={tmp_path / 'miend'}") == \
        f"error: rerank.mined: no `ldot eval mine` output directory at {tmp_path / 'miend'}"
    (tmp_path / "mined").mkdir()
    rerank.append(f"rerank.mined={tmp_path / 'mined'}")
    assert _refused(*rerank, f"rerank.init_from={tmp_path / 'export'}") == \
        f"error: rerank.init_from: {tmp_path / 'export'} is not an exported ldot checkpoint (no ldot.json)"
    assert _refused(*rerank, f"rerank.uniter={tmp_path / 'uniter-base.pt'}", f"model.tokenizer={data}") == \
        f"error: rerank.uniter: {tmp_path / 'uniter-base.pt'} not found"
    # a 2-layer re-ranker export (its ldot.json as export_cross_encoder writes it) cut to 1 layer
    export = tmp_path / "reranker"
    export.mkdir()
    (export / "ldot.json").write_text(json.dumps({"format": "ldot-cross-encoder", "version": 1, "layers": 2}))
    assert _refused(*rerank, f"rerank.init_from={export}", "rerank.layers=1") == (
        f"error: rerank.layers=1: rerank.init_from={export} is a trained 2-layer re-ranker, whose ITM head reads its "
        "last layer; set rerank.layers=2 (or null) to start from all of it")
    assert not out.exists()


def test_preflights_copies_of_format_names_agree():
    """preflight names formats without importing their modules (they pull in torch): its copies must agree."""
    from ldot.data.schema import MANIFEST
    from ldot.model.cross_encoder import CROSS_FORMAT
    from ldot.model.export import EXPORT_META
    from ldot.train import preflight

    assert (preflight.MANIFEST, preflight.EXPORT_META, preflight.CROSS_FORMAT) == (MANIFEST, EXPORT_META, CROSS_FORMAT)
