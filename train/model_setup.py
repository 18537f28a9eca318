"""The trainer's model: a dual encoder built from the config's model and loss sections, or for task=rerank
the cross-encoder re-ranker from its model and rerank sections."""
from __future__ import annotations

from transformers import AutoTokenizer, BertConfig, BertModel

from ldot.kernels import ContrastiveLoss
from ldot.model import (DualEncoder, ImageEncoder, PretrainHeads, compile_regions, enable_grad_checkpointing,
                        load_dual_encoder, resolve_text_encoder, set_attention, tie_mlm_decoder)
from ldot.train.config import LossConfig, ModelConfig, RerankConfig
from ldot.train.errors import ConfigError


def build_dual_encoder(model_cfg: ModelConfig, loss_cfg: LossConfig, feature_dim: int, *,
                       pretrain: bool = False, num_classes: int = 0):
    """A fresh dual encoder for training: text side from pretrained weights, image side new.

    pretrain adds the VMLM/MRFR/MRC-kl heads (MRC-kl only when the data has num_classes > 0)."""
    tokenizer, model = _build(model_cfg, loss_cfg, feature_dim, pretrain, num_classes)
    model.set_attention(model_cfg.attention)
    if model_cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    if model_cfg.compile:  # last: a checkpointed layer is compiled with its recomputation
        compile_regions(model)
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
    text, tokenizer = _text_encoder(model_cfg)
    tc = text.config
    if model_cfg.image_init:
        image = _image_from_uniter(model_cfg, tc, feature_dim)
    else:
        image_cfg = BertConfig(
            hidden_size=tc.hidden_size, num_attention_heads=tc.num_attention_heads,
            intermediate_size=tc.intermediate_size, hidden_act=tc.hidden_act,
            num_hidden_layers=model_cfg.image_layers, layer_norm_eps=tc.layer_norm_eps,
            hidden_dropout_prob=model_cfg.dropout, attention_probs_dropout_prob=model_cfg.dropout,
            initializer_range=tc.initializer_range, feature_dim=feature_dim, vocab_size=1,
        )
        image = ImageEncoder(image_cfg)
    if model_cfg.init_image_from_text:
        if image.config.num_hidden_layers > tc.num_hidden_layers:
            raise ConfigError(f"model.init_image_from_text: image_layers={model_cfg.image_layers} exceeds the "
                              f"text encoder's {tc.num_hidden_layers} layers")
        for dst, src in zip(image.encoder.layer, text.encoder.layer):
            dst.load_state_dict(src.state_dict())
    heads = PretrainHeads(tc, feature_dim, num_classes) if pretrain else None
    model = DualEncoder(text, image, projection=model_cfg.projection, normalize=loss_cfg.normalize,
                        contrastive=ContrastiveLoss(loss_cfg.scale, loss_cfg.init_scale, impl=loss_cfg.impl),
                        pretrain_heads=heads)
    return tokenizer, model.train()  # from_pretrained hands back the text encoder in eval mode


def build_cross_encoder(model_cfg: ModelConfig, rerank_cfg: RerankConfig, feature_dim: int):
    """A cross-encoder re-ranker for task=rerank: from rerank.uniter (all of it), from rerank.init_from (an
    exported re-ranker: all of it, e.g. one ITM-trained on a larger set first; an exported dual encoder: its
    text side and region embeddings), else model.text_encoder's BERT (regions fresh); then its first
    rerank.layers layers. The ITM head starts fresh but from UNITER's or an exported re-ranker's."""
    from ldot.model.cross_encoder import (CROSS_FORMAT, cross_encoder_from_bert, cross_encoder_from_dual_encoder,
                                          load_cross_encoder)
    from ldot.model.export import read_export_meta

    if rerank_cfg.uniter:
        from ldot.model.lightningdot import cross_encoder_from_uniter, load_tokenizer

        model = cross_encoder_from_uniter(rerank_cfg.uniter, dropout=model_cfg.dropout)
        tokenizer = load_tokenizer(model_cfg.tokenizer)
        if model.config.feature_dim != feature_dim:
            raise ConfigError(f"rerank.uniter={rerank_cfg.uniter} takes {model.config.feature_dim}-d region features, "
                              f"the data has {feature_dim}")
        if len(tokenizer) > model.config.vocab_size:
            raise ConfigError(f"model.tokenizer: {len(tokenizer)} tokens, rerank.uniter embeds {model.config.vocab_size}")
    elif rerank_cfg.init_from:
        meta = read_export_meta(rerank_cfg.init_from)
        if meta.get("feature_dim", feature_dim) != feature_dim:
            raise ConfigError(f"rerank.init_from={rerank_cfg.init_from} was trained on {meta['feature_dim']}-d "
                              f"features, the data has {feature_dim}")
        if meta.get("format") == CROSS_FORMAT:
            # its own dropout, as UNITER's starts keep UNITER's: the export's config holds it
            tokenizer, model, _ = load_cross_encoder(rerank_cfg.init_from)
        else:
            tokenizer, dual, _ = load_dual_encoder(rerank_cfg.init_from)
            model = cross_encoder_from_dual_encoder(dual, dropout=model_cfg.dropout)
    else:
        text, tokenizer = _text_encoder(model_cfg)
        model = cross_encoder_from_bert(text, feature_dim)
    if rerank_cfg.layers is not None:
        model.keep_layers(rerank_cfg.layers)
    set_attention(model, model_cfg.attention)
    if model_cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    return tokenizer, model.train()


def _text_encoder(model_cfg: ModelConfig):
    """(text encoder, tokenizer): from model.text_init's BERT state dict, or the text_encoder directory."""
    from ldot.model.lightningdot import bert_text_encoder, load_tokenizer

    tokenizer = load_tokenizer(model_cfg.tokenizer) if model_cfg.tokenizer else None
    if model_cfg.text_init:
        text = bert_text_encoder(model_cfg.text_init, dropout=model_cfg.dropout)
    else:
        path = resolve_text_encoder(model_cfg.text_encoder)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        dropout = {"hidden_dropout_prob": model_cfg.dropout, "attention_probs_dropout_prob": model_cfg.dropout}
        if model_cfg.text_pretrained:
            text = BertModel.from_pretrained(path, add_pooling_layer=False, **dropout)
        else:
            text = BertModel(BertConfig.from_pretrained(path, **dropout), add_pooling_layer=False)
    if model_cfg.tokenizer and len(tokenizer) > text.config.vocab_size:
        raise ConfigError(f"model.tokenizer: {len(tokenizer)} tokens, the text encoder embeds "
                          f"{text.config.vocab_size}")
    return text, tokenizer


def _image_from_uniter(model_cfg: ModelConfig, tc: BertConfig, feature_dim: int) -> ImageEncoder:
    from ldot.model.lightningdot import uniter_image_encoder

    # heads are not in a state dict: the text encoder's (the original configures both sides alike)
    image = uniter_image_encoder(model_cfg.image_init, num_heads=tc.num_attention_heads, dropout=model_cfg.dropout)
    ic = image.config
    if ic.feature_dim != feature_dim:
        raise ConfigError(f"model.image_init={model_cfg.image_init} takes {ic.feature_dim}-d region features, "
                          f"the data has {feature_dim}")
    if ic.hidden_size != tc.hidden_size:
        raise ConfigError(f"model.image_init={model_cfg.image_init} has hidden size {ic.hidden_size}, the text "
                          f"encoder {tc.hidden_size}")
    return image
