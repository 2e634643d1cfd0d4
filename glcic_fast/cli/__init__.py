"""The ``glcic-fast`` command line (``python -m glcic_fast.cli``): ``complete``, ``bench``,
``export``, ``serve`` and ``train``. Commands import the heavy modules they need when they run, so that
``glcic-fast --help`` stays quick."""

from glcic_fast.cli.commands import build_parser, main

__all__ = ["main", "build_parser"]
