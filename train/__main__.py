"""`python -m train --config CONFIG [key=value ...]`: run a training job (under torchrun, deepspeed or srun)."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. train/configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5 data.batch_size=64")
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

    try:
        cfg = load_config(args.config, args.overrides)
        final = train(cfg)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank == "0":
        print(f"exported encoders: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
