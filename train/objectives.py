"""LightningDOT's objectives: CMR (global-batch contrastive), VMLM, and SMRM as MRFR and MRC-kl; and the
cross-encoder re-ranker's ITM (task=rerank).

Masking happens here, on the device, from a generator seeded by (seed, step, rank, micro-step): a
resumed run draws exactly the masks the uninterrupted run drew, with no RNG state to checkpoint. The
task of each step is drawn the same way from (seed, step), so every rank trains the same task.

No objective reads a value back from the device except VMLM, which gathers its masked words (their
number is data-dependent, and the vocabulary projection of every word would cost more than the wait):
CMR, MRFR and MRC-kl compute on every region and weight by the mask instead of selecting.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ldot import kernels
from ldot.model import DualEncoder

TASKS = ("cmr", "vmlm", "mrfr", "mrckl", "rerank")
IGNORE = -100


class TaskSampler:
    """One task per step with the configured ratios; a pure function of (seed, step)."""

    def __init__(self, ratios: dict[str, float], seed: int):
        self.tasks = [t for t in TASKS if ratios.get(t, 0) > 0]
        if not self.tasks:
            raise ValueError("at least one task needs a positive ratio")
        w = np.array([ratios[t] for t in self.tasks], dtype=np.float64)
        self.p, self.seed = w / w.sum(), seed

    def task_for(self, step: int) -> str:
        return str(np.random.default_rng([self.seed, step]).choice(self.tasks, p=self.p))


def _cat_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a and b stacked along dim 0, each zero-padded along dim 1 (tokens, regions) to the longer one."""
    width = max(a.shape[1], b.shape[1])

    def pad(x):
        return F.pad(x, (0, 0) * (x.dim() - 2) + (0, width - x.shape[1]))
    return torch.cat([pad(a), pad(b)])


def mask_generator(device: torch.device, seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1)[0]))
    return g


