"""``python -m bagel_jax.verify``: the parity verifier's command (same as ``python -m bagel_jax.parity``;
the code is the :mod:`bagel_jax.parity` package)."""

import sys

from .parity.cli import main

if __name__ == "__main__":
    sys.exit(main())
