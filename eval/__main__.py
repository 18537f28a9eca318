"""`ldot eval COMMAND`: recall tables, indexes, search, hard-negative mining and run comparison.

Each command lives in its own module exposing add_parser(subparsers), which sets `func`; the modules
are listed in COMMANDS. Errors the user can fix print as one line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = tuple(f"ldot.eval.{name}_cmd"
                 for name in ("recall", "index", "search", "mine", "compare", "sync", "import"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldot eval")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from ldot.errors import EXIT_BAD_INPUT, LdotError

    try:
        rc = args.func(args)
    except LdotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        rc = EXIT_BAD_INPUT
    if "torch.distributed" in sys.modules:  # recall and mine open a process group under torchrun or srun
        from ldot.distributed import close_distributed

        close_distributed()
    return rc


if __name__ == "__main__":
    sys.exit(main())
