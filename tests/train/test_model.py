"""The dual encoder: shapes, padding masks, init from text layers, export round trip."""
import torch

from ldot.train.config import LossConfig, ModelConfig
from ldot.model import export_dual_encoder, load_dual_encoder
from ldot.train.model_setup import build_dual_encoder


def _inputs(tok, feature_dim=24):
    enc = tok(["a small red circle on the left", "two blue squares"], padding=True, return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 5, feature_dim, generator=g)
    pos = torch.rand(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return enc["input_ids"], enc["attention_mask"], feat, pos, mask


def test_shapes_padding_and_export_round_trip(tmp_path):
    tok, model = build_dual_encoder(ModelConfig(image_layers=1, projection=True, dropout=0.0),
                                    LossConfig(scale="learnable", normalize=True), feature_dim=24)
    model.eval()
    ids, am, feat, pos, mask = _inputs(tok)
    t, i, _ = model(ids, am, feat, pos, mask)
    assert t.shape == i.shape == (2, model.embed_dim)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))
    # padded regions must not change the image embedding
    feat2 = feat.clone()
    feat2[1, 3:] = 1e3
    torch.testing.assert_close(model.encode_image(feat2, pos, mask), i)
    with torch.no_grad():
        model.contrastive.log_scale.fill_(2.5)
    export_dual_encoder(model, tok, tmp_path / "ckpt", {"feature_dim": 24})
    tok2, model2, meta = load_dual_encoder(tmp_path / "ckpt")
    t2, i2, _ = model2(ids, am, feat, pos, mask)
    torch.testing.assert_close(t2, t)
    torch.testing.assert_close(i2, i)
    assert float(model2.contrastive.log_scale.detach()) == 2.5 and meta["feature_dim"] == 24


def test_built_model_trains_with_dropout_everywhere():
    _, model = build_dual_encoder(ModelConfig(image_layers=1, dropout=0.1), LossConfig(), 8)
    assert all(m.training for m in model.modules()), [n for n, m in model.named_modules() if not m.training][:3]


def test_init_image_from_text_copies_layers():
    _, model = build_dual_encoder(ModelConfig(image_layers=2, init_image_from_text=True), LossConfig(), 8)
    for a, b in zip(model.image.encoder.layer, model.text.encoder.layer):
        for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert na == nb and torch.equal(pa, pb)
    _, fresh = build_dual_encoder(ModelConfig(image_layers=2), LossConfig(), 8)
    w_img = fresh.image.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(w_img, fresh.text.encoder.layer[0].attention.self.query.weight)


def test_init_from_an_export_starts_from_its_weights(tmp_path, tiny_text_encoder):
    tok, model = build_dual_encoder(ModelConfig(text_encoder=tiny_text_encoder, image_layers=1, projection=True),
                                    LossConfig(), feature_dim=24)
    with torch.no_grad():
        model.image.encoder.layer[0].output.dense.weight.add_(1.0)
    export_dual_encoder(model, tok, tmp_path / "pre", {"feature_dim": 24})
    _, again = build_dual_encoder(ModelConfig(init_from=str(tmp_path / "pre")), LossConfig(scale="learnable"),
                                  feature_dim=24, pretrain=True, num_classes=3)
    assert torch.equal(again.image.encoder.layer[0].output.dense.weight, model.image.encoder.layer[0].output.dense.weight)
    assert torch.equal(again.text_proj.net[0].weight, model.text_proj.net[0].weight)
    assert again.pretrain_heads is not None and again.contrastive.scale_mode == "learnable"
    import pytest
    from ldot.train.errors import ConfigError
    with pytest.raises(ConfigError, match="24-d features"):
        build_dual_encoder(ModelConfig(init_from=str(tmp_path / "pre")), LossConfig(), feature_dim=99)
    # a re-ranker started from this dual encoder: the same check, before any weights load
    from ldot.train.config import RerankConfig
    from ldot.train.model_setup import build_cross_encoder
    _, cross = build_cross_encoder(ModelConfig(), RerankConfig(mined="m", init_from=str(tmp_path / "pre")), 24)
    regions = {k: v for k, v in model.image.embeddings.state_dict().items() if not k.startswith("cls")}
    assert regions and all(torch.equal(cross.img_embeddings.state_dict()[k], v) for k, v in regions.items())
    with pytest.raises(ConfigError, match="was trained on 24-d features, the data has 99"):
        build_cross_encoder(ModelConfig(), RerankConfig(mined="m", init_from=str(tmp_path / "pre")), 99)


def test_text_encoder_from_config_only_has_fresh_weights(tiny_text_encoder):
    _, pre = build_dual_encoder(ModelConfig(text_encoder=tiny_text_encoder, image_layers=1), LossConfig(), 8)
    torch.manual_seed(1)
    _, fresh = build_dual_encoder(ModelConfig(text_encoder=tiny_text_encoder, image_layers=1, text_pretrained=False),
                                  LossConfig(), 8)
    assert fresh.text.config.hidden_size == pre.text.config.hidden_size
    assert not torch.equal(fresh.text.embeddings.word_embeddings.weight, pre.text.embeddings.word_embeddings.weight)


def test_grad_checkpointing_recomputes_layers_and_keeps_the_gradients(tiny_text_encoder):
    """With dropout on: the recompute replays the same masks, so loss and every gradient are unchanged."""
    from ldot import kernels

    grads, calls = {}, {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        tok, model = build_dual_encoder(ModelConfig(text_encoder=tiny_text_encoder, image_layers=2, dropout=0.1,
                                                    grad_checkpointing=ckpt),
                                        LossConfig(scale="learnable", normalize=True), feature_dim=24)
        count = {"text": 0, "image": 0}
        # hooks on a module inside the layer: the layer's own hooks stay outside the checkpoint
        model.text.encoder.layer[0].output.dense.register_forward_hook(
            lambda *_: count.__setitem__("text", count["text"] + 1))
        model.image.encoder.layer[1].output.dense.register_forward_hook(
            lambda *_: count.__setitem__("image", count["image"] + 1))
        torch.manual_seed(1)  # the same dropout masks in both runs
        t, i, scale = model(*_inputs(tok))
        kernels.contrastive_loss(t, i, scale, impl="reference").backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        calls[ckpt] = count
    assert calls[False] == {"text": 1, "image": 1}
    assert calls[True] == {"text": 2, "image": 2}  # forward, then again inside the backward
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-6, msg=name)
