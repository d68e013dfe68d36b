"""The one way intermediate values leave the models: Flax ``sow`` into the ``"intermediates"`` collection.

Modules always sow what a parity check or a user may want to look at (``self.sow(COLLECTION, name, x)``)
and always return the same thing; sowing is free unless the caller asks for the collection. Inside a
scanned layer stack the sown value is stacked on a leading layer axis. Names are unique across the
Bagel model and the autoencoder, so the collection flattens to ``{name: value}`` (a sown name must also
differ from the sowing module's submodule names: Flax keeps both in one scope, hence ``vae2llm_out``):

==========================  ===================================================================
``hidden``                   decoder: every layer's output ``[layers, batch, seq, hidden]``
``vit_embeddings``           ViT: patch + position embeddings ``[B, N, D_vit]``
``vit_layers``               ViT: every layer's output ``[layers, B, N, D_vit]``
``vit_output``               ViT: after ``post_layernorm`` ``[B, N, D_vit]``
``connector_output``         connector output ``[B, N, D]`` (before ``vit_pos_embed``)
``vae2llm_out`` / ``time_embedding`` / ``latent_pos_embed_out``   the terms of a latent token's embedding
``encoder_mid_out``          VAE encoder after its mid block
``decoder_conv_in_out`` / ``decoder_mid_out``    VAE decoder after ``conv_in`` / its mid block
==========================  ===================================================================
"""

from __future__ import annotations

from typing import Any

COLLECTION = "intermediates"


def flatten(tree: Any) -> dict[str, Any]:
    """``{name: value}`` of a sown collection (nested by module path; each value the last sown)."""
    out: dict[str, Any] = {}

    def walk(node):
        for k, v in node.items():
            if isinstance(v, tuple):            # sow appends to a tuple: (value,) per call
                if k in out:
                    raise ValueError(f"intermediate {k!r} is sown in two places")
                out[k] = v[-1]
            elif hasattr(v, "items"):
                walk(v)

    walk(tree)
    return out


def apply(module, variables, *args, method=None, collect: bool = True, **kwargs) -> tuple[Any, dict[str, Any]]:
    """``module.apply`` returning ``(out, intermediates)``: ``{name: value}`` of everything sown during
    the call when ``collect``, else ``{}`` (and nothing is kept). The return type never changes."""
    if not collect:
        return module.apply(variables, *args, method=method, **kwargs), {}
    out, state = module.apply(variables, *args, method=method, mutable=[COLLECTION], **kwargs)
    return out, flatten(state.get(COLLECTION, {}))
