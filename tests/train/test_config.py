"""Typed config loading: defaults, overrides, and errors that name the key."""
from pathlib import Path

import pytest

from ldot.train.config import flatten, load_config, to_dict
from ldot.train.errors import ConfigError

DEMO = Path(__file__).resolve().parents[2] / "train" / "configs" / "demo.yaml"


def test_demo_config_loads_with_overrides():
    cfg = load_config(DEMO, ["optim.lr=3e-5", "data.batch_size=8", "optim.betas=[0.9, 0.99]"])
    assert cfg.optim.lr == 3e-5 and cfg.data.batch_size == 8 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.engine.deepspeed_config.endswith("zero2.json")
    flat = flatten(to_dict(cfg))
    assert flat["optim.lr"] == 3e-5 and flat["model.text_encoder"] == "minilm"


@pytest.mark.parametrize("override,match", [
    ("optim.lrr=1", "unknown config key in section 'optim': lrr"),
    ("nosuch.x=1", "unknown config key in section 'nosuch'|unknown config key: nosuch"),
    ("data.batch_size=abc", "data.batch_size: expected an integer"),
    ("loss.scale=sometimes", "loss.scale: 'sometimes' is not one of"),
    ("optim.max_steps=0", "optim.max_steps must be >= 1"),
    ("model.dropout", "not of the form key=value"),
])
def test_bad_config_names_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DEMO, [override])


def test_missing_train_data_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="data.train is required"):
        load_config(p)


@pytest.mark.parametrize("name", sorted(p.stem for p in DEMO.parent.glob("*.yaml")))
def test_every_recipe_loads(name):
    cfg = load_config(DEMO.parent / f"{name}.yaml")
    assert cfg.optim.betas == (0.9, 0.98) and cfg.optim.max_steps >= 1
