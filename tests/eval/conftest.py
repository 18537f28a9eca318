"""Fixtures for eval tests: untrained tiny dual encoders exported like real checkpoints (no training:
these tests check plumbing and agreement between paths, not quality)."""
import pytest


def _export(path, tiny_text_encoder, feature_dim, seed, projection):
    import torch

    from ldot.train.config import LossConfig, ModelConfig
    from ldot.model import export_dual_encoder
    from ldot.train.model_setup import build_dual_encoder

    torch.manual_seed(seed)
    tok, model = build_dual_encoder(ModelConfig(text_encoder=tiny_text_encoder, image_layers=1, dropout=0.0,
                                                projection=projection),
                                    LossConfig(normalize=True), feature_dim=feature_dim)
    return export_dual_encoder(model.eval(), tok, path, {"feature_dim": feature_dim, "max_text_len": 32, "steps": 0})


@pytest.fixture(scope="session")
def test_split_dir(tiny_shards):
    return tiny_shards / "test"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_text_encoder, test_split_dir):
    from ldot.data.schema import read_manifest

    fd = read_manifest(test_split_dir).feature_dim
    return _export(tmp_path_factory.mktemp("ckpt") / "a", tiny_text_encoder, fd, seed=0, projection=False)


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory, tiny_text_encoder, test_split_dir):
    """A second, different dual encoder (another seed, with projection heads): the re-ranker."""
    from ldot.data.schema import read_manifest

    fd = read_manifest(test_split_dir).feature_dim
    return _export(tmp_path_factory.mktemp("ckpt") / "b", tiny_text_encoder, fd, seed=1, projection=True)


@pytest.fixture(scope="session")
def cross_checkpoint(tmp_path_factory, tiny_text_encoder, test_split_dir):
    """An untrained 1-layer cross-encoder re-ranker over the tiny BERT, exported as task=rerank exports it."""
    import torch

    from ldot.data.schema import read_manifest
    from ldot.model import export_cross_encoder
    from ldot.train.config import ModelConfig, RerankConfig
    from ldot.train.model_setup import build_cross_encoder

    fd = read_manifest(test_split_dir).feature_dim
    torch.manual_seed(2)
    tok, model = build_cross_encoder(ModelConfig(text_encoder=tiny_text_encoder, dropout=0.0),
                                     RerankConfig(mined="unused", layers=1), fd)
    return export_cross_encoder(model.eval(), tok, tmp_path_factory.mktemp("ckpt") / "cross",
                                {"feature_dim": fd, "max_text_len": 32, "steps": 0})
