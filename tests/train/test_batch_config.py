"""Batch semantics and the config sections of issue 15: data.global_batch_size (divided over ranks and
accumulation; one of it and data.batch_size), the recipes' paper batch, data.train as a mix of training sets,
and the hard_negatives section's checks."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldot.train.config import TrainSet, load_config
from ldot.train.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "train" / "configs" / "demo.yaml"
PROBE = ("import sys\nfrom ldot.cli import main\nrc = main(sys.argv[1:])\n"
         "print(' '.join(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))\nsys.exit(rc)")


def test_a_global_batch_is_divided_over_ranks_and_accumulation():
    cfg = load_config(DEMO, ["data.batch_size=null", "data.global_batch_size=96"])
    assert cfg.data.micro_batch(1, 1) == 96 and cfg.data.micro_batch(8, 1) == 12 and cfg.data.micro_batch(4, 3) == 8
    with pytest.raises(ConfigError, match=r"^data.global_batch_size=96 does not divide over 5 ranks x "
                                          r"optim.grad_accum=1$"):
        cfg.data.micro_batch(5, 1)
    with pytest.raises(ConfigError, match="does not divide over 64 ranks"):
        cfg.data.micro_batch(64, 2)
    # data.batch_size stays per rank, whatever the world; 32 when neither is set
    assert load_config(DEMO, ["data.batch_size=16"]).data.micro_batch(8, 2) == 16
    assert load_config(DEMO, ["data.batch_size=null"]).data.micro_batch(8, 2) == 32


@pytest.mark.parametrize("overrides,match", [
    (["data.global_batch_size=96"], "data.batch_size \\(per rank\\) and data.global_batch_size are both set"),
    (["data.batch_size=null", "data.global_batch_size=0"], "data.global_batch_size must be >= 1"),
    (["data.batch_size=null", "data.global_batch_size=64", "data.token_budget=2000"], "token budget batches per rank"),
    (["data.train=[]"], "an empty list of training sets"),
    (["data.train=[{path: a}]"], "a list of training sets mixes pretraining tasks; task=finetune"),
    (["task=pretrain", "data.train=[{cmr: 1}]"], "every training set of a mix needs a path"),
    (["task=pretrain", "data.train=[{path: a, mrfr: -1}]"], "the task ratios of a must be >= 0"),
    (["task=pretrain", "data.train=[{path: a, weight: 2}]"], "unknown config key in section 'data.train\\[0\\]': weight"),
    (["hard_negatives.num_hard_negatives=2", "task=pretrain"], "hard negatives are for task=finetune"),
    (["hard_negatives.num_hard_negatives=2", "loss.impl=reference"], "loss.impl=reference has no hard-negative"),
    (["hard_negatives.num_hard_negatives=8", "hard_negatives.pool=4"], "pool=4 is below num_hard_negatives=8"),
])
def test_bad_batch_and_section_settings_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DEMO, overrides)


def test_a_mix_of_training_sets():
    cfg = load_config(DEMO, ["task=pretrain", "data.train=[{path: coco, cmr: 16, vmlm: 8, mrfr: 4, mrckl: 4}, "
                                              "{path: cc, vmlm: 12, mrfr: 6, mrckl: 6}]"])
    assert cfg.data.train == [TrainSet("coco", 16, 8, 4, 4), TrainSet("cc", None, 12, 6, 6)]
    assert cfg.data.train_sets(cfg.pretrain.ratios()) == [
        ("coco", {"cmr": 16, "vmlm": 8, "mrfr": 4, "mrckl": 4}), ("cc", {"cmr": 16, "vmlm": 12, "mrfr": 6, "mrckl": 6})]
    assert load_config(DEMO).data.train_sets({"cmr": 1.0}) == [("out/demo/data/train", {"cmr": 1.0})]


@pytest.mark.parametrize("name", ["finetune-flickr30k", "finetune-coco"])
def test_the_fine_tuning_recipes_state_the_papers_global_batch(name):
    cfg = load_config(ROOT / "train" / "configs" / f"{name}.yaml")
    assert cfg.data.global_batch_size == 96 and cfg.data.batch_size is None
    assert cfg.data.micro_batch(8, cfg.optim.grad_accum) == 12 and cfg.data.micro_batch(1, cfg.optim.grad_accum) == 96


def test_the_pretraining_recipe_mixes_coco_sbu_and_vg_cc_at_their_ratios():
    cfg = load_config(ROOT / "train" / "configs" / "pretrain-paper.yaml")
    ratios = {Path(p).name: r for p, r in cfg.data.train_sets(cfg.pretrain.ratios())}
    assert ratios["coco"] == ratios["sbu"] == {"cmr": 16, "vmlm": 8, "mrfr": 4, "mrckl": 4}
    assert ratios["vg"] == ratios["cc"] == {"cmr": 16, "vmlm": 12, "mrfr": 6, "mrckl": 6}


def test_ldot_train_refuses_a_global_batch_its_ranks_cannot_divide(tmp_path):
    """One line, exit 2, before torch is imported: WORLD_SIZE is the launcher's (torchrun, launch.sh)."""
    data = tmp_path / "train"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "-c", PROBE, "train", "--config", str(DEMO), f"data.train={data}",
                           f"output_dir={tmp_path / 'out'}", "data.batch_size=null", "data.global_batch_size=96"],
                          cwd=ROOT, env={**env, "WORLD_SIZE": "5"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == ["error: data.global_batch_size=96 does not divide over 5 ranks x "
                                        "optim.grad_accum=1"]
    assert proc.stdout.strip() == ""  # nothing heavy imported
