"""LightningDOT's released files → this project's encoders: the bi-encoder checkpoints (LightningDot.pt,
coco-ft.pt, flickr-ft.pt) become an export directory; uniter-base.pt and bert-base-cased.pt start an
encoder for training.

What the original computes (intersun/LightningDOT, dvl/models/bi_encoder.py over UNITER's model):
text = a BERT over [CLS] words [SEP] (token type 0, positions 0..), image = UNITER over a one-token text
part ([CLS] = id 101 at position 0, type 0) followed by the regions (type 1, no position); each side's
vector is encode_proj(out[:, 0]) and the score a plain dot product. Their state dicts name the modules
as UNITER and BERT do, so the layer weights copy over one to one; the image side's embeddings are
folded into RegionEmbeddings (the [CLS] token's word + position + type rows summed into one vector,
type[1] kept as the region type). Weights are stored as float16 (apex O2) or float32 and exported as
float32. The number of attention heads is not in a state dict: it is hidden / 64 (BERT's and UNITER's
base and large) unless given.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from ldot.model.dual_encoder import BOX_DIM, DualEncoder, ImageEncoder
from ldot.model.errors import ModelError

log = logging.getLogger("model")

ORIGINAL_CLS_ID = 101  # the id the original feeds as the image side's one word, whatever the vocabulary
HEAD_SIZE = 64

_LAYER = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
          "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
_TEXT_EMBEDDINGS = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                    "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
                    "embeddings.LayerNorm.bias")
_IMAGE_EMBEDDINGS = tuple(f"img_embeddings.{m}.{p}" for m in ("img_linear", "img_layer_norm", "pos_linear",
                                                               "pos_layer_norm", "LayerNorm")
                          for p in ("weight", "bias"))
# Weights the bi-encoder's embeddings never read: the pooler ([CLS] is read before it), the masked-region
# embedding (pretraining's masked inputs only), position_ids (a buffer some transformers versions save).
_UNUSED = re.compile(r"^(pooler\.dense\.(weight|bias)|img_embeddings\.mask_embedding\.weight|embeddings\.position_ids)$")
_PROJ = {"encode_proj.0.weight": "net.0.weight", "encode_proj.0.bias": "net.0.bias",
         "encode_proj.2.weight": "net.2.weight", "encode_proj.2.bias": "net.2.bias",
         "encode_proj.3.weight": "net.3.weight", "encode_proj.3.bias": "net.3.bias"}
# LightningDot.pt: the pretraining model's heads beside its bi-encoder (not part of an export).
_PRETRAIN_HEADS = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")


def load_checkpoint(path: str | Path) -> dict:
    """The file's object, read as weights only (no code from the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exn:  # torch raises many kinds here; each is this file's problem
        first = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
        raise ModelError(f"{path}: not readable as a torch state dict ({type(exn).__name__}: {first[:200]})") from None


