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
after re-ranking each query's top 20 on the test split and the seen-pairs split. States are computed
once (the dual encoder is frozen); everything runs in this process, one CPU thread pool.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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


class Fusion(nn.Module):
    """The probed re-ranker (module doc): the first stage's scaled cosine plus a zero-initialized correction."""

    def __init__(self, dual, layers: int):
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

    def forward(self, texts, images) -> torch.Tensor:
        from ldot.model.dual_encoder import attention_mask_4d

        lt, li = max(len(t[0]) for t in texts), max(len(i[0]) for i in images)
        x = torch.zeros(len(texts), lt + li, self.cfg.hidden_size)
        m = torch.zeros(len(texts), lt + li, dtype=torch.long)
        for p, (t, i) in enumerate(zip(texts, images)):
            x[p, :len(t[0])] = t[0] + self.ttype[0]
            m[p, :len(t[0])] = 1
            x[p, lt:lt + len(i[0])] = i[0] + self.ttype[1]
            m[p, lt:lt + len(i[0])] = 1
        mask = attention_mask_4d(self.cfg, m, x.dtype)
        for layer in self.layers:
            out = layer(x, attention_mask=mask)
            x = out[0] if isinstance(out, tuple) else out
        return self.scale * (emb(texts) * emb(images)).sum(-1) + self.head(x[:, 0]).squeeze(-1)


def recall(model, texts, images, cap, rerank: bool) -> dict[str, float]:
    """R@1/5/10 both ways and AR, percent, of the first stage's ranking, or of its top M re-ranked."""
    scores = (emb(texts) @ emb(images).T).numpy()
    ir_top, tr_top = np.argsort(-scores, axis=1)[:, :M], np.argsort(-scores.T, axis=1)[:, :M]
    if rerank:
        model.eval()
        with torch.no_grad():
            new = np.stack([model([texts[q]] * M, [images[i] for i in ir_top[q]]).numpy() for q in range(len(ir_top))])
            ir_top = np.take_along_axis(ir_top, np.argsort(-new, axis=1, kind="stable"), 1)
            new = np.stack([model([texts[c] for c in tr_top[q]], [images[q]] * M).numpy() for q in range(len(tr_top))])
            tr_top = np.take_along_axis(tr_top, np.argsort(-new, axis=1, kind="stable"), 1)
    out = {}
    for k in (1, 5, 10):
        out[f"ir_r{k}"] = 100 * float(np.mean([cap[q] in ir_top[q, :k] for q in range(len(ir_top))]))
        out[f"tr_r{k}"] = 100 * float(np.mean([np.any(cap[tr_top[q, :k]] == q) for q in range(len(tr_top))]))
    out["ar"] = float(np.mean(list(out.values())))
    return out


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
    model = Fusion(dual, args.layers)
    t2i, i2t = mine_pools(*train, args.pool, TOP)
    rng = np.random.default_rng(0)
    vt, vi, vl = make_lists(*seen, *mine_pools(*seen, 200, TOP), range(len(seen[1])), np.random.default_rng(123))
    target = torch.zeros(len(vl), dtype=torch.long)

    def val_losses() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            fused = F.cross_entropy(model(vt, vi)[vl], target).item()
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
            loss = multi_positive_loss(model(tp, ip), lists, npos)
        else:
            tp, ip, lists = make_lists(*train, t2i, i2t, rows, rng)
            loss = F.cross_entropy(model(tp, ip)[lists], torch.zeros(len(lists), dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        losses.append(loss.item())
    lines = ["| test set | ranking | TR R@1 | IR R@1 | AR | AR vs first stage |", "| --- | --- | --- | --- | --- | --- |"]
    for name, data in (("held-out pairs", test), ("seen pairs", seen)):
        base, fused = recall(model, *data, rerank=False), recall(model, *data, rerank=True)
        for label, r in (("first stage", base), (f"+ probe re-ranker, top {M}", fused)):
            delta = "" if r is base else f"{r['ar'] - base['ar']:+.1f}"
            lines.append(f"| {name} | {label} | {r['tr_r1']:.1f} | {r['ir_r1']:.1f} | {r['ar']:.1f} | {delta} |")
    print("\n".join(lines))
    print("list loss (seen pairs) by step: " + ", ".join(f"{s}: {f:.3f}" for s, f, _, _ in trace)
          + f" (first stage {trace[0][2]:.3f}); wall time {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
