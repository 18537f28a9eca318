"""ldot tracking: MLflow run records that survive a tracking-server outage (an on-disk outbox sent by a
background thread), and each rank's system metrics. Knows nothing of training or evaluation."""
from ldot.tracking.outbox import OUTBOX_DIR, ensure_sweep_parent
from ldot.tracking.tracker import RUN_FILE, Tracker, git_state, resolve_tracking_uri, slurm_tags, sweep_of

__all__ = ["OUTBOX_DIR", "RUN_FILE", "Tracker", "ensure_sweep_parent", "git_state", "resolve_tracking_uri",
           "slurm_tags", "sweep_of"]
