"""The trainer's model: a dual encoder built from the config's model and loss sections."""
from __future__ import annotations

from transformers import AutoTokenizer, BertConfig, BertModel

from ldot.kernels import ContrastiveLoss
from ldot.model import (DualEncoder, ImageEncoder, PretrainHeads, enable_grad_checkpointing, load_dual_encoder,
                        resolve_text_encoder, tie_mlm_decoder)
from ldot.train.config import LossConfig, ModelConfig
from ldot.train.errors import ConfigError


def build_dual_encoder(model_cfg: ModelConfig, loss_cfg: LossConfig, feature_dim: int, *,
                       pretrain: bool = False, num_classes: int = 0):
    """A fresh dual encoder for training: text side from pretrained weights, image side new.

    pretrain adds the VMLM/MRFR/MRC-kl heads (MRC-kl only when the data has num_classes > 0)."""
    tokenizer, model = _build(model_cfg, loss_cfg, feature_dim, pretrain, num_classes)
    if model_cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    return tokenizer, model


def _build(model_cfg: ModelConfig, loss_cfg: LossConfig, feature_dim: int, pretrain: bool, num_classes: int):
    if model_cfg.init_from:
        tokenizer, model, meta = load_dual_encoder(model_cfg.init_from)
        if meta.get("feature_dim", feature_dim) != feature_dim:
            raise ConfigError(f"model.init_from={model_cfg.init_from} was trained on {meta['feature_dim']}-d "
                              f"features, the data has {feature_dim}")
        model.normalize = loss_cfg.normalize
        model.set_contrastive(ContrastiveLoss(loss_cfg.scale, loss_cfg.init_scale, impl=loss_cfg.impl))
        if pretrain:
            model.pretrain_heads = PretrainHeads(model.text.config, feature_dim, num_classes)
            tie_mlm_decoder(model.pretrain_heads, model.text)
        return tokenizer, model.train()
    path = resolve_text_encoder(model_cfg.text_encoder)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dropout = {"hidden_dropout_prob": model_cfg.dropout, "attention_probs_dropout_prob": model_cfg.dropout}
    if model_cfg.text_pretrained:
        text = BertModel.from_pretrained(path, add_pooling_layer=False, **dropout)
    else:
        text = BertModel(BertConfig.from_pretrained(path, **dropout), add_pooling_layer=False)
    tc = text.config
    image_cfg = BertConfig(
        hidden_size=tc.hidden_size, num_attention_heads=tc.num_attention_heads,
        intermediate_size=tc.intermediate_size, hidden_act=tc.hidden_act,
        num_hidden_layers=model_cfg.image_layers, layer_norm_eps=tc.layer_norm_eps,
        hidden_dropout_prob=model_cfg.dropout, attention_probs_dropout_prob=model_cfg.dropout,
        initializer_range=tc.initializer_range, feature_dim=feature_dim, vocab_size=1,
    )
    image = ImageEncoder(image_cfg)
    if model_cfg.init_image_from_text:
        if model_cfg.image_layers > tc.num_hidden_layers:
            raise ConfigError(f"model.init_image_from_text: image_layers={model_cfg.image_layers} exceeds the "
                              f"text encoder's {tc.num_hidden_layers} layers")
        for dst, src in zip(image.encoder.layer, text.encoder.layer):
            dst.load_state_dict(src.state_dict())
    heads = PretrainHeads(tc, feature_dim, num_classes) if pretrain else None
    model = DualEncoder(text, image, projection=model_cfg.projection, normalize=loss_cfg.normalize,
                        contrastive=ContrastiveLoss(loss_cfg.scale, loss_cfg.init_scale, impl=loss_cfg.impl),
                        pretrain_heads=heads)
    return tokenizer, model.train()  # from_pretrained hands back the text encoder in eval mode
