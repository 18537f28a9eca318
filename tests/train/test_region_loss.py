"""MRFR and MRC-kl reductions (pretrain.region_loss_reduction, issue 15 section 3): the default is the original
code's element mean, so loss curves compare with the original runs' logs; `paper` is the per-region sum the
paper writes, D (features) and C (classes) times as large on the same masks."""
import pytest
import torch
import torch.nn.functional as F

from ldot.train.config import LossConfig, ModelConfig, PretrainConfig, load_config
from ldot.train.model_setup import build_dual_encoder
from ldot.train.objectives import Objectives, mask_generator, mask_regions

B, N, D, C = 4, 6, 16, 10


def _setup(tiny_text_encoder):
    torch.manual_seed(0)
    tok, model = build_dual_encoder(ModelConfig(text_encoder=tiny_text_encoder, image_layers=1, dropout=0.0),
                                    LossConfig(scale="fixed", init_scale=10.0, normalize=True), D, pretrain=True,
                                    num_classes=C)
    enc = tok([f"a scene with {i} shapes" for i in range(B)], padding=True, return_tensors="pt")
    mask = torch.ones(B, N, dtype=torch.long)
    mask[0, 4:] = 0  # padding regions: never chosen, never counted
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "img_feat": torch.randn(B, N, D),
             "img_pos": torch.rand(B, N, 7), "img_mask": mask, "group_ids": torch.arange(B),
             "img_cls": torch.softmax(2 * torch.randn(B, N, C), -1)}
    return tok, model, batch


def test_the_default_is_the_original_codes_element_mean():
    assert PretrainConfig().region_loss_reduction == "original"
    for recipe in ("demo", "pretrain-paper"):
        assert load_config(f"train/configs/{recipe}.yaml").pretrain.region_loss_reduction == "original"


@pytest.mark.parametrize("task,size", [("mrfr", D), ("mrckl", C)])
def test_paper_is_the_per_region_sum(task, size, tiny_text_encoder):
    tok, model, batch = _setup(tiny_text_encoder)
    objectives = Objectives(model, tok, mask_prob=0.3)
    assert objectives.region_reduction == "original"
    g = lambda: mask_generator(torch.device("cpu"), 0, 3, 0, 0)  # noqa: E731 -- the same masks each time
    original = objectives(task, batch, g())
    objectives.region_reduction = "paper"
    paper = objectives(task, batch, g())
    assert float(paper) == pytest.approx(size * float(original), rel=1e-5)
    if task == "mrfr":  # the original: F.mse_loss's mean over [masked regions, D]
        chosen = mask_regions(batch["img_mask"], prob=0.3, g=g())
        feat = batch["img_feat"].masked_fill(chosen[..., None], 0.0)
        z, h = model(batch["input_ids"], batch["attention_mask"], feat, batch["img_pos"], batch["img_mask"],
                     states=True)
        pred = model.pretrain_heads.mrfr(h[:, 1:] + z[:, :1])
        assert float(original) == pytest.approx(float(F.mse_loss(pred[chosen], batch["img_feat"][chosen])), rel=1e-5)
