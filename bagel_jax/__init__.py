"""bagel_jax: BAGEL in JAX/Flax.

``bagel_jax.load(folder)`` returns an inference :class:`~bagel_jax.inference.api.Pipeline`
(understand / generate_image / edit_image / conversation / interleave). Heavy modules are imported lazily.
Importing the package changes no global state: the programs switch on the XLA:CPU tuning and the persistent
compilation cache themselves (:mod:`bagel_jax.runtime`).
"""

import importlib

_LAZY = {
    "load": ("bagel_jax.inference.api", "load"),
    "Pipeline": ("bagel_jax.inference.api", "Pipeline"),
    "Conversation": ("bagel_jax.inference.api", "Conversation"),
    "ImageResult": ("bagel_jax.inference.api", "ImageResult"),
    "InterleaveResult": ("bagel_jax.inference.api", "InterleaveResult"),
    "Context": ("bagel_jax.inference.context", "Context"),
    "Engine": ("bagel_jax.inference.engine", "Engine"),
    "InferenceOptions": ("bagel_jax.inference.engine", "InferenceOptions"),
    "ModelOptions": ("bagel_jax.nn.options", "ModelOptions"),
    "tune_xla_cpu": ("bagel_jax.runtime", "tune_xla_cpu"),
    "tune_cpu_malloc": ("bagel_jax.runtime", "tune_cpu_malloc"),
    "use_compilation_cache": ("bagel_jax.runtime", "use_compilation_cache"),
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'bagel_jax' has no attribute {name!r}")
