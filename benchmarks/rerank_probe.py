"""A probe of a re-ranker design, not the shipped one: does a cross-attention layer over the first stage's own
token states, added to its score, re-rank its top 20 better than it ranks them? Run after
`benchmarks/quality.py` (it reads that run's fine-tuned dual encoder and data):

    python benchmarks/quality.py --relations --rows finetune         # the first stage and the data
    python benchmarks/rerank_probe.py --out out/quality-relations     # ~35 min on 2 CPU cores

Why a probe: the shipped cross-encoder (model/cross_encoder.py, task=rerank) starts its cross-modal
attention and ITM head from nothing, and on these CPU budgets its list loss sits at ln(1 + K + R) for 100-200
steps and it re-ranks worse than the first stage ranks (RESULTS.md, "quality"). The design probed here
starts exactly at the first stage instead: score = scale * cos(text [CLS], image [CLS]) of the frozen dual
encoder + a correction read from [CLS] after `--layers` BERT layers over the concatenated caption-token and
region states of that dual encoder (the layers copied from its text encoder's last ones, the correction's
last linear layer zero, so step 0 is the first stage to the bit). It trains with listwise ITM on lists of
1 positive, K=3 of the top 5 mined negatives and R=2 random ones, as task=rerank does, both directions.

The training lists are mined within pools of `--pool` consecutive training images, so a list is as hard
as the top of a gallery of that size (the test galleries are 200 images); a pool of the whole training
split is what `ldot eval mine` gives. Every 50 steps it prints the list loss on fixed lists of the
seen-pairs split (pool 200, built the same way) beside the first stage's; at the end, recall before and
after re-ranking each query's top 20 on the test split and the seen-pairs split, and how much of the
correction inside an image's top 20 depends on the caption alone (`recall`): such a part cancels in a
caption's list, which the loss trains half the time, and reorders every image's list. `--minus-text` reads
the correction from the pair's [CLS] less the caption's own (the same layers over the caption alone), a
try at taking that part out by construction; `--center` subtracts an estimate of it in training instead
(`centered`). States are computed once (the dual encoder is frozen);
everything runs in this process, one CPU thread pool.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rerank_parts import parts_report, reorder
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
M = 20  # candidates re-ranked per query, the paper's smaller M
K, R, B, TOP = 3, 2, 16, 5  # mined and random negatives a list, images a step, mined list depth


def states(model, tokenizer, split, store):
    """Per caption (token states [n, d], unit [CLS]) and per image (region states with [CLS] [n, d], unit [CLS])."""
    from ldot.data.loader import tokenize

    texts, images = [], []
    with torch.no_grad():
        for s in range(0, len(split.captions), 256):
            t = tokenize(tokenizer, split.captions[s:s + 256], 32)
            h = model.text_states(t["input_ids"], t["attention_mask"])
            e = F.normalize(h[:, 0], dim=-1)
            for j in range(len(h)):
                n = int(t["attention_mask"][j].sum())
                texts.append((h[j, :n].clone(), e[j]))
        for s in range(0, split.num_images, 64):
            rows = list(range(s, min(s + 64, split.num_images)))
            b = store.batch(rows)
            h = model.image_states(b["img_feat"], b["img_pos"], b["img_mask"])
            e = F.normalize(h[:, 0], dim=-1)
            for j in range(len(rows)):
                n = int(b["img_mask"][j].sum()) + 1
                images.append((h[j, :n].clone(), e[j]))
    return texts, images


def emb(items) -> torch.Tensor:
    return torch.stack([x[1] for x in items])


def mine_pools(texts, images, cap, pool: int, top: int):
    """Per caption its top `top` wrong images, per image the top `top` captions of other images, each within
    its pool of `pool` consecutive images."""
    scores = (emb(texts) @ emb(images).T).numpy()
    n = len(images)
    t2i, i2t = [None] * len(texts), [None] * n
    for s in range(0, n, pool):
        imgs = np.arange(s, min(s + pool, n))
        caps = np.nonzero((cap >= s) & (cap < s + pool))[0]
        sub = scores[np.ix_(caps, imgs)]
        for a, c in enumerate(caps):
            t2i[c] = [int(x) for x in imgs[np.argsort(-sub[a])] if x != cap[c]][:top]
        for b, r in enumerate(imgs):
            i2t[r] = [int(x) for x in caps[np.argsort(-sub[:, b])] if cap[x] != r][:top]
    return t2i, i2t


def draw(rng, pool, n: int, positive) -> list[int]:
    out = [int(x) for x in rng.choice(pool, size=min(K, len(pool)), replace=False)]
    while len(out) < K + R:
        x = int(rng.integers(n))
        if x not in out and not positive(x):
            out.append(x)
    return out


def make_lists(texts, images, cap, t2i, i2t, rows, rng, all_positives: bool = False):
    """Every image's two lists (its caption against 1 + K + R images, the image against 1 + K + R captions).
    all_positives: the image's list holds all its own captions first (then its K + R negatives), as its
    top M does at test time; returns the lists padded with -1 and each list's count of positives too."""
    first = np.searchsorted(cap, np.arange(len(images)))
    count = np.bincount(cap, minlength=len(images))
    tp, ip, lists, npos = [], [], [], []
    for r in rows:
        c = int(first[r] + rng.integers(count[r]))
        ni = draw(rng, t2i[c], len(images), lambda x: x == r)
        nc = draw(rng, i2t[r], len(texts), lambda x: cap[x] == r)
        p0 = len(tp)
        tp += [texts[c]] * (1 + len(ni)) + [texts[x] for x in nc]
        ip += [images[r]] + [images[x] for x in ni] + [images[r]] * len(nc)
        lists.append([p0 + j for j in range(1 + len(ni))])
        own = []
        if all_positives:
            own = [len(tp) + j for j in range(count[r] - 1)]
            tp += [texts[x] for x in range(first[r], first[r] + count[r]) if x != c]
            ip += [images[r]] * len(own)
        lists.append([p0, *own] + [p0 + 1 + len(ni) + j for j in range(len(nc))])
        npos += [1, 1 + len(own)]
    if not all_positives:
        return tp, ip, torch.tensor(lists)
    width = max(map(len, lists))
    return tp, ip, torch.tensor([x + [-1] * (width - len(x)) for x in lists]), torch.tensor(npos)


