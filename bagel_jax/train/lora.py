"""LoRA training (``train.lora.rank > 0``; docs/lora.md): a frozen base, only the adapters trained.

What changes against full training (:mod:`.loop`): the train state's ``params`` (and its EMA and AdamW moments)
is the adapter tree of :func:`bagel_jax.lora.init_adapter`, float32; the base params are an input of the step
beside the VAE's (never donated, never in a checkpoint), stored in the compute dtype or, with
``train.lora.quantize: int8``, with int8 decoder projections. The loss is the full-training loss
(:func:`.step.make_loss_fn`) of the base with the adapter attached (:func:`bagel_jax.lora.attach`), the base
under ``stop_gradient``; gradients are taken with respect to the adapter only. ``--export`` writes the EMA
adapter as an adapter folder (:func:`bagel_jax.lora.save_adapter`); ``python -m bagel_jax.cli.merge_lora``
folds it into an official folder.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax

from .. import lora as L
from .. import quantize as quant
from .. import sharding as shd
from ..config import load_config
from ..loading import load_model
from ..nn.options import as_dtype
from . import optimizer as O
from . import step as S
from .run_config import TrainSetupError, check_init_config


@dataclasses.dataclass
class LoraRun:
    """The LoRA side of a run (``RunSetup.lora``)."""

    lc: L.LoraConfig
    base_shapes: Any          # float32 shapes of the base params (the model's init)
    base_sh: Any              # their shardings

    def load_base(self, su, init_params: Callable) -> tuple[Any, Any]:
        """``(frozen base, VAE params)`` from ``train.init``. A model folder is read in the base's storage
        dtype and quantized while it is read (:func:`bagel_jax.loading.load_model`), so the float32 tree never
        exists; a random or component init is built in float32 (``init_params``, :mod:`.loop`) and converted."""
        tc, dt = su.tc, as_dtype(su.tc.compute_dtype)
        if isinstance(tc.init, str) and tc.init != "random":
            if not os.path.isdir(tc.init):
                raise TrainSetupError(f"train.init: model folder not found: {tc.init}")
            check_init_config(load_config(tc.init), su.cfg, tc.init)
            bm = load_model(tc.init, dtype=dt, param_dtype=dt, shardings=self.base_sh, vae_shardings=su.vsh,
                            with_tokenizer=False, quantize=self.lc.quantize)
            return bm.params, bm.vae_params
        params, vae_params, _ = init_params(tc, su.cfg, su.model, su.vae, self.base_sh, su.vsh)
        params = quant.cast_floats(params, dt)
        return quant.quantize_params(params, self.lc.quantize, consume=True), vae_params

    def init_adapter(self, seed: int, shardings) -> Any:
        """A fresh adapter (``B`` zero) on ``shardings``."""
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x10A)
        return jax.jit(lambda k: L.init_adapter(self.lc, self.base_shapes, k), out_shardings=shardings)(key)

    def loss_fn(self, su, special: dict) -> Callable:
        """:func:`make_loss_fn` of this run."""
        return make_loss_fn(su.model, su.vae, su.tc, self.lc, special, S.resolve_layer_loop(su.tc, su.ssh["params"]))

    def export(self, ema: Any, su, out: str) -> None:
        L.save_adapter(out, ema, self.lc, su.cfg)
        print(f"[train] exported the EMA LoRA adapter to {out} (merge: python -m bagel_jax.cli.merge_lora)", flush=True)


def lora_model(model, lc: L.LoraConfig):
    """``model`` with :class:`~bagel_jax.nn.lora.LoraDense` layers (and int8 ones for an int8 base)."""
    return model.clone(opts=dataclasses.replace(model.opts, lora=True, lora_dropout=float(lc.dropout),
                                                quantize=lc.quantize))


def make_loss_fn(model, vae, tc, lc: L.LoraConfig, special: dict, loop: str = "scan") -> Callable:
    """``(adapter, (vae_params, base), micro, key, expert_split) -> (loss, aux)`` for
    :func:`.step.make_train_step`: the full-training loss (:func:`.step.make_loss_fn`) of the base with the
    adapter attached, the base leaves under ``stop_gradient``. ``model``: :func:`lora_model`."""

    def loss_fn(adapter, frozen, micro, key, expert_split=None):
        vae_params, base = frozen
        params = L.attach(base, adapter, lc)
        mask = L.combine(jax.tree_util.tree_map(lambda _: False, base),
                         jax.tree_util.tree_map(lambda _: True, adapter))
        return S.make_loss_fn(model, vae, tc, mask, special, loop)(params, vae_params, micro, key, expert_split)

    return loss_fn


def setup(su, steps: int):
    """``su`` (:class:`.loop.RunSetup` of the full model) turned into the LoRA run's: the model with
    :class:`~bagel_jax.nn.lora.LoraDense` layers, the adapter's shapes, mask, optimiser and train state."""
    tc, lc = su.tc, su.tc.lora
    if tc.trainable != "all":   # freeze_* may stay (the base is frozen anyway; freeze_und still detaches und tokens)
        raise TrainSetupError("train.lora trains the adapters only: train.trainable must be 'all'")
    model = lora_model(su.model, lc)
    shapes = L.adapter_shapes(lc, su.shapes)
    mask = jax.tree_util.tree_map(lambda _: True, shapes)
    opt = O.make_optimizer(tc, mask, steps)
    abstract = S.abstract_state(shapes, opt, tc.seed)
    run = LoraRun(lc, su.shapes, shd.tree_shardings(su.shapes, su.mesh))
    print(f"[train] LoRA rank {lc.rank} (alpha {lc.alpha or lc.rank}) on {','.join(lc.targets)} of the "
          f"{lc.experts} expert(s): {O.count_params(shapes) / 1e6:.3f}M adapter parameters on a frozen "
          f"{O.count_params(su.shapes) / 1e6:.1f}M-parameter base ({'int8' if lc.quantize == 'int8' else tc.compute_dtype})",
          flush=True)
    return dataclasses.replace(su, model=model, shapes=shapes, mask=mask, opt=opt, abstract=abstract,
                               ssh=S.state_shardings(abstract, su.mesh), lora=run)


def jit_step(su, special: dict, base):
    """The jitted LoRA train step, called as the full one: ``call(state, batch, vae_params, expert_split)``
    (:func:`.step.jit_train_step`); it hands ``(vae_params, base)`` to the step, the base on the placement it
    was loaded with."""
    base_sh = jax.tree_util.tree_map(lambda x: x.sharding, base)
    fn = S.make_train_step(su.model, su.vae, su.tc, su.mask, su.opt, su.schedule, special, su.ssh["params"],
                           loss_fn=su.lora.loss_fn(su, special))
    inner = S.jit_train_step(fn, su.ssh, su.mesh, (su.vsh, base_sh))

    def call(state, batch, vae_params, expert_split=None):
        return inner(state, batch, (vae_params, base), expert_split)

    call.cache = inner.cache
    return call

