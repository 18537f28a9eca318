"""The paper's quality claims in miniature (issue 15, section 4): on the synthetic scenes (`ldot data synth`), the
demo's dual encoder fine-tuned alone, with FAISS-mined hard negatives, pretrained first, and re-ranked by the
cross-attention re-ranker (also ITM-trained on the pretraining scenes first: row rerank-itm); each row fine-tunes
with the same budget (steps and global batch) and is measured on the test split, whose scenes all hold a colour x
shape pair that training never shows (compositional generalization, not memory). Every row is also measured on new
scenes of the training compositions (another seed's scenes, no held-out pair: `--seen-images`), which tells a row
that fails to generalize over compositions from one that fails on new scenes of what it was trained on.

    python benchmarks/quality.py                                # the issue's four rows (finetune, hard, pretrained,
                                                                # rerank-itm): training under an hour in all on 2
                                                                # idle CPU cores, the re-ranker in amp_bf16 (RESULTS.md)
    python benchmarks/quality.py --rows rerank                  # the re-ranker without its ITM stage (the ablation)
    python benchmarks/quality.py --rows finetune hard           # some rows (a row's dependencies run too)
    python benchmarks/quality.py --seeds 0 1                    # each row once per seed (mean and spread)
    python benchmarks/quality.py --relations                    # on the relations set (out/quality-relations)
    python benchmarks/quality.py --rows finetune hard --start 'out/quality-800/runs/finetune-seed{seed}/checkpoints/final'
                                                                # both rows continue a trained model (--out elsewhere)

The relations set (`ldot data synth --relations`, data/synth.py) is the issue's richer data: two-object
scenes each beside a twin with the objects' places or colours swapped, captioned by their relation only,
so that a caption and its twin's differ only in word order: the distinctions a cross-attention re-ranker
is built for and a [CLS] dot product is not.

Every training is the real `ldot train` under torchrun (train/configs/demo.yaml plus the row's overrides) and
every number the real `ldot eval recall` (exact FAISS search). Prints a Markdown table (R@1 both ways and AR,
percent, mean over seeds; AR against the fine-tuned-only row; training seconds of all the row's stages) and
appends it, with device, date, command and wall time, to benchmarks/RESULTS.md (## quality).

A row is a function of a Context in ROWS; it may build on another row's checkpoint (ctx.train(name), trained once
an invocation), as the re-ranker row re-ranks the fine-tuned-only dual encoder's top 20. A re-ranker row prints
two lines: the re-ranker's order alone, and its score mixed with the first stage's at the weight chosen on a
validation set of new scenes (`ldot eval recall --rerank-val`), so no number in the table is tuned on a test set.
Outputs (data, runs, recall.json) stay under --out; --reuse keeps a run whose export exists.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_run, device  # noqa: E402

BIN = Path(sys.executable).parent
DEMO = ROOT / "train" / "configs" / "demo.yaml"
RERANK = ROOT / "train" / "configs" / "rerank-demo.yaml"


@dataclass
class Context:
    out: Path
    data: Path            # fine-tuning set: train/ and test/ (held-out colour x shape pairs)
    pretrain_data: Path   # the larger pretraining set (another seed; its train/ only)
    seen: Path            # new scenes of the training compositions (a third seed's train/): the second test
    val: Path             # more new scenes of the training compositions (a fourth seed's train/): where the
                          # re-ranker rows choose their mixing weight (Context.rerank_recall)
    seed: int
    steps: int            # fine-tuning steps of every row
    pretrain_steps: int
    nproc: int
    hard_negatives: int
    rerank_steps: int
    reuse: bool
    relations: bool = False  # the relations set (module doc)
    itm_steps: int = 0    # the rerank-itm row's first stage on the pretraining scenes' lists (0: rerank_steps)
    itm_lr: float | None = None  # that stage's peak learning rate (None: rerank-demo.yaml's)
    itm_lists: str = "curriculum"  # that stage's negatives: "mined" (K=2 mined + R=2 random), "random" (R=4, as UNITER's
                              # ITM) or "curriculum" (random for its first itm_random_steps, then mined)
    itm_random_steps: int = 300
    exclude_same_text: bool = True  # the hard row's hard_negatives.exclude_same_text, and `eval mine
                                    # --exclude-same-text` for the re-ranker rows' lists (--keep-same-text: neither)
    start: str | None = None  # --start for this seed: the dual-encoder export the finetune and hard rows fine-tune from
    rerank_precision: str = "amp_bf16"  # the re-ranker trainings' engine.precision (fp32: no override, as runs before)
    train_seconds: dict[str, float] = field(default_factory=dict)
    reused: set[str] = field(default_factory=set)
    mined: set[Path] = field(default_factory=set)  # mined by this invocation

    def start_from(self) -> tuple[str, ...]:
        """The finetune and hard rows' model.init_from override under --start (none without it)."""
        return (f"model.init_from={self.start}",) if self.start else ()

    def rerank_train(self, name: str, *overrides: str, steps: int, then: tuple[str, ...] = ()) -> Path:
        """A re-ranker training (rerank-demo.yaml, 2 layers, at rerank_precision): every re-ranker row's stages.
        The overrides, "rerank.layers=2" and `then` keep the order of the runs recorded before this helper, so that
        --reuse with --rerank-precision fp32 recognizes them."""
        precision = () if self.rerank_precision == "fp32" else (f"engine.precision={self.rerank_precision}",)
        return self.train(name, *overrides, "rerank.layers=2", *then, *precision, config=RERANK, steps=steps)

    def finetuned(self) -> Path:
        """The fine-tuned-only dual encoder (the finetune row, and the re-ranker rows' first stage): one run."""
        return self.train("finetune", *self.start_from())

    def train(self, name: str, *overrides: str, config: Path = DEMO, steps: int | None = None) -> Path:
        """`ldot train` (demo.yaml, or `config`, + the row's overrides) on nproc ranks; returns the export directory."""
        run = self.out / "runs" / f"{name}-seed{self.seed}"
        final = run / "checkpoints" / "final"
        if name in self.train_seconds and name not in self.reused:  # trained by this invocation (another row's stage)
            return final
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(self.nproc), "-m", "ldot.train",
               "--config", str(config), f"output_dir={run}", f"data.train={self.data / 'train'}", f"seed={self.seed}",
               f"optim.max_steps={steps or self.steps}", "tracking.system_metrics_every_s=0",
               f"tracking.experiment=quality-{name}", *overrides]
        if self.reuse and (final / "ldot.json").is_file():
            record = json.loads((run / "seconds.json").read_text())
            # a run is reused only with the settings it was trained with (runs from before they were recorded: as is)
            if record.get("settings", cmd[3:]) == cmd[3:]:
                self.train_seconds.setdefault(name, record["seconds"])
                self.reused.add(name)
                return final
            print(f"{name}: its recorded settings differ from this invocation's (e.g. other steps); training it again",
                  flush=True)
        t0 = time.perf_counter()
        log = run.parent / f"{run.name}.log"
        run.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // self.nproc))})
        if proc.returncode != 0:
            raise SystemExit(f"error: {name} failed (exit {proc.returncode}); see {log}")
        self.train_seconds[name] = time.perf_counter() - t0
        (run / "seconds.json").write_text(json.dumps({"seconds": self.train_seconds[name], "settings": cmd[3:]}))
        return final

    def mine(self, checkpoint: Path, k: int = 20, data: Path | None = None, name: str = "mined") -> Path:
        """`ldot eval mine` of an export on the training split (or `data`): the re-ranker's negatives; the output
        directory (`name` beside the export's run, suffixed when same-text matches are excluded, so that --reuse
        never takes one kind of list for the other). Excluded by default: an image that holds a caption of the query's
        very words matches the query, so as a "negative" it would ask the re-ranker to score a true match low."""
        out = checkpoint.parent.parent / (name + ("-same-text-excluded" if self.exclude_same_text else ""))
        if not ((self.reuse or out in self.mined) and (out / "mine.json").is_file()):
            cmd = [str(BIN / "ldot"), "eval", "mine", "--checkpoint", str(checkpoint), "--data",
                   str(data or self.data / "train"), "--out", str(out), "--k", str(k),
                   *(["--exclude-same-text"] if self.exclude_same_text else [])]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"error: mining with {checkpoint} failed: {proc.stderr.strip()[-2000:]}")
            self.mined.add(out)
        return out

    def recall(self, checkpoint: Path, *extra: str, tag: str = "") -> tuple[dict, dict]:
        """`ldot eval recall` of an export on the test split (held-out pairs) and on the seen-compositions
        split; the two recall.json it writes (recall-test{tag}.json, recall-seen{tag}.json beside its run)."""
        return (self._recall(checkpoint, "test", self.data / "test", tag, *extra),
                self._recall(checkpoint, "seen", self.seen, tag, *extra))

    def rerank_recall(self, first: Path, reranker: Path, tag: str) -> tuple[dict, dict]:
        """Recall of `first` with its top 20 re-ranked by `reranker`, mixed with the first stage's score at the
        weight `ldot eval recall --rerank-val` chooses on the validation scenes (never on a test set); the seen
        split is re-ranked at the weight the test split's run chose. Each recall.json holds the re-ranker's order
        alone beside the mix (rerank.recall_alone, where the weight is not 0)."""
        rerank = ["--rerank", str(reranker), "--rerank-top", "20"]
        test = self._recall(first, "test", self.data / "test", tag, *rerank, "--rerank-val", str(self.val))
        weight = test["rerank"]["weight"]
        return test, self._recall(first, "seen", self.seen, tag, *rerank, "--rerank-weight", f"{weight:g}")

    def _recall(self, checkpoint: Path, name: str, data: Path, tag: str, *extra: str) -> dict:
        path = checkpoint.parent.parent / f"recall-{name}{tag}.json"
        cmd = [str(BIN / "ldot"), "eval", "recall", "--checkpoint", str(checkpoint), "--data", str(data),
               "--out", str(path), "--no-log", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: recall of {checkpoint} on {data} failed: {proc.stderr.strip()[-2000:]}")
        return json.loads(path.read_text())


@dataclass
class Result:
    recall: dict              # the recall table's numbers (tr_r1, ir_r1, ..., ar), fractions: held-out pairs
    seen: dict                # the same on new scenes of the training compositions
    stages: tuple[str, ...]   # the trainings the row took (their seconds are added up)
    note: str = ""
    # re-ranker rows: (held-out, seen) recall with the first stage's score mixed in, and the weight (Context.rerank_recall)
    mixed: tuple[dict, dict, float] | None = None
    # re-ranker rows: their first stage's own (held-out, seen) recall, the reference when the finetune row is not run
    first: tuple[dict, dict] | None = None


def reranked(pair: tuple[dict, dict], stages: tuple[str, ...], note: str) -> Result:
    """A re-ranker row's Result from Context.rerank_recall's two recall.json: the re-ranker's order alone, and mixed."""
    alone = [r["rerank"].get("recall_alone", r["rerank"]["recall"]) for r in pair]
    return Result(alone[0], alone[1], stages, note,
                  mixed=(pair[0]["rerank"]["recall"], pair[1]["rerank"]["recall"], pair[0]["rerank"]["weight"]),
                  first=(pair[0]["recall"], pair[1]["recall"]))


def same_objects_share(data: Path, mined: Path, top: int = 5) -> float:
    """Of each caption's first `top` mined negative images, the share whose scene holds the same colour x shape
    objects on the same background as the caption's own image (on the relations set: in the same relation).
    Captions that name neither size nor position (two or three of an image's five phrasings; all of the
    relations set's) describe such an image as well as their own: a share of what mining calls hard negatives
    are matches, which the hard-negative and re-ranker losses push down."""
    from ldot.data import schema
    from ldot.data.reader import ErrorPolicy, read_shard
    from ldot.data.synth import Obj, relation

    def signature(meta: dict) -> tuple:
        scene = meta["scene"]
        objects = sorted(scene["objects"], key=lambda o: (o["color"], o["shape"]))
        # the relations set's captions name the relation too: there a match shows the same one
        how = relation(*(Obj(**o) for o in objects)) if relations else None
        return scene["background"], tuple((o["color"], o["shape"]) for o in objects), how

    scenes = {}
    manifest = schema.read_manifest(data)
    relations = manifest.extra.get("kind") == "relations"
    for path, info in zip(schema.shard_paths(data, manifest), manifest.shards):  # json members only, as EvalSplit
        for raw in read_shard(path, ErrorPolicy("error"), expected=info.samples, select_files=lambda f: f.endswith(".json")):
            meta = json.loads(raw[schema.META])
            scenes[meta["image_id"]] = signature(meta)
    same = total = 0
    with (mined / "txt2img.jsonl").open() as f:
        for line in f:
            rec = json.loads(line)
            for neg in rec["negatives"][:top]:
                same += scenes[neg] == scenes[rec["image_id"]]
                total += 1
    return same / total


def recalls(pair: tuple[dict, dict]) -> tuple[dict, dict]:
    return pair[0]["recall"], pair[1]["recall"]


# -- the rows --------------------------------------------------------------------------------------------------

def finetune_only(ctx: Context) -> Result:
    """Today's demo recipe: CMR with in-batch negatives over the global batch."""
    return Result(*recalls(ctx.recall(ctx.finetuned())), ("finetune",))


def hard_negatives(ctx: Context) -> Result:
    """The same, with K hard images per caption and K hard captions per image beside the in-batch negatives,
    re-mined by the current model at the start of every epoch after the first (the original's schedule);
    never an image holding a caption of the query's very text (unless --keep-same-text, as the original)."""
    k = ctx.hard_negatives
    # its own run name, so that both variants' runs stay under one --out
    name, extra = ("hard-same-text-excluded", ["hard_negatives.exclude_same_text=true"]) \
        if ctx.exclude_same_text else ("hard", [])
    final = ctx.train(name, f"hard_negatives.num_hard_negatives={k}", *extra, *ctx.start_from())
    return Result(*recalls(ctx.recall(final)), (name,),
                  f"K={k} a direction, drawn from the top 50, re-mined every epoch after the first"
                  f"{'; never an image holding a caption of the query text (exclude_same_text)' if extra else ''};"
                  f" a step encodes {1 + k}x the captions and images")


def pretrained_then_finetuned(ctx: Context) -> Result:
    """VMLM + SMRM (MRFR, MRC-kl) + CMR at the original's 8:4:4:16 on the larger set, then the same fine-tuning."""
    pretrained = ctx.train("pretrain", "task=pretrain", f"data.train={ctx.pretrain_data / 'train'}",
                           f"optim.max_steps={ctx.pretrain_steps}")
    final = ctx.train("pretrained-finetune", f"model.init_from={pretrained}")
    images = json.loads((ctx.pretrain_data / "train" / "manifest.json").read_text())["num_samples"]
    return Result(*recalls(ctx.recall(final)), ("pretrain", "pretrained-finetune"),
                  f"pretraining: {ctx.pretrain_steps} steps on {images} other scenes (CMR:VMLM:MRFR:MRC-kl 16:8:4:4)")


def reranked_top20(ctx: Context) -> Result:
    """The fine-tuned-only dual encoder's top 20 re-ranked by the cross-attention re-ranker (rerank-demo.yaml),
    trained on that dual encoder's negatives mined on the training split."""
    first = ctx.finetuned()
    mined = ctx.mine(first)
    reranker = ctx.rerank_train("rerank", f"rerank.mined={mined}", f"rerank.init_from={first}", steps=ctx.rerank_steps)
    pair = ctx.rerank_recall(first, reranker, tag="-rerank")
    return reranked(pair, ("finetune", "rerank"),
                  f"2-layer cross-encoder from the dual encoder's text side and region embeddings, {ctx.rerank_steps} "
                  f"steps of rerank-demo.yaml (K=2 mined + R=2 random negatives a list) in {ctx.rerank_precision}; "
                  f"re-ranking the test split's top 20 took {pair[0]['rerank']['seconds']:.0f} s; of each training "
                  f"caption's top 5 mined negatives {100 * same_objects_share(ctx.data / 'train', mined):.1f}% show "
                  f"the same colour x shape objects on the same background as its own image"
                  + (" in the same relation" if ctx.relations else "")
                  + ("; mined lists without same-text matches (eval mine --exclude-same-text)"
                     if ctx.exclude_same_text else ""))


def reranked_after_itm(ctx: Context) -> Result:
    """The re-ranker row's model, first ITM-trained on the pretraining scenes' lists (mined there by the same
    first stage), then on the fine-tuning set's as in the re-ranker row: UNITER's ITM pretraining before its
    retrieval fine-tuning, in miniature. Twice the re-ranker row's steps in all (ctx.itm_steps on the pretraining
    scenes). With itm_lists "curriculum" the ITM stage is two runs: ctx.itm_random_steps on random lists (which
    every seed learns at once), then the rest on the mined lists, started from the first's export (RESULTS.md,
    quality: mined lists alone stall on some seeds, random lists alone teach too little of what the mined
    second stage needs)."""
    first = ctx.finetuned()
    pre = ctx.pretrain_data / "train"
    total = steps = ctx.itm_steps or ctx.rerank_steps
    random_lists = ["rerank.negatives=0", "rerank.random=4"]
    mined_pre = ctx.mine(first, data=pre, name="mined-pretrain")

    def itm_run(name: str, init: Path, *lists: str, steps: int) -> Path:
        """An ITM run on the pretraining scenes (both of a curriculum's, with the same overrides in the same order,
        so that --reuse recognizes runs of before the curriculum)."""
        return ctx.rerank_train(name, f"data.train={pre}", f"rerank.mined={mined_pre}", f"rerank.init_from={init}",
                                steps=steps, then=(*([f"optim.lr={ctx.itm_lr:g}"] if ctx.itm_lr else []), *lists))

    start, stages = first, ("finetune",)
    if ctx.itm_lists == "curriculum":  # main() checked 0 < itm_random_steps < total
        start = itm_run("rerank-itm-random", first, *random_lists, steps=ctx.itm_random_steps)
        stages += ("rerank-itm-random",)
        steps -= ctx.itm_random_steps
    itm = itm_run("rerank-itm", start, *(random_lists if ctx.itm_lists == "random" else []), steps=steps)
    reranker = ctx.rerank_train("rerank-after-itm", f"rerank.mined={ctx.mine(first)}", f"rerank.init_from={itm}",
                                steps=ctx.rerank_steps)
    pair = ctx.rerank_recall(first, reranker, tag="-rerank-after-itm")
    images = json.loads((pre / "manifest.json").read_text())["num_samples"]
    lists = {"random": f"on lists of 4 random negatives (UNITER's ITM) from {images} other scenes",
             "mined": f"on lists mined from {images} other scenes by the same first stage",
             "curriculum": f"on {images} other scenes: {ctx.itm_random_steps} on lists of 4 random negatives, then "
                           f"{steps} on the lists the same first stage mined there"}[ctx.itm_lists]
    return reranked(pair, (*stages, "rerank-itm", "rerank-after-itm"),
                    f"the re-ranker row's model and recipe, {total} steps"
                    + (f" at peak lr {ctx.itm_lr:g}" if ctx.itm_lr else "") + f" {lists}"
                    + f", then {ctx.rerank_steps} on the fine-tuning set's; trained in {ctx.rerank_precision}"
                    + ("; mined lists without same-text matches" if ctx.exclude_same_text else ""))


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    run: Callable[[Context], Result]


# The table's rows, in order.
ROWS = [
    Row("finetune", "dual encoder, fine-tuned only (today's demo recipe)", finetune_only),
    Row("hard", "+ hard negatives in fine-tuning", hard_negatives),
    Row("pretrained", "pretrained (VMLM+SMRM+CMR on a larger unlabelled-style set), then fine-tuned",
        pretrained_then_finetuned),
    Row("rerank", "dual encoder + cross-attention re-ranker, top 20", reranked_top20),
    Row("rerank-itm", "dual encoder + the re-ranker ITM-trained on the pretraining scenes first, top 20",
        reranked_after_itm),
]
# The four rows (the re-ranker's as rerank-itm, the recipe under which it helps: RESULTS.md, quality)
DEFAULT_ROWS = [r.key for r in ROWS if r.key != "rerank"]


# -- data, table, main -----------------------------------------------------------------------------------------

def synth(out: Path, *args: str) -> None:
    if (out / "train" / "manifest.json").is_file():
        return
    proc = subprocess.run([str(BIN / "ldot"), "data", "synth", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: ldot data synth --out {out} failed: {proc.stderr.strip()[-2000:]}")


def pct(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * (max(values) - min(values)) / 2:.1f}"


def table(results: dict[str, list[Result]], seconds: dict[str, list[float]]) -> str:
    """One line a row (mean over seeds); a re-ranker row adds a line for its mix with the first stage's score.
    Deltas are against the finetune row, or where it was not run, against a re-ranker row's own first stage
    (the same fine-tuning, read from that row's recall files)."""
    base = results.get("finetune")
    lines = ["| row | TR R@1 | IR R@1 | AR | AR vs fine-tuned only | AR, seen pairs | vs fine-tuned only | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def line(label: str, held: list[dict], seen: list[dict], secs: list[float], refs: tuple[list, list] | None) -> str:
        def delta(values: list[dict], ref: list | None) -> str:
            if not ref:
                return ""
            return f"{100 * (statistics.fmean(v['ar'] for v in values) - statistics.fmean(r['ar'] for r in ref)):+.1f}"
        return (f"| {label} | {pct([r['tr_r1'] for r in held])} | {pct([r['ir_r1'] for r in held])} "
                f"| {pct([r['ar'] for r in held])} | {delta(held, refs and refs[0])} | {pct([r['ar'] for r in seen])} "
                f"| {delta(seen, refs and refs[1])} | {statistics.fmean(secs):.0f} |")

    for row in ROWS:
        if row.key not in results:
            continue
        rs = results[row.key]
        if row.key == "finetune":
            refs = None
        elif base is not None:
            refs = ([r.recall for r in base], [r.seen for r in base])
        elif all(r.first for r in rs):
            refs = ([r.first[0] for r in rs], [r.first[1] for r in rs])
        else:
            refs = None
        lines.append(line(row.label, [r.recall for r in rs], [r.seen for r in rs], seconds[row.key], refs))
        if all(r.mixed for r in rs):
            weights = ", ".join(f"{r.mixed[2]:g}" for r in rs)
            lines.append(line(f"{row.label}, mixed with the first stage's score (weight {weights}, chosen on the "
                              f"validation scenes)", [r.mixed[0] for r in rs], [r.mixed[1] for r in rs],
                              seconds[row.key], refs))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="data, runs and recall files (default out/quality, with --relations "
                                            "out/quality-relations)")
    p.add_argument("--relations", action="store_true", help="every set is the relations set (module doc)")
    p.add_argument("--rows", nargs="+", choices=[r.key for r in ROWS], default=DEFAULT_ROWS,
                   help=f"default: {' '.join(DEFAULT_ROWS)} (rerank, the re-ranker without its ITM stage, is the "
                        f"ablation that shows why that stage is there)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--images", type=int, default=1000, help="fine-tuning scenes (the demo's)")
    p.add_argument("--test-images", type=int, default=200)
    p.add_argument("--pretrain-images", type=int, default=3000, help="scenes of the pretraining set")
    p.add_argument("--seen-images", type=int, default=200, help="new scenes of the training compositions (second test)")
    p.add_argument("--val-images", type=int, default=200,
                   help="new scenes of the training compositions where re-ranker rows choose their mixing weight")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps of every row (the demo's)")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--hard-negatives", type=int, default=2, help="K of the hard-negative row")
    p.add_argument("--keep-same-text", action="store_true",
                   help="mine as the original does, same-text matches included: the hard row (run hard; by default "
                        "hard_negatives.exclude_same_text=true, run hard-same-text-excluded: RESULTS.md, 07:44) and "
                        "the re-ranker rows' lists (by default `eval mine --exclude-same-text`, in mined-same-text-"
                        "excluded)")
    p.add_argument("--rerank-steps", type=int, default=400, help="training steps of the re-ranker row")
    p.add_argument("--rerank-precision", choices=("amp_bf16", "fp32", "bf16"), default="amp_bf16",
                   help="engine.precision of the re-ranker trainings (amp_bf16, bf16 autocast over float32 weights: "
                        "1.5x fp32's steps a second on this CPU with AVX512-BF16, so the default rows train in under "
                        "an hour; a CPU without it may be faster in fp32. bf16, DeepSpeed's bf16 weights: its ITM "
                        "stage stalls, RESULTS.md)")
    p.add_argument("--itm-steps", type=int, default=800,
                   help="the rerank-itm row's steps on the pretraining scenes' lists (400 lost to the first stage alone, "
                        "800 on mined lists beat it on seed 0, not on seed 1; as a curriculum, on both: "
                        "RESULTS.md, quality)")
    p.add_argument("--itm-lr", type=float, help="the rerank-itm row's peak learning rate on the pretraining scenes' "
                                                "lists (default: rerank-demo.yaml's)")
    p.add_argument("--itm-lists", choices=("mined", "random", "curriculum"), default="curriculum",
                   help="the rerank-itm row's negatives on the pretraining scenes: mined by the first stage (K=2 + R=2 "
                        "random), random only (R=4, as UNITER's ITM pretraining), or random for --itm-random-steps "
                        "and then mined (the default: the one recipe whose re-ranker alone beat the first stage on both "
                        "seeds measured, RESULTS.md, quality)")
    p.add_argument("--itm-random-steps", type=int, default=300,
                   help="with --itm-lists curriculum: the ITM stage's first steps, on random lists (of --itm-steps)")
    p.add_argument("--start", help="a dual-encoder export the finetune and hard rows (and the re-ranker rows' first "
                                   "stage) fine-tune from, '{seed}' replaced by the seed: e.g. another invocation's "
                                   "trained run, to compare the rows where plain fine-tuning has flattened")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--reuse", action="store_true", help="keep runs whose export exists under --out")
    p.add_argument("--no-record", action="store_true", help="print the table only, not into RESULTS.md")
    args = p.parse_args(argv)
    itm_total = args.itm_steps or args.rerank_steps
    if "rerank-itm" in args.rows and args.itm_lists == "curriculum" and not 0 < args.itm_random_steps < itm_total:
        # refused here, before any data is made or first stage trained (exit 2)
        p.error(f"--itm-random-steps must be in (0, {itm_total}) (the ITM stage's steps), got {args.itm_random_steps}")
    starts: dict[int, str] = {}  # --start per seed
    if args.start:
        if "pretrained" in args.rows:  # that row's fine-tuning starts from its own pretraining
            p.error("--start excludes the pretrained row (its fine-tuning starts from its pretraining)")
        for seed in args.seeds:  # refused before any data is made or run trained (exit 2)
            # absolute, as the runs' cwd is the repository root, not necessarily this invocation's; replace(), not
            # format(), so that other braces in a path are kept as they are
            starts[seed] = os.path.abspath(args.start.replace("{seed}", str(seed)))
            if not (Path(starts[seed]) / "ldot.json").is_file():
                p.error(f"--start {starts[seed]}: not an ldot export (no ldot.json)")

    t0 = time.perf_counter()
    args.out = args.out or ROOT / "out" / ("quality-relations" if args.relations else "quality")
    kind = ["--relations"] if args.relations else []
    data, pretrain_data, seen = args.out / "data", args.out / "pretrain-data", args.out / "seen-data"
    val = args.out / "val-data"
    synth(data, "--images", str(args.images), "--test-images", str(args.test_images), *kind)
    # seed 2: neither the fine-tuning (0) nor the pretraining (1) scenes; its train split holds training pairs only
    synth(seen, "--images", str(args.seen_images), "--test-images", "10", "--seed", "2", *kind)
    if {"rerank", "rerank-itm"} & set(args.rows):  # seed 3: the validation scenes, again training pairs only
        synth(val, "--images", str(args.val_images), "--test-images", "10", "--seed", "3", *kind)
    if {"pretrained", "rerank-itm"} & set(args.rows):  # another seed's scenes, with class distributions for MRC-kl
        synth(pretrain_data, "--images", str(args.pretrain_images), "--test-images", "10", "--seed", "1", "--with-cls",
              *kind)
    results: dict[str, list[Result]] = {}
    seconds: dict[str, list[float]] = {}
    reused: set[str] = set()
    in_all: list[float] = []  # training seconds of all the rows together, per seed
    for seed in args.seeds:
        ctx = Context(args.out, data, pretrain_data, seen / "train", val / "train", seed, args.steps, args.pretrain_steps, args.nproc,
                      args.hard_negatives, args.rerank_steps, args.reuse, args.relations, args.itm_steps,
                      args.itm_lr, args.itm_lists, args.itm_random_steps, not args.keep_same_text, starts.get(seed),
                      args.rerank_precision)
        for row in ROWS:
            if row.key in args.rows:
                r = row.run(ctx)
                results.setdefault(row.key, []).append(r)
                seconds.setdefault(row.key, []).append(sum(ctx.train_seconds[s] for s in r.stages))
                print(f"seed {seed}: {row.label}: AR {100 * r.recall['ar']:.1f}", flush=True)
        reused |= {f"{name}-seed{seed}" for name in ctx.reused}
        in_all.append(sum(ctx.train_seconds.values()))  # each stage once, though several rows build on it
    wall = time.perf_counter() - t0
    text = table(results, seconds)
    chance = json.loads(next(iter((args.out / "runs").glob("*/recall-test.json"))).read_text())["chance"]["ar"]
    notes = [f"- {row.label}: {results[row.key][0].note}" for row in ROWS if row.key in results and results[row.key][0].note]
    notes.append(f"- each row fine-tunes {args.steps} steps of demo.yaml (global batch 32, {args.nproc} ranks) on "
                 f"{args.images} scenes" + (" of the relations set (two objects; every scene beside its twin with places "
                                            "or colours swapped; captions name the relation only)" if args.relations else "")
                 + (f", starting from {args.start}" if args.start else "")
                 + f"; test: {args.test_images} scenes with held-out colour x shape pairs; seen pairs: "
                 f"{args.seen_images} new scenes of the training pairs (seed 2); chance AR "
                 f"{100 * chance:.1f}; seeds {', '.join(map(str, args.seeds))}" + (" (mean ± half the range)"
                                                                                  if len(args.seeds) > 1 else ""))
    if {"rerank", "rerank-itm"} & set(results):
        from ldot.eval.rerank import WEIGHT_GRID

        notes.append(f"- re-ranker rows: the re-ranker's order alone, then mixed (its score + w x the first stage's "
                     f"cosine), w chosen by `ldot eval recall --rerank-val` from "
                     f"{{{', '.join(f'{w:g}' for w in WEIGHT_GRID)}}} on "
                     f"{args.val_images} more new scenes of the training pairs (seed 3), never on a test set; the seen "
                     f"pairs are re-ranked at the w the held-out run chose")
    notes.append(f"- training in all (every stage once): {statistics.fmean(in_all) / 60:.1f} min"
                 + (" a seed" if len(in_all) > 1 else ""))
    if reused:
        notes.append(f"- trained by an earlier invocation (--reuse; its seconds are in the table, not in the wall "
                     f"time): {', '.join(sorted(reused))}")
    print("\n" + text + "\n\n" + "\n".join(notes) + f"\n\nwall time {wall / 60:.1f} min")
    if not args.no_record:
        command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        append_run("quality", f"### {stamp} · {device(gpu=False)}\n\n`{command.strip()}` — wall time "
                              f"{wall / 60:.1f} min\n\n{text}\n\n" + "\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