def _clean(sd: dict) -> dict:
    """Old TF-converted BERT weights name LayerNorm's parameters gamma/beta; DataParallel adds module."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        out[re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)] = v
    return out


def _prefixes(keys, depth: int = 2) -> str:
    seen = []
    for k in keys:
        p = ".".join(k.split(".")[:depth]) + ".*"
        if p not in seen:
            seen.append(p)
    return ", ".join(seen[:6]) + (", ..." if len(seen) > 6 else "")


def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _check_keys(sd: dict, required: list[str], where: str, allowed=()) -> None:
    missing = [k for k in required if k not in sd]
    if missing:
        raise ModelError(f"{where}: lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    known = set(required) | set(allowed)
    unknown = [k for k in sd if k not in known and not _UNUSED.match(k)]
    if unknown:
        raise ModelError(f"{where}: does not know {', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}")


def _layers(sd: dict, where: str) -> int:
    ids = {int(m[1]) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    if not ids or ids != set(range(len(ids))):
        raise ModelError(f"{where}: encoder layers {sorted(ids) or 'none'}, expected 0..N-1")
    return len(ids)


def _layer_keys(n: int) -> list[str]:
    return [f"encoder.layer.{i}.{m}.{p}" for i in range(n) for m in _LAYER for p in ("weight", "bias")]


def _heads(hidden: int, num_heads: int | None, where: str) -> int:
    if num_heads:
        if hidden % num_heads:
            raise ModelError(f"{where}: hidden size {hidden} is not divisible by {num_heads} heads")
        return num_heads
    if hidden % HEAD_SIZE:
        raise ModelError(f"{where}: hidden size {hidden} is not a multiple of {HEAD_SIZE}; give the number of heads")
    return hidden // HEAD_SIZE


def _bert_config(sd: dict, layers: int, num_heads: int | None, where: str, dropout: float, **extra) -> BertConfig:
    hidden = sd["encoder.layer.0.attention.self.query.weight"].shape[0]
    return BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=_heads(hidden, num_heads, where),
                      intermediate_size=sd["encoder.layer.0.intermediate.dense.weight"].shape[0], hidden_act="gelu",
                      layer_norm_eps=1e-12, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                      **extra)


def _float(sd: dict) -> dict:
    return {k: v.float() for k, v in sd.items()}


def _load(module: torch.nn.Module, sd: dict, where: str) -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as exn:  # shapes that disagree with each other inside the file
        raise ModelError(f"{where}: inconsistent weights ({str(exn).splitlines()[-1].strip()[:200]})") from None


def text_encoder_from_bert(sd: dict, where: str, *, num_heads: int | None = None, dropout: float = 0.1) -> BertModel:
    """A BERT state dict (keys embeddings.*, encoder.layer.N.*) → this project's text encoder."""
    sd = _clean(sd)
    if "embeddings.word_embeddings.weight" not in sd:
        raise ModelError(f"{where}: lacks embeddings.word_embeddings.weight (holds {_prefixes(sd)})")
    n = _layers(sd, where)
    _check_keys(sd, list(_TEXT_EMBEDDINGS) + _layer_keys(n), where)
    word, pos, typ = (sd[k] for k in _TEXT_EMBEDDINGS[:3])
    cfg = _bert_config(sd, n, num_heads, where, dropout, vocab_size=word.shape[0], max_position_embeddings=pos.shape[0],
                       type_vocab_size=typ.shape[0], pad_token_id=0)
    text = BertModel(cfg, add_pooling_layer=False)
    _load(text, _float({k: v for k, v in sd.items() if not _UNUSED.match(k)}), where)
    return text


def image_encoder_from_uniter(sd: dict, where: str, *, num_heads: int | None = None, dropout: float = 0.1) -> ImageEncoder:
    """A UNITER state dict (keys embeddings.*, img_embeddings.*, encoder.layer.N.*) → the image encoder,
    computing what UNITER computes for a [CLS] token followed by regions."""
    sd = _clean(sd)
    if "img_embeddings.img_linear.weight" not in sd:
        raise ModelError(f"{where}: lacks img_embeddings.img_linear.weight (holds {_prefixes(sd)}); "
                         "not a UNITER image encoder")
    n = _layers(sd, where)
    _check_keys(sd, list(_TEXT_EMBEDDINGS) + list(_IMAGE_EMBEDDINGS) + _layer_keys(n), where)
    word, pos, typ = (sd[k].float() for k in _TEXT_EMBEDDINGS[:3])
    if word.shape[0] <= ORIGINAL_CLS_ID or typ.shape[0] < 2:
        raise ModelError(f"{where}: {word.shape[0]} words and {typ.shape[0]} token types; UNITER's image side "
                         f"needs word {ORIGINAL_CLS_ID} ([CLS]) and types 0 and 1")
    if sd["img_embeddings.pos_linear.weight"].shape[1] != BOX_DIM:
        raise ModelError(f"{where}: pos_linear takes {sd['img_embeddings.pos_linear.weight'].shape[1]} box "
                         f"inputs, this encoder {BOX_DIM}")
    feature_dim = sd["img_embeddings.img_linear.weight"].shape[1]
    cfg = _bert_config(sd, n, num_heads, where, dropout, feature_dim=feature_dim, vocab_size=1)
    ours = {"embeddings.cls": (word[ORIGINAL_CLS_ID] + pos[0] + typ[0]).view(1, 1, -1),
            "embeddings.region_type": typ[1]}
    rename = {"embeddings.LayerNorm": "embeddings.cls_norm", "img_embeddings.img_linear": "embeddings.feat_linear",
              "img_embeddings.img_layer_norm": "embeddings.feat_norm", "img_embeddings.pos_linear": "embeddings.box_linear",
              "img_embeddings.pos_layer_norm": "embeddings.box_norm", "img_embeddings.LayerNorm": "embeddings.norm"}
    for src, dst in rename.items():
        for p in ("weight", "bias"):
            ours[f"{dst}.{p}"] = sd[f"{src}.{p}"]
    ours.update({k: v for k, v in sd.items() if k.startswith("encoder.layer.")})
    image = ImageEncoder(cfg)
    _load(image, _float(ours), where)
    return image


