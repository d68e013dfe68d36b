"""Export the EMA weights of one saved checkpoint of a (possibly still running) training run as a model folder.

    python -m bagel_jax.demo.export_checkpoint --config CONFIG --workdir RUN --step N --init FOLDER --out DIR

``--init``: the model folder the run started from (its autoencoder, tokenizer and ``inference.json`` are
copied; train.py never trains the autoencoder). ``train.py --export`` does the same for the last step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from ..config import config_from_yaml
from ..loading import INFERENCE_DEFAULTS_FILE, load_model
from ..tokenizer import load_tokenizer
from ..train.run_checkpoint import export_ema, load_train_state


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bagel_jax.demo.export_checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the run's YAML config")
    ap.add_argument("--workdir", required=True, help="the run's --workdir")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("--init", required=True, help="model folder the run started from (tokenizer, inference.json)")
    ap.add_argument("--out", required=True, help="output model folder")
    a = ap.parse_args(argv)
    cfg = config_from_yaml(a.config)
    state = load_train_state(os.path.join(a.workdir, "checkpoints"), a.step)
    vae = load_model(a.init).vae_params   # the autoencoder is never trained by train.py
    os.makedirs(a.out, exist_ok=True)
    export_ema(state["ema"], cfg, vae, a.out, load_tokenizer(a.init))
    shutil.copyfile(os.path.join(a.init, INFERENCE_DEFAULTS_FILE), os.path.join(a.out, INFERENCE_DEFAULTS_FILE))
    print(f"exported step {int(state['step'])} of {a.workdir} to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
