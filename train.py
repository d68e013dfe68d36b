#!/usr/bin/env python
"""Train BAGEL with JAX: ``python train.py --config configs/train-tiny.yaml --data DIR --workdir RUN --steps N``.

See ``python train.py --help`` and :mod:`bagel_jax.train.cli`.
"""

import os
import sys

from bagel_jax.train.cli import main

if __name__ == "__main__":
    code = main()
    if code == 2:
        # a setup / restore error: nothing is being written. After a failed checkpoint restore TensorStore's
        # worker threads can still post to orbax's closed event loop during interpreter teardown, printing
        # "Event loop is closed" tracebacks after the one error line; skip the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
