"""The ``glcic-fast`` parser and entry point: one module per command (complete.py,
bench.py, export.py, train.py), each with its ``add_arguments`` and ``run``. The commands
import the heavy modules they need when they run, so that ``glcic-fast --help`` stays quick.

Exit status: 0 done, 2 usage or input errors (a one-line message on stderr), 1 anything
unexpected; ``train`` adds its own (see cli/train.py).
"""

import argparse
import sys

from glcic_fast.cli import bench, complete, export, serve, train
from glcic_fast.cli.common import UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glcic-fast", description="Fast, exact GLCIC image completion")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="time the fast net against the reference on this machine")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)
    p = sub.add_parser("complete", help="fill holes in an image or a folder of images",
                       description=complete.DESCRIPTION)
    complete.add_arguments(p)
    p.set_defaults(func=complete.run)
    p = sub.add_parser("export", help="write the network to an ONNX file (ONNX Runtime, TensorRT, OpenVINO)",
                       description=export.DESCRIPTION)
    export.add_arguments(p)
    p.set_defaults(func=export.run)
    p = sub.add_parser("serve", help="serve completion over HTTP, batching concurrent requests",
                       description=serve.DESCRIPTION)
    serve.add_arguments(p)
    p.set_defaults(func=serve.run)
    p = sub.add_parser("train", help="train the completion network as in the paper (resumable; DDP via torchrun)")
    train.add_arguments(p)
    p.set_defaults(func=train.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"glcic-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