def _at_least_one(chosen: torch.Tensor, candidates: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Rows with candidates but nothing chosen get one random candidate, so every sample has a target.

    Branch-free (no `if empty.any()`), so it never waits on the device; the noise is drawn every time,
    which keeps the generator's stream the same whatever the batch holds."""
    empty = (chosen.sum(1) == 0) & (candidates.sum(1) > 0)
    noise = torch.rand(candidates.shape, generator=g, device=candidates.device)
    pick = (noise * candidates).argmax(1)
    one = torch.nn.functional.one_hot(pick, candidates.shape[1]).bool() & empty[:, None]
    return chosen | one


def mask_words(input_ids, attention_mask, *, prob: float, mask_id: int, vocab_size: int,
               special_ids: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: `prob` of the real words chosen; of those 80% [MASK], 10% random, 10% kept."""
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special_ids)
    chosen = (torch.rand(input_ids.shape, generator=g, device=input_ids.device) < prob) & candidates
    chosen = _at_least_one(chosen, candidates, g)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    action = torch.rand(input_ids.shape, generator=g, device=input_ids.device)
    random_words = torch.randint(vocab_size, input_ids.shape, generator=g, device=input_ids.device)
    masked = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_words, masked)
    return masked, labels


def mask_regions(img_mask, *, prob: float, g: torch.Generator) -> torch.Tensor:
    """`prob` of the real regions chosen (bool [B, N]); their features are zeroed by the caller."""
    candidates = img_mask.bool()
    chosen = (torch.rand(img_mask.shape, generator=g, device=img_mask.device) < prob) & candidates
    return _at_least_one(chosen, candidates, g)


class Objectives:
    def __init__(self, model: DualEncoder, tokenizer, *, mask_prob: float = 0.15, forward=None,
                 region_reduction: str = "original"):
        """forward: what runs the model's forward, the DeepSpeed engine in training (default: the model).
        The engine's forward is where DeepSpeed does its per-micro-batch bookkeeping: ZeRO-3 counts
        micro-batches there (without it every micro-batch's gradient replaced the previous one's under
        gradient accumulation: only the last counted) and resets its backward-hook state.
        region_reduction: MRFR's and MRC-kl's over a region's features/classes (pretrain.region_loss_reduction)."""
        self.model, self.mask_prob, self.region_reduction = model, mask_prob, region_reduction
        self.forward = model if forward is None else forward
        self.last_scale: torch.Tensor | None = None  # the logit scale of the last CMR step, for logging
        self.mask_id, self.vocab_size = tokenizer.mask_token_id, len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def __call__(self, task: str, batch: dict, g: torch.Generator | None, sizes: list[int] | None = None) -> torch.Tensor:
        if task == "cmr":
            return self.cmr_hard(batch, sizes=sizes) if "hard_img_feat" in batch else self.cmr(batch, g, sizes=sizes)
        return getattr(self, task)(batch, g)

    def cmr(self, batch: dict, g=None, sizes: list[int] | None = None) -> torch.Tensor:
        """Contrastive loss over the global batch: every rank's texts against every rank's images.
        `sizes`: every rank's local batch size, when the caller knows them (else the loss asks)."""
        m = self.model
        text, image, scale = self.forward(batch["input_ids"], batch["attention_mask"], batch["img_feat"],
                                          batch["img_pos"], batch["img_mask"])
        self.last_scale = None if scale is None else scale.detach()
        return kernels.global_contrastive_loss(text, image, scale, group_ids=batch["group_ids"],
                                               impl=m.contrastive.impl, sizes=sizes)

    def rerank(self, batch: dict, g=None) -> torch.Tensor:
        """The cross-encoder re-ranker's listwise ITM over each query's 1 positive + K mined negatives
        (train/rerank.py: the batch's lists, and why listwise)."""
        from ldot.train.rerank import listwise_itm_loss

        scores = self.forward(batch["input_ids"], batch["attention_mask"], batch["img_feat"], batch["img_pos"],
                              batch["img_mask"])
        return listwise_itm_loss(scores, batch["lists"])

    def vmlm(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        """Masked words predicted from z_m + h_0 (masked text states plus the image's [CLS])."""
        m = self.model
        ids, labels = mask_words(batch["input_ids"], batch["attention_mask"], prob=self.mask_prob,
                                 mask_id=self.mask_id, vocab_size=self.vocab_size,
                                 special_ids=self.special_ids.to(batch["input_ids"].device), g=g)
        z_m, h = self.forward(ids, batch["attention_mask"], batch["img_feat"], batch["img_pos"], batch["img_mask"],
                              states=True)
        h_0 = h[:, :1]
        chosen = labels != IGNORE
        logits = m.pretrain_heads.mlm((z_m + h_0)[chosen], m.text.embeddings.word_embeddings.weight)
        return F.cross_entropy(logits.float(), labels[chosen])

    def _smrm(self, batch: dict, g: torch.Generator):
        """h_m + z_0 at every region [B, N, H] (masked regions' features zeroed), and the chosen mask."""
        chosen = mask_regions(batch["img_mask"], prob=self.mask_prob, g=g)
        feat = batch["img_feat"].masked_fill(chosen[..., None], 0.0)
        z, h = self.forward(batch["input_ids"], batch["attention_mask"], feat, batch["img_pos"], batch["img_mask"],
                            states=True)
        return h[:, 1:] + z[:, :1], chosen

    def cmr_hard(self, batch: dict, sizes: list[int] | None = None) -> torch.Tensor:
        """CMR with every pair's mined hard negatives as extra columns (train/hard_negatives.py): the pairs and
        their hard captions and images go through the encoders in one forward (padded to one length), then
        the loss scores every rank's captions against every rank's images and hard images, and back."""
        b, k = batch["input_ids"].shape[0], batch["hard_image_groups"].shape[1]
        both = {name: _cat_padded(batch[name], batch[f"hard_{name}"])
                for name in ("input_ids", "attention_mask", "img_feat", "img_pos", "img_mask")}
        text, image, scale = self.forward(both["input_ids"], both["attention_mask"], both["img_feat"],
                                          both["img_pos"], both["img_mask"])
        self.last_scale = None if scale is None else scale.detach()
        d = text.shape[1]
        return kernels.global_contrastive_loss(
            text[:b], image[:b], scale, group_ids=batch["group_ids"], impl=self.model.contrastive.impl, sizes=sizes,
            hard_image=image[b:].reshape(b, k, d), hard_text=text[b:].reshape(b, k, d),
            hard_image_groups=batch["hard_image_groups"], hard_text_groups=batch["hard_text_groups"])

    def _per_region(self, per_element: torch.Tensor) -> torch.Tensor:
        """[B, N, E] -> [B, N]: the mean over a region's E features/classes (original) or their sum (paper)."""
        return per_element.mean(-1) if self.region_reduction == "original" else per_element.sum(-1)

    @staticmethod
    def _mean_over_chosen(per_region: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The mean of `per_region` [B, N] over the chosen regions (where, not a product: no NaN leaks in)."""
        total = torch.where(chosen, per_region, torch.zeros_like(per_region)).sum()
        return total / chosen.sum().clamp_min(1)

    def mrfr(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        """Masked region feature regression: L2 to the original feature, averaged over masked regions."""
        out, chosen = self._smrm(batch, g)
        pred = self.model.pretrain_heads.mrfr(out).float()
        per_region = self._per_region(F.mse_loss(pred, batch["img_feat"].float(), reduction="none"))
        return self._mean_over_chosen(per_region, chosen)

    def mrckl(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        """Masked region classification: KL to the detector's (or backbone's) class distribution,
        averaged over masked regions."""
        out, chosen = self._smrm(batch, g)
        logp = F.log_softmax(self.model.pretrain_heads.mrc(out).float(), dim=-1)
        target = batch["img_cls"].float()
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-8)
        per_region = self._per_region(F.kl_div(logp, target, reduction="none"))
        return self._mean_over_chosen(per_region, chosen)
