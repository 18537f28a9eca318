"""ldot model library: the dual encoder's modules and its export format, shared by training and evaluation."""
from ldot.model.dual_encoder import (ATTENTION, BOX_DIM, DualEncoder, ImageEncoder, MLMHead, PretrainHeads,
                                     ProjectionHead, RegionEmbeddings, compile_regions, enable_grad_checkpointing,
                                     resolve_text_encoder, set_attention, tie_mlm_decoder)
from ldot.model.errors import ModelError
from ldot.model.export import EXPORT_META, export_dual_encoder, load_dual_encoder

__all__ = ["ATTENTION", "BOX_DIM", "DualEncoder", "EXPORT_META", "ImageEncoder", "MLMHead", "ModelError", "PretrainHeads",
           "ProjectionHead", "RegionEmbeddings", "compile_regions", "enable_grad_checkpointing", "export_dual_encoder",
           "load_dual_encoder", "resolve_text_encoder", "set_attention", "tie_mlm_decoder"]
