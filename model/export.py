"""Exported dual encoders: Hugging Face-style directories that eval and serving load without the
training code or its config (text_encoder/, image_encoder/, heads.pt, ldot.json)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, BertModel

from ldot.kernels import ContrastiveLoss
from ldot.model.dual_encoder import DualEncoder, ImageEncoder
from ldot.model.errors import ModelError

EXPORT_META = "ldot.json"
DUAL_FORMAT = "ldot-dual-encoder"
# 2: the image encoder's embeddings are UNITER's (a [CLS] token with its own LayerNorm, a region type
# vector). Version 1 exports still load: their weights map exactly onto the new layout (see
# RegionEmbeddings), so they compute what they computed.
EXPORT_VERSION = 2
READS_VERSIONS = (1, 2)
_HEADS = ("text_proj.", "image_proj.", "contrastive.")


def export_dual_encoder(model: DualEncoder, tokenizer, out_dir: str | Path, meta: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.text.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "text_encoder")
    model.image.save_pretrained(out / "image_encoder")
    heads = {k: v for k, v in model.state_dict().items() if k.startswith(_HEADS)}
    torch.save(heads, out / "heads.pt")
    info = {"format": DUAL_FORMAT, "version": EXPORT_VERSION, "normalize": model.normalize,
            "projection": not isinstance(model.text_proj, nn.Identity),
            "scale_mode": model.contrastive.scale_mode, "embed_dim": model.embed_dim, **meta}
    (out / EXPORT_META).write_text(json.dumps(info, indent=2))
    return out


def read_export_meta(path: str | Path) -> dict:
    """An export directory's ldot.json; its "format" says which model it holds (none: a dual encoder)."""
    meta_file = Path(path) / EXPORT_META
    if not meta_file.is_file():
        raise ModelError(f"{path} is not an exported ldot checkpoint (no {EXPORT_META})")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exn:
        raise ModelError(f"{meta_file}: not valid JSON ({exn})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{meta_file}: not a JSON object")
    return meta


def load_dual_encoder(path: str | Path, device: str | torch.device = "cpu"):
    """Load an exported dual encoder: returns (tokenizer, model in eval mode, meta dict)."""
    path = Path(path)
    meta = read_export_meta(path)
    meta_file = path / EXPORT_META
    if meta.get("format", DUAL_FORMAT) != DUAL_FORMAT:
        raise ModelError(f"{path}: a {meta['format']} export, not a dual encoder (a cross-encoder re-ranks: "
                         "give it as --rerank)")
    if meta.get("version") not in READS_VERSIONS:
        raise ModelError(f"{meta_file}: export format version {meta.get('version')!r}; this code reads versions "
                         f"{', '.join(map(str, READS_VERSIONS))}")
    tokenizer = AutoTokenizer.from_pretrained(path / "text_encoder")
    text = BertModel.from_pretrained(path / "text_encoder", add_pooling_layer=False)
    image = _load_image_encoder(path / "image_encoder")
    model = DualEncoder(text, image, projection=meta["projection"], normalize=meta["normalize"],
                        contrastive=ContrastiveLoss(meta["scale_mode"], init_scale=1.0),
                        proj_dim=meta.get("embed_dim") if meta["projection"] else None)
    missing, unexpected = model.load_state_dict(torch.load(path / "heads.pt", map_location="cpu"), strict=False)
    bad = [k for k in missing if k.startswith(_HEADS)] + unexpected
    if bad:
        raise ModelError(f"{path}/heads.pt does not match {EXPORT_META}: {bad[:4]}")
    return tokenizer, model.to(device).eval(), meta


def _load_image_encoder(path: Path) -> ImageEncoder:
    """from_pretrained, then every weight checked: transformers fills a weight missing from the file with
    a fresh random one and says so only in a log line."""
    from safetensors.torch import load_file

    image = ImageEncoder.from_pretrained(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return image  # a .bin directory: transformers' own loading only
    saved = {}
    for f in files:
        saved.update(load_file(f))
    image.load_state_dict(saved, strict=True)  # the version-1 layout is upgraded by RegionEmbeddings' hook
    return image
