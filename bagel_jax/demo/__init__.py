"""Tooling of the embedded demo model (``bagel_jax/assets/demo``), not needed to use or train BAGEL.

The synthetic shapes world and its data writer (:mod:`.synthetic`, :mod:`.tokenizer_build`), the
stages before BAGEL training (:mod:`.vae_train`, :mod:`.vit_pretrain`, :mod:`.init_folder`), and the
evaluation of the result (:mod:`.checker`, :mod:`.evaluate`, :mod:`.plot_curve`). Recipe: docs/demo-models.md.
"""
