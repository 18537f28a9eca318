"""ldot: a distributed trainer for LightningDOT-style dual encoders (image-text retrieval).

One installed namespace over the repository's folders (pyproject.toml's package-dir maps them):

    ldot.data      data/      shard schema, converters, synthetic demo data, the streaming loader
    ldot.kernels   kernels/   the contrastive (CMR) loss: Triton, chunked torch, float64 reference, cross-rank
    ldot.model     model/     encoders, heads, export/load: what training and evaluation both use
    ldot.tracking  tracking/  MLflow run records, the outage journal (outbox), system metrics
    ldot.train     train/     config, objectives, DeepSpeed engine, the trainer, checkpoints, preemption
    ldot.eval      eval/      encoding, FAISS index, recall, re-ranking, search, mining, run comparison

Dependencies point one way: data and kernels know nothing of the rest; model and tracking stand
below train and eval; eval never imports train. This package itself holds what all of them share:
the error base and exit codes (ldot.errors), process-group setup (ldot.distributed), atomic file
writes (ldot.files), and the `ldot` command (ldot.cli).
"""

__version__ = "0.1.0"
