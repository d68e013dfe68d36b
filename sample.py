#!/usr/bin/env python
"""BAGEL inference from the command line: ``python sample.py COMMAND ...`` (``--help`` lists the commands and flags;
docs/cli.md). The program is :mod:`bagel_jax.cli.sample` (also installed as the ``bagel-sample`` command)."""

import sys

from bagel_jax.cli.checks import DEMO_MODEL
from bagel_jax.cli.sample import build_parser, main

__all__ = ["DEMO_MODEL", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
