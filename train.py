#!/usr/bin/env python
"""Train BAGEL with JAX: ``python train.py --config configs/train-tiny.yaml --data DIR --workdir RUN --steps N``.

See ``python train.py --help``, docs/training.md and :mod:`bagel_jax.train.cli` (also installed as the
``bagel-train`` command; the entry is :mod:`bagel_jax.cli.train`).
"""

import sys

from bagel_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
