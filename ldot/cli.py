"""The `ldot` command: `ldot data ...`, `ldot train ...`, `ldot eval ...` (each package's own command line).

Under torchrun: `torchrun ... -m ldot.train --config ...` or `torchrun ... --no-python ldot train --config ...`.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "data": ("ldot.data.__main__", "datasets: synth, convert, inspect"),
    "train": ("ldot.train.__main__", "train a dual encoder (under torchrun, deepspeed or srun)"),
    "eval": ("ldot.eval.__main__", "recall, index, search, mine, compare, sync"),
}


def usage() -> str:
    lines = ["usage: ldot {" + ",".join(COMMANDS) + "} ...", ""]
    lines += [f"  {name:<6} {what}" for name, (_, what) in COMMANDS.items()]
    lines += ["", "`ldot COMMAND --help` describes each."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from ldot import __version__

        print(f"ldot {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"ldot: unknown command {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
