"""The ``glcic-fast`` command line."""

import argparse
import sys


def _bench(args):
    from .bench import run

    print(run(weights=args.weights, image_path=args.image, mask_path=args.mask, repeats=args.repeats))
    return 0


def _train(args):
    from .train_cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glcic-fast", description="Fast, exact GLCIC image completion")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time the fast net against the reference on this machine")
    bench.add_argument("--weights", help="weights to load (anything glcic_fast.load reads); default: random")
    bench.add_argument("--image", help="image to complete (default: the bundled examples/astronaut.png)")
    bench.add_argument("--mask", help="mask image, white = fill (default: the bundled example's)")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per network (median is shown)")
    bench.set_defaults(func=_bench)
    from .train_cli import add_arguments as add_train_arguments

    train = sub.add_parser("train", help="train the completion network as in the paper (resumable, DDP via torchrun)")
    add_train_arguments(train)
    train.set_defaults(func=_train)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
