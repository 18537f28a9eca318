"""`ldot train --config CONFIG [key=value ...] [--resume auto]` (or `python -m ldot.train ...`): run a training job.

Runs under torchrun, deepspeed or srun. Exit codes of every rank: 0 done; 2 bad config or data (one-line
message); 75 preempted (SIGUSR1/SIGTERM to any rank): a checkpoint was written, run again with
--resume auto; 1 with `error: rank R: lost contact with another rank in a collective ...` when a node
or rank died or hung (after at most LDOT_DIST_TIMEOUT_S seconds, default 600). srun passes 75 on as
the step's exit code; torchrun reports it as a worker failure.

The config is read and its paths checked before torch, DeepSpeed and transformers are imported, so a
typo is reported in a fraction of a second rather than after the trainer's start-up.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ldot.errors import EXIT_BAD_INPUT, EXIT_REQUEUE, LdotError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldot train", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. train/configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5 data.batch_size=64")
    parser.add_argument("--resume", default=None,
                        help="'auto' (newest complete checkpoint in OUTPUT_DIR/checkpoints, else a fresh start), "
                             "a checkpoint tag such as step-00001000, or 'none'")
    args = parser.parse_args(argv)

    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")

    from ldot.train.config import load_config
    from ldot.train.preflight import check_paths

    try:
        cfg = load_config(args.config, args.overrides)
        check_paths(cfg)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        from ldot.train.trainer import train

        outcome, path = train(cfg, resume=args.resume)
    except LdotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if "torch.distributed" in sys.modules:  # a bad config is refused before torch is imported: nothing to close
            from ldot.distributed import close_distributed

            close_distributed()
        return EXIT_BAD_INPUT
    except Exception as exc:
        from ldot.distributed import collective_failure

        line = collective_failure(exc)
        if line is None:
            raise
        # A rank gone or hung (LDOT_DIST_TIMEOUT_S): say so in one line and leave at once; the process
        # group cannot be torn down with a peer missing (its destructor aborts or waits).
        print(f"error: rank {rank}: {line}", file=sys.stderr, flush=True)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(1)
    from ldot.distributed import close_distributed

    close_distributed()  # after the last barrier (finish, preempt), before the interpreter's teardown
    if outcome == "preempted":
        if rank == "0":
            print(f"preempted: checkpoint {path}; exit {EXIT_REQUEUE} (requeue with --resume auto)")
        return EXIT_REQUEUE
    if rank == "0":
        print(f"exported encoders: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
