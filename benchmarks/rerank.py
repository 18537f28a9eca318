"""Re-ranking cost beside the first stage's, in the layout of the paper's Table 7: ms per text query.

First stage: one query-encoder pass (16 tokens, batch 1) plus an exact inner-product top-M search over a
pool of N image embeddings (FAISS, as `ldot eval search`). Re-ranking: one cross-encoder forward over
the query's M candidates (M = 20 and 50, the paper's), each pair the query's 16 tokens and one image's R
regions; region features are held in memory, as a serving system keeps them (no disk reads timed).

Two sizes: demo = the demo's models (MiniLM-wide text encoder, 6 layers x 384; re-ranker 2 layers x 384;
49 regions of 1280-d, the synthetic data's EfficientNet grid) and paper = LightningDOT's (BERT-base, 12 x
768, plus encode_proj; UNITER-base re-ranker, 12 x 768; 36 regions of 2048-d, UNITER's num_bb). Weights
are random: time does not depend on them. Each figure is the median of --repeats timed passes after two
warm-up passes. Appends a "## rerank" run to RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import append_run, device  # noqa: E402
from retrieval import PAPER_MS, make_pool  # noqa: E402

SIZES = {  # hidden, heads, FFN, query-encoder layers, re-ranker layers, regions, feature dim, vocabulary
    "demo": dict(hidden=384, heads=12, ffn=1536, text_layers=6, rerank_layers=2, regions=49, feature_dim=1280,
                 vocab=30522),
    "paper": dict(hidden=768, heads=12, ffn=3072, text_layers=12, rerank_layers=12, regions=36, feature_dim=2048,
                  vocab=28996),
}
TOKENS = 16


def median_ms(fn, repeats: int, sync) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def models(size: dict, dev: str, dtype: torch.dtype):
    """(query encoder: ids, mask -> [1, hidden] unit vector on the host; the cross-encoder)."""
    from transformers import BertConfig, BertModel

    from ldot.model import CrossEncoder, ProjectionHead

    cfg = dict(vocab_size=size["vocab"], hidden_size=size["hidden"], num_attention_heads=size["heads"],
               intermediate_size=size["ffn"])
    bert = BertModel(BertConfig(**cfg, num_hidden_layers=size["text_layers"]), add_pooling_layer=False)
    bert = bert.to(dev, dtype).eval()
    proj = ProjectionHead(size["hidden"]).to(dev, dtype).eval()
    cross = CrossEncoder(BertConfig(**cfg, num_hidden_layers=size["rerank_layers"], feature_dim=size["feature_dim"]))
    cross = cross.to(dev, dtype).eval()
    for m in (bert, cross):
        m.set_attn_implementation("sdpa")

    def encode(ids, mask):
        return torch.nn.functional.normalize(proj(bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]).float(),
                                             dim=-1).cpu().numpy()

    return encode, cross


@torch.inference_mode()
def measure(name: str, size: dict, pools: list[int], ms: list[int], repeats: int, seed: int) -> list[dict]:
    from ldot.eval.index import build_exact_index, search

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.manual_seed(seed)
    encode, cross = models(size, dev, dtype)
    ids = torch.randint(1000, size["vocab"], (1, TOKENS), device=dev)
    mask = torch.ones_like(ids)
    enc_ms = median_ms(lambda: encode(ids, mask), repeats, sync)
    rerank = {}
    for m in ms:
        r, d = size["regions"], size["feature_dim"]
        args = (ids.expand(m, -1), mask.expand(m, -1), torch.randn(m, r, d, device=dev, dtype=dtype),
                torch.rand(m, r, 7, device=dev, dtype=dtype), torch.ones(m, r, dtype=torch.long, device=dev))
        rerank[m] = median_ms(lambda: cross(*args).float().cpu(), repeats, sync)
    rows = []
    for n in pools:
        pool, queries = make_pool(n, size["hidden"], 1, seed)
        index = build_exact_index(pool)
        search_ms = median_ms(lambda: search(index, queries, max(ms)), repeats, lambda: None)
        first = enc_ms + search_ms
        rows.append({"size": name, "pool": n, "encode": enc_ms, "search": search_ms, "first": first,
                     **{f"rerank{m}": rerank[m] for m in ms}})
        print(f"{name} {n:,}: encode {enc_ms:.2f} + search {search_ms:.3f} ms; "
              + ", ".join(f"re-rank top {m} {rerank[m]:.1f} ms" for m in ms), flush=True)
    return rows


def table(rows: list[dict], ms: list[int], repeats: int) -> list[str]:
    dev = f"GPU, {torch.cuda.get_device_name(0)}, bf16" if torch.cuda.is_available() else "CPU, fp32"
    head = ("| model | pool | first stage ms/q (encode + search) | "
            + " | ".join(f"re-rank top {m} ms/q" for m in ms) + " | "
            + " | ".join(f"with top {m}: total ms/q (× first stage)" for m in ms) + " | paper Table 7 first stage ms/q |")
    out = [f"Per text query at batch 1 ({dev}; median of {repeats}): the first stage against re-ranking its top M "
           f"with the cross-encoder in one forward of M pairs ({TOKENS} tokens + the image's regions each).", "",
           head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        size = SIZES[r["size"]]
        paper = PAPER_MS.get(r["pool"]) if r["size"] == "paper" else None
        out.append(f"| {r['size']} ({size['text_layers']}-layer encoder, {size['rerank_layers']}-layer re-ranker, "
                   f"{size['regions']} regions) | {r['pool']:,} | {r['encode']:.2f} + {r['search']:.3f} = {r['first']:.2f} | "
                   + " | ".join(f"{r[f'rerank{m}']:.1f}" for m in ms) + " | "
                   + " | ".join(f"{r['first'] + r[f'rerank{m}']:.1f} ({(r['first'] + r[f'rerank{m}']) / r['first']:.0f}×)"
                                for m in ms)
                   + f" | {f'{paper:.2f} (TITAN RTX, batch 400)' if paper else ''} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--pools", type=int, nargs="+", default=[1_000, 123_000])
    p.add_argument("--m", type=int, nargs="+", default=[20, 50], help="candidates re-ranked per query")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", action="append", default=[], help="a line added under the table (repeatable)")
    p.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args()
    rows = []
    for name in args.sizes:
        rows += measure(name, SIZES[name], args.pools, args.m, args.repeats, args.seed)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    notes = [f"torch threads {torch.get_num_threads()}; weights random (time does not depend on them); region "
             "features in memory; a CPU shared with other jobs makes every figure vary run to run",
             "the paper's Table 7 column is its first stage (encoding + search, TITAN RTX, queries in batches of 400) "
             "for reference; it times no re-ranker", *args.note]
    text = "\n".join([f"### {stamp} · {device()}", "", f"`python {shlex.join(['benchmarks/rerank.py', *sys.argv[1:]])}`",
                      "", *table(rows, args.m, args.repeats), "", *[f"- {n}" for n in notes]])
    print("\n" + text)
    if not args.no_record:
        append_run("rerank", text)


if __name__ == "__main__":
    main()