def _projection(sd: dict, where: str) -> dict | None:
    proj = {k: v for k, v in sd.items() if k.startswith("encode_proj.")}
    if not proj:
        return None
    _check_keys(proj, list(_PROJ), where)
    return {_PROJ[k]: v.float() for k, v in proj.items()}


def split_lightningdot(obj, where: str) -> tuple[str, dict, dict]:
    """(layout, image side, text side) of a LightningDOT checkpoint; each side keyed as the original's
    UniterEncoder/BertEncoder module (bert.*, encode_proj.*)."""
    if isinstance(obj, dict) and isinstance(obj.get("model_dict"), dict):
        layout, sd, prefix = "fine-tuned (model_dict: img_model.*, txt_model.*)", _clean(obj["model_dict"]), ""
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = _clean(obj)
        if any(k.startswith("bert.img_model.") for k in sd):
            layout, prefix = "pretrained (bert.img_model.*, bert.txt_model.*, heads)", "bert."
        else:
            layout, prefix = "bi-encoder state dict (img_model.*, txt_model.*)", ""
    else:
        what = f"a dict of {_prefixes([str(k) for k in obj], 1)}" if isinstance(obj, dict) else type(obj).__name__
        raise ModelError(f"{where}: not a LightningDOT checkpoint (holds {what}; expected a state dict or a dict "
                         "with model_dict)")
    img, txt = _sub(sd, prefix + "img_model."), _sub(sd, prefix + "txt_model.")
    if not img or not txt:
        lacks = " and ".join(f"{prefix}{s}_model.*" for s, d in (("img", img), ("txt", txt)) if not d)
        hint = ""
        if any(k.startswith(("bert.img_embeddings.", "uniter.img_embeddings.")) for k in sd):
            hint = "; a UNITER checkpoint starts an image encoder as model.image_init"
        elif any(k.startswith(("bert.embeddings.", "embeddings.")) for k in sd):
            hint = "; a BERT checkpoint starts a text encoder as model.text_init"
        raise ModelError(f"{where}: not a LightningDOT checkpoint: lacks {lacks} (holds {_prefixes(sd)}){hint}")
    rest = [k for k in sd if not k.startswith((prefix + "img_model.", prefix + "txt_model."))]
    unknown = [k for k in rest if not (prefix == "bert." and k.startswith(_PRETRAIN_HEADS))]
    if unknown:
        raise ModelError(f"{where}: does not know {', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}")
    if rest:
        log.info("%s: leaving out the pretraining heads (%s)", where, _prefixes(rest, 1))
    return layout, img, txt


def dual_encoder_from_lightningdot(obj, where: str, *, num_heads: int | None = None):
    """(DualEncoder in eval mode, facts for the export's meta) from a loaded LightningDOT checkpoint."""
    from ldot.kernels import ContrastiveLoss

    layout, img, txt = split_lightningdot(obj, where)
    for side, sd in (("img_model", img), ("txt_model", txt)):
        extra = [k for k in sd if not k.startswith(("bert.", "encode_proj."))]
        if extra:
            raise ModelError(f"{where}: does not know {side}.{extra[0]}")
    dtype = str(next(iter(img.values())).dtype).replace("torch.", "")
    image = image_encoder_from_uniter(_sub(img, "bert."), f"{where} [img_model.bert]", num_heads=num_heads)
    text = text_encoder_from_bert(_sub(txt, "bert."), f"{where} [txt_model.bert]", num_heads=num_heads)
    if image.config.hidden_size != text.config.hidden_size:
        raise ModelError(f"{where}: image hidden size {image.config.hidden_size} != text {text.config.hidden_size}")
    img_proj, txt_proj = _projection(img, f"{where} [img_model]"), _projection(txt, f"{where} [txt_model]")
    if (img_proj is None) != (txt_proj is None):
        raise ModelError(f"{where}: encode_proj on one side only")
    proj_dim = img_proj["net.3.weight"].shape[0] if img_proj else None
    model = DualEncoder(text, image, projection=img_proj is not None, normalize=False,
                        contrastive=ContrastiveLoss("none"), proj_dim=proj_dim)
    if img_proj is not None:
        if txt_proj["net.3.weight"].shape != img_proj["net.3.weight"].shape:
            raise ModelError(f"{where}: the two encode_proj differ in shape")
        _load(model.image_proj, img_proj, f"{where} [img_model.encode_proj]")
        _load(model.text_proj, txt_proj, f"{where} [txt_model.encode_proj]")
    facts = {"layout": layout, "dtype": dtype, "feature_dim": image.config.feature_dim,
             "text_layers": text.config.num_hidden_layers, "image_layers": image.config.num_hidden_layers,
             "hidden": text.config.hidden_size, "heads": text.config.num_attention_heads}
    return model.eval(), facts


