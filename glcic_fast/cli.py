"""The ``glcic-fast`` command line."""

import argparse
import sys


def _bench(args):
    from .bench import run

    print(run(weights=args.weights, image_path=args.image, mask_path=args.mask, repeats=args.repeats))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glcic-fast", description="Fast, exact GLCIC image completion")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time the fast net against the reference on this machine")
    bench.add_argument("--weights", help="weights to load (anything glcic_fast.load reads); default: random")
    bench.add_argument("--image", help="image to complete (default: the bundled examples/astronaut.png)")
    bench.add_argument("--mask", help="mask image, white = fill (default: the bundled example's)")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per network (median is shown)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
