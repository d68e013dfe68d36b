"""Parity verifier: run fixture cases through bagel_jax and compare with the official outputs.

The command (``python -m bagel_jax.verify``) is described in :mod:`bagel_jax.parity.cli`.

Modules: ``cli`` (this command), ``compare``, ``common`` (the loaded fixture, layout arrays), and the
runners: ``encoders`` (vae, vit, text), ``gen_step`` (gen_single_step), ``engine_cases`` (understanding,
t2i_sampling, edit_sampling), ``train_case`` (train_forward: text, vlm, t2i and edit samples).
"""

from .cli import RUNNERS, main
from .common import CaseError, Fixture

__all__ = ["RUNNERS", "main", "CaseError", "Fixture"]
