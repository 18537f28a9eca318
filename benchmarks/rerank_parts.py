"""How much of a re-ranker's score inside the first stage's top M lists depends on one side alone.

Inside a caption's list (image retrieval) every score shares the caption, so a part of the score that
depends on the image alone reorders the list as much as a part that reads the pair; inside an image's list
(text retrieval) the same holds for a part that depends on the caption alone. A listwise loss cannot see
such a part in the lists where it cancels, and trains both kinds of list, so nothing holds it to zero. This
measures it for a trained re-ranker: per candidate, its one-sided part is its mean score against `--others`
random queries of the other kind from the same gallery (the candidate image against random captions, the
candidate caption against random images); then, per direction,

  r                  the correlation of the scores with their one-sided parts inside a list (mean over lists)
  R@1 re-ranked      the top M re-ranked by the scores, by the one-sided parts alone, and by the scores less
                     those parts (the pair part)

beside the first stage's R@1. Run after `benchmarks/quality.py` (it reads that run's fine-tuned dual
encoder, its re-ranker and the data):

    python benchmarks/rerank_parts.py --out out/quality      # the shipped cross-encoder: ~8 min on 2 cores

`benchmarks/rerank_probe.py` reports the same for its probe re-ranker (parts_report).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def reorder(top: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The rows of top (candidate ids, best first) sorted by scores, highest first, ties kept in order."""
    return np.take_along_axis(top, np.argsort(-scores, axis=1, kind="stable"), 1)


def parts_report(top: np.ndarray, scores: np.ndarray, parts: np.ndarray, hit, base=0.0) -> dict[str, float]:
    """top [queries, M] the first stage's candidates; scores [queries, M] the re-ranker's score of each, of
    which base (the first stage's score, where the re-ranker adds it; else 0) is a part, and parts the one-sided
    part of scores - base; hit(ids [queries]) -> bool [queries], whether each query's first candidate is right.
    Returns r (of scores - base with parts) and R@1 in percent: the first stage, re-ranked, by base + the
    one-sided part alone, by the scores less that part."""
    own = scores - base
    r = [np.corrcoef(s, p)[0, 1] for s, p in zip(own, parts) if s.std() > 0 and p.std() > 0]
    r1 = {name: 100 * float(np.mean(hit(t[:, 0]))) for name, t in (
        ("first", top), ("reranked", reorder(top, scores)), ("by_part", reorder(top, base + parts)),
        ("less_part", reorder(top, scores - parts)))}
    return {"r": float(np.mean(r)) if r else float("nan"), **r1}


def main(argv=None) -> int:
    from ldot.data.loader import load_eval_split
    from ldot.eval.image_store import ImageStore
    from ldot.eval.recall import encode_split
    from ldot.eval.rerank import load_reranker
    from ldot.model import load_dual_encoder

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "quality", help="a benchmarks/quality.py --out")
    p.add_argument("--reranker", type=Path, help="an export (default: --out's runs/rerank-seed0)")
    p.add_argument("--m", type=int, default=20, help="candidates re-ranked per query")
    p.add_argument("--others", type=int, default=2, help="random queries a one-sided part is the mean over")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    tokenizer, dual, _ = load_dual_encoder(args.out / "runs" / "finetune-seed0" / "checkpoints" / "final")
    dual.eval()
    lines = ["| test set | lists | r (score, one-sided part) | R@1 first stage | re-ranked | by the one-sided part "
             "alone | by the score less it |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, directory in (("held-out pairs", args.out / "data" / "test"), ("seen pairs", args.out / "seen-data" / "train")):
        split = load_eval_split(directory)
        store = ImageStore(directory, split.keys)
        cap = np.asarray(split.caption_image)
        txt, img = encode_split(dual, split, tokenizer, progress=False)  # the first stage, as `ldot eval recall`'s
        sim = txt @ img.T
        ir_top, tr_top = np.argsort(-sim, axis=1)[:, :args.m], np.argsort(-sim.T, axis=1)[:, :args.m]
        reranker = load_reranker(args.reranker or args.out / "runs" / "rerank-seed0" / "checkpoints" / "final", store)
        rng = np.random.default_rng(1)
        n_cap, n_img, m, k = len(cap), split.num_images, args.m, args.others

        def score(captions: np.ndarray, images: np.ndarray) -> np.ndarray:
            return reranker.score_pairs([split.captions[c] for c in captions.ravel()], images.ravel()).reshape(captions.shape)

        queries = np.repeat(np.arange(n_cap), m).reshape(ir_top.shape)
        ir = parts_report(ir_top, score(queries, ir_top),
                          score(rng.integers(0, n_cap, (n_cap, m, k)), np.repeat(ir_top[..., None], k, -1)).mean(-1),
                          lambda ids: ids == cap)
        queries = np.repeat(np.arange(n_img), m).reshape(tr_top.shape)
        tr = parts_report(tr_top, score(tr_top, queries),
                          score(np.repeat(tr_top[..., None], k, -1), rng.integers(0, n_img, (n_img, m, k))).mean(-1),
                          lambda ids: cap[ids] == np.arange(n_img))
        for label, d in (("a caption's images (IR): image-only part", ir), ("an image's captions (TR): caption-only part", tr)):
            lines.append(f"| {name} | {label} | {d['r']:.2f} | {d['first']:.1f} | {d['reranked']:.1f} | "
                         f"{d['by_part']:.1f} | {d['less_part']:.1f} |")
        print(lines[-2] + "\n" + lines[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print("\n".join(lines) + f"\n\nwall time {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
