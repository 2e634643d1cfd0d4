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


#: (command, its module, its line in ``glcic-fast --help``), in that order.
COMMANDS = (
    ("bench", bench, "time the fast net against the reference on this machine"),
    ("complete", complete, "fill holes in an image or a folder of images"),
    ("export", export, "write the network to an ONNX file (ONNX Runtime, TensorRT, OpenVINO)"),
    ("serve", serve, "serve completion over HTTP, batching concurrent requests"),
    ("train", train, "train the completion network as in the paper (resumable; DDP via torchrun)"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glcic-fast", description="Fast, exact GLCIC image completion")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module, line in COMMANDS:
        p = sub.add_parser(name, help=line, description=getattr(module, "DESCRIPTION", None))
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        # One line whatever the message holds (a loader's error may span several).
        print(f"glcic-fast {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
