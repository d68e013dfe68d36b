"""bagel_jax: BAGEL in JAX/Flax."""
