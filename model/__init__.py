"""ldot model library: the dual encoder's modules, the cross-encoder re-ranker, their export formats, shared by
training and evaluation."""
from ldot.model.dual_encoder import (ATTENTION, BOX_DIM, DualEncoder, ImageEncoder, MLMHead, PretrainHeads,
                                     ProjectionHead, RegionEmbeddings, compile_regions, enable_grad_checkpointing,
                                     resolve_text_encoder, set_attention, tie_mlm_decoder)
from ldot.model.cross_encoder import CrossEncoder, export_cross_encoder, load_cross_encoder
from ldot.model.errors import ModelError
from ldot.model.export import EXPORT_META, export_dual_encoder, load_dual_encoder, read_export_meta

__all__ = ["ATTENTION", "BOX_DIM", "CrossEncoder", "DualEncoder", "EXPORT_META", "ImageEncoder", "MLMHead", "ModelError",
           "PretrainHeads", "ProjectionHead", "RegionEmbeddings", "compile_regions", "enable_grad_checkpointing",
           "export_cross_encoder", "export_dual_encoder", "load_cross_encoder", "load_dual_encoder", "read_export_meta",
           "resolve_text_encoder", "set_attention", "tie_mlm_decoder"]