def multi_positive_loss(scores, lists, npos) -> torch.Tensor:
    """Mean over lists of -log(softmax mass of the list's positives), padding (-1) left out."""
    logits = scores[lists.clamp_min(0)].masked_fill(lists < 0, float("-inf"))
    positive = torch.arange(lists.shape[1])[None] < npos[:, None]
    return (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~positive, float("-inf")), 1)).mean()


def centered(model, texts, images, pool, rng) -> torch.Tensor:
    """model(texts, images) less each caption's correction against one random image of `pool`, drawn once
    per caption (texts holds a caption's tuple once per pair): the caption-only part taken out of every
    score. It is the same inside a caption's list, so only an image's list changes."""
    first: dict[int, int] = {}
    index = [first.setdefault(id(t), len(first)) for t in texts]
    unique = [None] * len(first)
    for t, j in zip(texts, index):
        unique[j] = t
    refs = [pool[int(x)] for x in rng.integers(0, len(pool), size=len(unique))]
    return model(texts, images) - model.correction(unique, refs)[torch.tensor(index)]


class Fusion(nn.Module):
    """The probed re-ranker (module doc): the first stage's scaled cosine plus a zero-initialized correction."""

    def __init__(self, dual, layers: int, minus_text: bool = False):
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertLayer

        super().__init__()
        self.cfg = cfg = BertConfig(**dual.text.config.to_dict())
        cfg._attn_implementation = "sdpa"
        self.ttype = nn.Parameter(torch.zeros(2, cfg.hidden_size))
        self.layers = nn.ModuleList([BertLayer(cfg) for _ in range(layers)])
        for dst, src in zip(self.layers, dual.text.encoder.layer[-layers:]):
            dst.load_state_dict(src.state_dict())
        self.head = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.Tanh(), nn.Linear(cfg.hidden_size, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.scale = nn.Parameter(torch.tensor(14.2857))  # 1 / the demo recipe's CMR temperature 0.07
        self.minus_text = minus_text

    def forward(self, texts, images) -> torch.Tensor:
        return self.scale * (emb(texts) * emb(images)).sum(-1) + self.correction(texts, images)

    def correction(self, texts, images) -> torch.Tensor:
        from ldot.model.dual_encoder import attention_mask_4d

        lt, li = max(len(t[0]) for t in texts), max(len(i[0]) for i in images)
        x = torch.zeros(len(texts), lt + li, self.cfg.hidden_size)
        m = torch.zeros(len(texts), lt + li, dtype=torch.long)
        for p, (t, i) in enumerate(zip(texts, images)):
            x[p, :len(t[0])] = t[0] + self.ttype[0]
            m[p, :len(t[0])] = 1
            x[p, lt:lt + len(i[0])] = i[0] + self.ttype[1]
            m[p, lt:lt + len(i[0])] = 1

        def cls(x, m):
            mask = attention_mask_4d(self.cfg, m, x.dtype)
            for layer in self.layers:
                out = layer(x, attention_mask=mask)
                x = out[0] if isinstance(out, tuple) else out
            return x[:, 0]

        h = cls(x, m)
        if self.minus_text:  # what attending to the image changed, not what the caption alone reads as
            h = h - cls(x[:, :lt], m[:, :lt])
        return self.head(h).squeeze(-1)


def corrections(model, texts, images, bs: int = 500) -> np.ndarray:
    """The model's correction of each (texts[j], images[j]) pair, in batches of bs pairs, eval mode."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model.correction(texts[s:s + bs], images[s:s + bs]) for s in range(0, len(texts), bs)]).numpy()


def rank_metrics(ir_top, tr_top, cap) -> dict[str, float]:
    """R@1/5/10 both ways and AR, percent, of rankings [queries, M], best first (image rows for captions,
    caption ids for images): eval.metrics' recall of a TopK scored by rank."""
    from ldot.eval.metrics import TopK, retrieval_recall

    by_rank = -np.arange(M, dtype=np.float64)
    top = TopK(ir_top, np.tile(by_rank, (len(ir_top), 1)), tr_top, np.tile(by_rank, (len(tr_top), 1)),
               num_images=len(tr_top), num_captions=len(ir_top))
    return {k: 100 * v for k, v in retrieval_recall(top, cap).items()}


def recall(model, texts, images, cap) -> tuple[dict, dict, dict, dict]:
    """The first stage's recall; the recall of its top M re-ranked by the model; the same with an image's
    lists re-ranked by the correction less its caption-only part (as a model trained `centered` was trained;
    a caption's lists do not change); and parts_report's figures for an image's lists. An image's list
    orders captions, so a part of the correction that depends on the caption alone reorders it as much as a
    part that reads the pair; that part is estimated per candidate caption as its mean correction against 2
    random other images of the gallery."""
    scores = (emb(texts) @ emb(images).T).numpy()
    scale = model.scale.item()
    ir_top, tr_top = np.argsort(-scores, axis=1)[:, :M], np.argsort(-scores.T, axis=1)[:, :M]
    n = len(images)
    ir_corr = corrections(model, [texts[q] for q in range(len(texts)) for _ in range(M)],
                          [images[i] for i in ir_top.ravel()]).reshape(ir_top.shape)
    other = np.random.default_rng(1).integers(0, n, size=(n, M, 2))
    tr_corr = corrections(model, [texts[c] for c in tr_top.ravel()], [images[q] for q in range(n) for _ in range(M)])
    part = corrections(model, [texts[c] for c in tr_top.ravel() for _ in range(2)], [images[i] for i in other.ravel()])
    tr_corr, part = tr_corr.reshape(tr_top.shape), part.reshape(n, M, 2).mean(-1)

    def order(top, first, corr):
        return reorder(top, scale * first + corr)

    ir_first, tr_first = np.take_along_axis(scores, ir_top, 1), np.take_along_axis(scores.T, tr_top, 1)
    base = rank_metrics(ir_top, tr_top, cap)
    ir_fused = order(ir_top, ir_first, ir_corr)
    fused = rank_metrics(ir_fused, order(tr_top, tr_first, tr_corr), cap)
    less_part = rank_metrics(ir_fused, order(tr_top, tr_first, tr_corr - part), cap)
    parts = parts_report(tr_top, scale * tr_first + tr_corr, part, lambda ids: cap[ids] == np.arange(n), scale * tr_first)
    return base, fused, less_part, parts


def main(argv=None) -> int:
    from ldot.data.loader import load_eval_split
    from ldot.eval.image_store import ImageStore
    from ldot.model import load_dual_encoder

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "quality-relations", help="a benchmarks/quality.py --out")
    p.add_argument("--pool", type=int, default=200, help="images a mining pool (the training split's size: eval mine's)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--all-positives", action="store_true",
                   help="an image's training list holds all its own captions as positives (make_lists)")
    p.add_argument("--minus-text", action="store_true",
                   help="the correction reads the pair's [CLS] minus the caption's alone (Fusion.correction)")
    p.add_argument("--center", action="store_true",
                   help="train with each caption's correction against a random image subtracted (centered), and report the "
                        "re-ranking less the caption-only part too")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    tokenizer, dual, _ = load_dual_encoder(args.out / "runs" / "finetune-seed0" / "checkpoints" / "final")
    dual.eval()

    def load(directory: Path):
        split = load_eval_split(directory)
        texts, images = states(dual, tokenizer, split, ImageStore(directory, split.keys))
        return texts, images, np.asarray(split.caption_image)

    train, test, seen = load(args.out / "data" / "train"), load(args.out / "data" / "test"), load(args.out / "seen-data" / "train")
    model = Fusion(dual, args.layers, args.minus_text)
    t2i, i2t = mine_pools(*train, args.pool, TOP)
    rng = np.random.default_rng(0)
    vt, vi, vl = make_lists(*seen, *mine_pools(*seen, 200, TOP), range(len(seen[1])), np.random.default_rng(123))
    target = torch.zeros(len(vl), dtype=torch.long)

    ref_rng = np.random.default_rng(7)  # the centering's draws, apart from the lists' (the same lists either way)

    def val_losses() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            val = centered(model, vt, vi, seen[1], np.random.default_rng(124)) if args.center else model(vt, vi)
            fused = F.cross_entropy(val[vl], target).item()
            first = F.cross_entropy((model.scale * (emb(vt) * emb(vi)).sum(-1))[vl], target).item()
        model.train()
        return fused, first

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    trace, losses = [], []
    for step in range(args.steps + 1):
        if step % 50 == 0:
            fused, first = val_losses()
            trace.append((step, fused, first, float(np.mean(losses[-50:])) if losses else float("nan")))
            print(f"step {step}: seen-pairs list loss {fused:.3f} (first stage {first:.3f}), training lists "
                  f"{trace[-1][3]:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
        if step == args.steps:
            break
        rows = rng.choice(len(train[1]), size=B, replace=False)
        if args.all_positives:
            tp, ip, lists, npos = make_lists(*train, t2i, i2t, rows, rng, all_positives=True)
        else:
            tp, ip, lists = make_lists(*train, t2i, i2t, rows, rng)
        scores = centered(model, tp, ip, train[1], ref_rng) if args.center else model(tp, ip)
        if args.all_positives:
            loss = multi_positive_loss(scores, lists, npos)
        else:
            loss = F.cross_entropy(scores[lists], torch.zeros(len(lists), dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        losses.append(loss.item())
    lines = ["| test set | ranking | TR R@1 | IR R@1 | AR | AR vs first stage |", "| --- | --- | --- | --- | --- | --- |"]
    notes = []
    for name, data in (("held-out pairs", test), ("seen pairs", seen)):
        base, fused, less_part, diag = recall(model, *data)
        rankings = [("first stage", base), (f"+ probe re-ranker, top {M}", fused)]
        if args.center:
            rankings.append(("+ probe re-ranker less the caption-only part", less_part))
        for label, r in rankings:
            delta = "" if r is base else f"{r['ar'] - base['ar']:+.1f}"
            lines.append(f"| {name} | {label} | {r['tr_r1']:.1f} | {r['ir_r1']:.1f} | {r['ar']:.1f} | {delta} |")
        notes.append(f"{name}: in an image's top {M} the correction correlates r = {diag['r']:.2f} with its "
                     f"caption-only part; TR R@1 first stage {diag['first']:.1f}, re-ranked {diag['reranked']:.1f}, "
                     f"first stage + that part alone {diag['by_part']:.1f}, re-ranked less that part "
                     f"{diag['less_part']:.1f}")
    print("\n".join(lines + notes))
    print("list loss (seen pairs) by step: " + ", ".join(f"{s}: {f:.3f}" for s, f, _, _ in trace)
          + f" (first stage {trace[0][2]:.3f}); wall time {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