def load_tokenizer(path: str | Path):
    """A Hugging Face BERT tokenizer from a vocab file (lower-casing as the vocabulary's case says) or a
    tokenizer directory."""
    from transformers import AutoTokenizer, BertTokenizerFast

    from ldot.vocab import is_cased, read_vocab, vocab_source

    try:
        kind, p = vocab_source(path)
    except FileNotFoundError as exn:
        raise ModelError(f"tokenizer {exn}") from None
    if kind == "dir":
        return AutoTokenizer.from_pretrained(p)
    tokens = read_vocab(p)
    if "[CLS]" not in tokens or "[SEP]" not in tokens:
        raise ModelError(f"tokenizer {p}: not a BERT WordPiece vocab (no [CLS]/[SEP] line)")
    import inspect

    # transformers 5 takes the file as `vocab`, 4.x as `vocab_file`
    arg = "vocab_file" if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab"
    return BertTokenizerFast(**{arg: str(p)}, do_lower_case=not is_cased(tokens), model_max_length=512)


def import_lightningdot(checkpoint: str | Path, out: str | Path, tokenizer_path: str | Path, *,
                        num_heads: int | None = None, max_text_len: int = 60) -> dict:
    """Write an export directory from a released checkpoint; returns its ldot.json facts."""
    from ldot.model.export import export_dual_encoder

    tokenizer = load_tokenizer(tokenizer_path)
    model, facts = dual_encoder_from_lightningdot(load_checkpoint(checkpoint), str(checkpoint), num_heads=num_heads)
    vocab = model.text.config.vocab_size
    if len(tokenizer) != vocab:
        raise ModelError(f"tokenizer {tokenizer_path}: {len(tokenizer)} tokens, the checkpoint's text encoder has "
                         f"{vocab} (bert-base-cased has 28996)")
    meta = {"source": "lightningdot", "checkpoint": str(Path(checkpoint).resolve()), "max_text_len": max_text_len,
            **facts}
    export_dual_encoder(model, tokenizer, out, meta)
    return {**meta, "embed_dim": model.embed_dim}


def _model_state(path: str | Path, prefixes: tuple[str, ...], what: str, marker: str) -> tuple[dict, str]:
    """(a pretrained model's whole state dict, the first of `prefixes` under which it holds `marker`)."""
    obj = load_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("model_dict"), dict):
        obj = obj["model_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path}: not a {what} state dict")
    sd = _clean(obj)
    for prefix in prefixes:
        if prefix + marker in sd:
            return sd, prefix
    raise ModelError(f"{path}: not a {what} checkpoint: lacks {' or '.join(p + marker for p in prefixes)} "
                     f"(holds {_prefixes(sd)})")


def _encoder_state(path: str | Path, prefixes: tuple[str, ...], what: str, marker: str) -> dict:
    """A pretrained model's encoder weights, found under the first of `prefixes` that holds `marker`."""
    return _sub(*_model_state(path, prefixes, what, marker))


def uniter_image_encoder(path: str | Path, *, num_heads: int | None = None, dropout: float = 0.1) -> ImageEncoder:
    """uniter-base.pt (UNITER under bert.*, or uniter.* in some copies; its heads beside it are left out)
    → the image encoder the original fine-tuning starts from."""
    sd = _encoder_state(path, ("bert.", "uniter.", ""), "UNITER", "img_embeddings.img_linear.weight")
    return image_encoder_from_uniter(sd, str(path), num_heads=num_heads, dropout=dropout)


