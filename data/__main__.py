"""Command line of the data package: `ldot data {synth,inspect,convert} ...`."""

from __future__ import annotations

import argparse
import logging
import sys

from ldot.errors import EXIT_BAD_INPUT, LdotError


def _synth(args: argparse.Namespace) -> int:
    from ldot.data.synth import synth

    t = synth(args.out, images=args.images, test_images=args.test_images, seed=args.seed, with_cls=args.with_cls,
              shard_size=args.shard_size, overwrite=args.overwrite, relations=args.relations)
    print(f"synth: {args.images} train + {args.test_images} test images → {args.out}/{{train,test}} "
          f"in {t['total']:.1f}s (train {t['train']:.1f}s, test {t['test']:.1f}s)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ldot.data.validate import check_dataset

    report = check_dataset(args.dir)
    print(report.format(max_problems=args.max_problems))
    return 0 if report.ok else 1


def _convert(args: argparse.Namespace) -> int:
    from ldot.data.convert import run_convert

    return run_convert(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldot data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="render the synthetic demo set and extract its features")
    p.add_argument("--out", required=True, help="output directory; gets train/ and test/")
    p.add_argument("--images", type=int, default=1000, help="training images (default 1000)")
    p.add_argument("--test-images", type=int, default=200, help="test images, with held-out pairs (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=250, help="samples per shard")
    p.add_argument("--with-cls", action="store_true", help="also store per-region ImageNet class distributions")
    p.add_argument("--overwrite", action="store_true", help="replace datasets already in --out")
    p.add_argument("--relations", action="store_true",
                   help="the relations set: two-object scenes beside twins with places or colours swapped, captions "
                        "of the relation only (what a bag of words cannot tell apart)")
    p.set_defaults(func=_synth)

    p = sub.add_parser("inspect", help="validate every sample of a dataset directory")
    p.add_argument("dir")
    p.add_argument("--max-problems", type=int, default=20, help="problems listed in full")
    p.set_defaults(func=_inspect)

    try:
        from ldot.data.convert import add_convert_parser
    except ImportError:  # converters not built yet
        pass
    else:
        add_convert_parser(sub, _convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LdotError as err:  # bad input is the user's to fix: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
