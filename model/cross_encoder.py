"""The cross-attention re-ranker: a single-stream UNITER-style transformer over a caption's tokens and an
image's regions together, scored by an image-text matching (ITM) head on [CLS].

Unlike the dual encoder, every caption word attends to every region (and back) in every layer, so it can
check which colour goes with which shape, or which object is left of which: what a dot product of two
[CLS] vectors computed apart captures worse. The price is one transformer pass per (caption, image)
pair, which is why it only re-orders the dual encoder's top M (the paper's M = 20 or 50).

Input, as UNITER builds it: the caption's BERT embeddings ([CLS] words [SEP], positions 0.., token type
0) followed by the regions' embeddings (RegionEmbeddings.regions: features + 7-d boxes, type 1, no
position), one attention mask over both. UNITER gathers the text and the regions together to drop the
padding between them; attention with a mask is the same with the padding left in place (the regions
carry no position), so the two parts are simply concatenated. Score = itm(pooler(h[CLS])), one logit: as
UNITER's retrieval model (`rank_output`, initialized from its pretraining ITM head's "match" row).

Exported as a Hugging Face-style directory, `cross_encoder/` (weights, config, tokenizer) beside
`ldot.json` whose format is "ldot-cross-encoder": eval loads it without the training code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, BertPreTrainedModel
from transformers.models.bert.modeling_bert import BertEmbeddings, BertEncoder, BertPooler

from ldot.model.dual_encoder import RegionEmbeddings, attention_mask_4d, set_attention
from ldot.model.errors import ModelError
from ldot.model.export import EXPORT_META, read_export_meta

CROSS_FORMAT = "ldot-cross-encoder"
CROSS_VERSION = 1
CROSS_DIR = "cross_encoder"


class CrossEncoder(BertPreTrainedModel):
    """UNITER's single stream with a one-logit ITM head; saves and loads as a Hugging Face directory.

    Module names follow UNITER's (embeddings, img_embeddings, encoder, pooler) so that its weights map
    one to one (model/lightningdot.py, cross_encoder_from_uniter)."""

    config_class = BertConfig
    main_input_name = "input_ids"

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.img_embeddings = RegionEmbeddings(config, with_cls=False)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.itm = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RegionEmbeddings):
            module.region_type.data.normal_(0.0, self.config.initializer_range)

    def keep_layers(self, n: int) -> None:
        """Keep the first n transformer layers (a smaller, faster re-ranker)."""
        if not 1 <= n <= self.config.num_hidden_layers:
            raise ModelError(f"cross-encoder layers {n}: the model it starts from has {self.config.num_hidden_layers}")
        del self.encoder.layer[n:]
        self.config.num_hidden_layers = n

    def forward(self, input_ids, attention_mask, img_feat, img_pos, img_mask) -> torch.Tensor:
        """ITM logits [P] of P (caption, image) pairs: row p of the text inputs with row p of the image's."""
        txt = self.embeddings(input_ids=input_ids)
        img = self.img_embeddings.dropout(self.img_embeddings.regions(img_feat, img_pos))
        x = torch.cat([txt, img.to(txt.dtype)], dim=1)
        mask = torch.cat([attention_mask, img_mask.to(attention_mask.dtype)], dim=1)
        h = self.encoder(x, attention_mask=attention_mask_4d(self.config, mask, x.dtype)).last_hidden_state
        return self.itm(self.pooler(h)).squeeze(-1)


def cross_encoder_from_bert(text: BertModel, feature_dim: int, dropout: float | None = None) -> CrossEncoder:
    """A cross-encoder whose text embeddings and transformer layers are a pretrained text BERT's; the region
    embeddings, pooler and ITM head start fresh (dropout: the text config's unless given). UNITER-base
    weights, where a user has them, start all of it: lightningdot.cross_encoder_from_uniter."""
    cfg = {**text.config.to_dict(), "feature_dim": feature_dim}
    if dropout is not None:
        cfg.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    model = CrossEncoder(BertConfig(**cfg))
    model.embeddings.load_state_dict(text.embeddings.state_dict())
    for dst, src in zip(model.encoder.layer, text.encoder.layer):
        dst.load_state_dict(src.state_dict())
    return model


def cross_encoder_from_dual_encoder(dual, dropout: float | None = None) -> CrossEncoder:
    """A cross-encoder started from a trained dual encoder (the first stage it will re-rank for): the text
    encoder's embeddings and layers, the image encoder's region embeddings (already trained to map
    features and boxes into the same width); the pooler and ITM head start fresh. Both sides of such a
    dual encoder start from one pretrained model, as UNITER starts both LightningDOT's encoders and its
    re-ranker, so its parts are a warm start for a small re-ranking budget (the demo's)."""
    text, image = dual.text, dual.image
    if text.config.hidden_size != image.config.hidden_size:
        raise ModelError(f"dual encoder: text width {text.config.hidden_size} != image width {image.config.hidden_size}")
    model = cross_encoder_from_bert(text, image.config.feature_dim, dropout)
    regions = {k: v for k, v in image.embeddings.state_dict().items() if not k.startswith("cls")}
    model.img_embeddings.load_state_dict(regions, strict=True)
    return model


def export_cross_encoder(model: CrossEncoder, tokenizer, out_dir: str | Path, meta: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / CROSS_DIR)
    tokenizer.save_pretrained(out / CROSS_DIR)
    info = {"format": CROSS_FORMAT, "version": CROSS_VERSION, "layers": model.config.num_hidden_layers,
            "hidden": model.config.hidden_size, **meta}
    (out / EXPORT_META).write_text(json.dumps(info, indent=2))
    return out


def load_cross_encoder(path: str | Path, device: str | torch.device = "cpu", attention: str = "sdpa"):
    """Load an exported cross-encoder: returns (tokenizer, model in eval mode, meta dict)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_export_meta(path)
    if meta.get("format") != CROSS_FORMAT:
        raise ModelError(f"{path}: a {meta.get('format', 'ldot-dual-encoder')} export, not a cross-encoder")
    if meta.get("version") != CROSS_VERSION:
        raise ModelError(f"{path}/{EXPORT_META}: cross-encoder format version {meta.get('version')!r}; this code reads "
                         f"version {CROSS_VERSION}")
    tokenizer = AutoTokenizer.from_pretrained(path / CROSS_DIR)
    model = CrossEncoder.from_pretrained(path / CROSS_DIR)
    # transformers fills a weight missing from the file with a fresh random one and says so only in a log
    # line: every weight is checked against the file
    saved = {}
    for f in sorted((path / CROSS_DIR).glob("*.safetensors")):
        saved.update(load_file(f))
    if saved:
        model.load_state_dict(saved, strict=True)
    set_attention(model, attention)
    return tokenizer, model.to(device).eval(), meta


__all__ = ["CROSS_DIR", "CROSS_FORMAT", "CrossEncoder", "cross_encoder_from_bert", "cross_encoder_from_dual_encoder",
           "export_cross_encoder", "load_cross_encoder"]