def bert_text_encoder(path: str | Path, *, num_heads: int | None = None, dropout: float = 0.1) -> BertModel:
    """bert-base-cased.pt (BERT under bert.* beside its pretraining heads, or bare) → the text encoder."""
    sd = _encoder_state(path, ("bert.", ""), "BERT", "embeddings.word_embeddings.weight")
    if "img_embeddings.img_linear.weight" in sd:
        raise ModelError(f"{path}: a UNITER checkpoint, not BERT (give it as model.image_init)")
    return text_encoder_from_bert(sd, str(path), num_heads=num_heads, dropout=dropout)


def cross_encoder_from_uniter(path: str | Path, *, num_heads: int | None = None, dropout: float = 0.1):
    """uniter-base.pt (or a UNITER retrieval checkpoint) → the cross-encoder re-ranker, all of it: UNITER's
    text and image embeddings, layers and pooler, and the ITM head: `rank_output` where the file has one
    (UNITER fine-tuned for retrieval), else the "match" row of the pretraining head `itm_output`, as
    UNITER's UniterForImageTextRetrieval.init_output starts its rank_output. The pretraining heads (MLM,
    MRFR, MRC) are left out."""
    from ldot.model.cross_encoder import CrossEncoder

    where = str(path)
    full, prefix = _model_state(path, ("bert.", "uniter.", ""), "UNITER", "img_embeddings.img_linear.weight")
    head = "rank_output" if "rank_output.weight" in full else "itm_output"
    if head + ".weight" not in full:
        raise ModelError(f"{path}: has no ITM head (rank_output.* or itm_output.*) to score pairs with")
    sd = _sub(full, prefix)
    n = _layers(sd, where)
    pooler = ["pooler.dense.weight", "pooler.dense.bias"]  # the ITM head reads the pooled [CLS]
    _check_keys(sd, list(_TEXT_EMBEDDINGS) + list(_IMAGE_EMBEDDINGS) + _layer_keys(n) + pooler, where)
    word, pos, typ = (sd[k] for k in _TEXT_EMBEDDINGS[:3])
    if typ.shape[0] < 2:
        raise ModelError(f"{where}: {typ.shape[0]} token type(s); UNITER's regions are type 1")
    if sd["img_embeddings.pos_linear.weight"].shape[1] != BOX_DIM:
        raise ModelError(f"{where}: pos_linear takes {sd['img_embeddings.pos_linear.weight'].shape[1]} box "
                         f"inputs, this model {BOX_DIM}")
    cfg = _bert_config(sd, n, num_heads, where, dropout, vocab_size=word.shape[0], max_position_embeddings=pos.shape[0],
                       type_vocab_size=typ.shape[0], pad_token_id=0,
                       feature_dim=sd["img_embeddings.img_linear.weight"].shape[1])
    ours = {k: sd[k] for k in list(_TEXT_EMBEDDINGS) + _layer_keys(n) + pooler}
    # UNITER's regions add the text side's token type 1 (one shared table); here that row is the region
    # type (text tokens are all type 0, so the row is the regions' alone either way)
    ours["img_embeddings.region_type"] = typ[1]
    rename = {"img_linear": "feat_linear", "img_layer_norm": "feat_norm", "pos_linear": "box_linear",
              "pos_layer_norm": "box_norm", "LayerNorm": "norm"}
    for src, dst in rename.items():
        for p in ("weight", "bias"):
            ours[f"img_embeddings.{dst}.{p}"] = sd[f"img_embeddings.{src}.{p}"]
    w, b = full[head + ".weight"], full[head + ".bias"]
    ours["itm.weight"], ours["itm.bias"] = (w, b) if head == "rank_output" else (w[1:], b[1:])
    model = CrossEncoder(cfg)
    _load(model, _float(ours), f"{where} [{prefix}*, {head}]")
    return model


__all__ = ["ORIGINAL_CLS_ID", "bert_text_encoder", "cross_encoder_from_uniter", "dual_encoder_from_lightningdot",
           "image_encoder_from_uniter", "import_lightningdot", "load_checkpoint", "load_tokenizer",
           "split_lightningdot", "text_encoder_from_bert", "uniter_image_encoder"]
