"""Parity verifier: run fixture cases through bagel_jax and compare with the official outputs.

    python -m bagel_jax.verify --fixtures DIR [--cases a,b,...] [--save-outputs DIR] [--dtype float32|bfloat16]
                               [--attention NAME]

(``python -m bagel_jax.parity`` is the same command.) DIR is a fixture folder: a checkpoint in the
official layout, ``manifest.json`` and one ``<case>.safetensors`` per case (like
``../shared/reference/fixtures/tiny-a``). Everything is driven by the manifest: prompts, image sizes,
sample descriptions, hyperparameters and the recorded random draws. Inputs are rebuilt by our own
preprocessing, tokenizer and packing (so the layout arrays are compared too), through the functions the
engine and the trainer use; recorded noise is injected.

One line per compared array: ``case array max_abs_err ref_scale tol PASS|FAIL``; an array whose shape
differs from the reference's is a FAIL line saying both shapes (never reshaped). Tolerances: see
:mod:`bagel_jax.parity.compare`. Exit status 1 if any comparison fails or a requested case cannot be
run. With ``--dtype bfloat16`` the errors are reported (status INFO) but do not gate the exit status.

Modules: ``cli`` (this command), ``compare``, ``common`` (the loaded fixture, layout arrays), and the
runners: ``encoders`` (vae, vit, text), ``gen_step`` (gen_single_step), ``engine_cases`` (understanding,
t2i_sampling, edit_sampling), ``train_case`` (train_forward: text, vlm, t2i and edit samples).
"""

from .cli import RUNNERS, main
from .common import CaseError, Fixture

__all__ = ["RUNNERS", "main", "CaseError", "Fixture"]
