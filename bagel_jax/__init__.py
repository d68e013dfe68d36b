"""bagel_jax: BAGEL in JAX/Flax.

``bagel_jax.load(folder)`` returns an inference :class:`~bagel_jax.inference.api.Pipeline`
(understand / generate_image / edit_image / conversation / interleave). Heavy modules are imported lazily.
On a CPU-only JAX installation importing the package lets XLA:CPU reuse the buffers of large programs from call
to call (:func:`bagel_jax.runtime.tune_cpu_buffers`: synchronous CPU dispatch and glibc's main heap kept;
``BAGEL_JAX_CPU_MALLOC=0`` or the user's own ``MALLOC_*`` settings leave both alone). That is the only global
state it touches: the programs switch on the XLA:CPU tuning and the persistent compilation cache themselves
(:mod:`bagel_jax.runtime`).
"""

import importlib

from . import runtime as _runtime

# Before JAX's first computation, as the settings need (docs/library.md, "Process settings")
_runtime.tune_cpu_buffers()

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
