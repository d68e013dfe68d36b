#!/usr/bin/env python
"""Train BAGEL with JAX: ``python train.py --config configs/train-tiny.yaml --data DIR --workdir RUN --steps N``.

See ``python train.py --help`` and :mod:`bagel_jax.train.cli`.
"""

import sys

from bagel_jax.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
