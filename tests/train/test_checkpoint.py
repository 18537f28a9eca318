"""Checkpoint discovery and pruning: incomplete saves are never resumed from and are cleaned up."""
import pytest

from ldot.train.checkpoint import COMPLETE, CheckpointManager, tag_for
from ldot.train.errors import ConfigError


def _make(root, step, complete=True):
    d = root / tag_for(step)
    d.mkdir(parents=True)
    if complete:
        (d / COMPLETE).write_text("")
    return d


def test_resume_auto_takes_the_newest_complete(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, rank=0)
    assert mgr.resolve("auto") is None and mgr.resolve(None) is None
    _make(tmp_path, 10)
    _make(tmp_path, 20)
    _make(tmp_path, 30, complete=False)  # a crash during this save
    assert mgr.resolve("auto") == tag_for(20)
    assert mgr.resolve(tag_for(10)) == tag_for(10)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        mgr.resolve(tag_for(30))


def test_prune_keeps_last_k_and_drops_broken_older_ones(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, rank=0)
    for s in (10, 20, 30):
        _make(tmp_path, s)
    _make(tmp_path, 25, complete=False)
    _make(tmp_path, 40, complete=False)  # possibly a save in progress: newer than the newest, kept
    mgr._prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(20), tag_for(30), tag_for(40)]
