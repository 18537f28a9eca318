"""ldot model library: the dual encoder's modules and its export format, shared by training and evaluation."""
from ldot.model.dual_encoder import (BOX_DIM, DualEncoder, ImageEncoder, MLMHead, PretrainHeads, ProjectionHead,
                                     RegionEmbeddings, enable_grad_checkpointing, resolve_text_encoder,
                                     tie_mlm_decoder)
from ldot.model.errors import ModelError
from ldot.model.export import EXPORT_META, export_dual_encoder, load_dual_encoder

__all__ = ["BOX_DIM", "DualEncoder", "EXPORT_META", "ImageEncoder", "MLMHead", "ModelError", "PretrainHeads",
           "ProjectionHead", "RegionEmbeddings", "enable_grad_checkpointing", "export_dual_encoder",
           "load_dual_encoder", "resolve_text_encoder", "tie_mlm_decoder"]
