"""`python -m train --config CONFIG [key=value ...] [--resume auto]`: run a training job.

Runs under torchrun, deepspeed or srun. Exit codes of every rank: 0 done; 2 bad config or data (one-line
message); 75 preempted (SIGUSR1/SIGTERM to any rank): a checkpoint was written, run again with
--resume auto. srun passes 75 on as the step's exit code; torchrun reports it as a worker failure.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. train/configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5 data.batch_size=64")
    parser.add_argument("--resume", default=None,
                        help="'auto' (newest complete checkpoint in OUTPUT_DIR/checkpoints, else a fresh start), "
                             "a checkpoint tag such as step-00001000, or 'none'")
    args = parser.parse_args(argv)

    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from data import DataError
    from train.config import load_config
    from train.errors import ConfigError
    from train.loop import train
    from train.preemption import EXIT_REQUEUE

    try:
        cfg = load_config(args.config, args.overrides)
        outcome, path = train(cfg, resume=args.resume)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if outcome == "preempted":
        if rank == "0":
            print(f"preempted: checkpoint {path}; exit {EXIT_REQUEUE} (requeue with --resume auto)")
        return EXIT_REQUEUE
    if rank == "0":
        print(f"exported encoders: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
