"""Low-rank adapters (LoRA) of the decoder's projections: config, the adapter tree, attach / merge, and the
adapter files (docs/lora.md).

An adapter is a params-shaped tree holding, for each adapted dense layer, ``lora_a`` ``[..., in, rank]`` and
``lora_b`` ``[..., rank, out]`` (the leading axis is the scanned layer axis, as for the kernels). The model
computes ``y = x @ W + (alpha / rank) * (x @ A) @ B`` (:class:`bagel_jax.nn.lora.LoraDense`,
``ModelOptions(lora=True)``): :func:`attach` puts the adapter's leaves beside the kernels with the scale folded
into ``B``, so the base (float or int8) is never rewritten and only the adapter is differentiated. ``B``
starts at zero (the adapted model equals the base), ``A`` uniform in ``+-1/sqrt(in)`` (PEFT's default).
:func:`merge` folds the adapter into float kernels (``W + scale * A @ B``).

Files (PEFT's layout, so the names are the official module names): ``adapter_model.safetensors`` with
``<module>.lora_A.weight`` ``[rank, in]`` and ``<module>.lora_B.weight`` ``[out, rank]`` per layer, unscaled,
e.g. ``language_model.model.layers.3.self_attn.q_proj_moe_gen.lora_A.weight``; ``adapter_config.json`` with
``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules`` and ``experts``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import quantize as quant
from .config import ConfigError, check_keys, read_json
from .convert import official
from .convert.safetensors_io import SafeTensorsFile, save_file
from .loading import BagelModel, follow_shardings
from .models.bagel import key_map, param_shapes
from .nn import layer_loop

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
EXPERTS = ("und", "gen", "both")
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_LAYERS = ("language_model", "model", "layers")
_MODULE = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
           "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """``train.lora`` of the train config and ``adapter_config.json`` of an adapter.

    rank: adapter rank (0: no LoRA, full training). alpha: the update is scaled by ``alpha / rank`` (None: alpha
    = rank, scale 1). dropout: dropout on the adapter's input in training. targets: which projections of each
    decoder layer (``q k v o`` attention, ``gate up down`` MLP). experts: ``gen`` (image generation, the usual
    choice for images), ``und`` (text and understanding) or ``both``. quantize: ``int8`` stores the frozen base's
    decoder projections in int8 (QLoRA-style, :mod:`bagel_jax.quantize`); the base is otherwise kept in the
    train compute dtype.
    """

    rank: int = 0
    alpha: Optional[float] = None
    dropout: float = 0.0
    targets: tuple = TARGETS
    experts: str = "both"
    quantize: str = "none"

    @staticmethod
    def from_dict(d: dict, what: str = "train.lora") -> "LoraConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{what}: expected a mapping (rank:, alpha:, ...), got {d!r}")
        check_keys(LoraConfig, d, what)
        d = dict(d)
        if isinstance(d.get("targets"), str):
            d["targets"] = d["targets"].replace(",", " ").split()
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        c = LoraConfig(**d)
        c.validate(what)
        return c

    def validate(self, what: str = "train.lora") -> None:
        r = self.rank
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ConfigError(f"{what}: rank must be an integer >= 0, got {r!r}")
        a = self.alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0):
            raise ConfigError(f"{what}: alpha must be a number > 0 or null, got {a!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"{what}: dropout must be in [0, 1), got {self.dropout!r}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"{what}: targets must be a non-empty list of {', '.join(TARGETS)}; got {list(self.targets)}")
        if self.experts not in EXPERTS:
            raise ConfigError(f"{what}: experts must be one of {', '.join(EXPERTS)}, got {self.experts!r}")
        if self.quantize not in quant.MODES:
            raise ConfigError(f"{what}: quantize must be one of {', '.join(quant.MODES)}, got {self.quantize!r}")

    @property
    def scale(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank) / self.rank

    def pattern(self) -> re.Pattern:
        """The ``/``-joined kernel paths this config adapts."""
        attn = [_MODULE[t] for t in self.targets if t in ("q", "k", "v", "o")]
        mlp = [_MODULE[t] for t in self.targets if t in ("gate", "up", "down")]
        sfx = {"und": "", "gen": "_moe_gen", "both": "(_moe_gen)?"}[self.experts]
        alts = [f"({'|'.join(attn)}){sfx}"] if attn else []
        alts += [f"mlp{sfx}/({'|'.join(mlp)})"] if mlp else []
        return re.compile(r"^language_model/model/layers/layer/(" + "|".join(alts) + ")/kernel$")


def target_paths(lc: LoraConfig, shapes: Any) -> list[tuple]:
    """Paths of the adapted kernels in a (scan-layout) params tree ``shapes``, sorted."""
    rx = lc.pattern()
    found = sorted(p for p in official._flatten(shapes) if rx.search("/".join(p)))
    if not found:
        raise ConfigError(f"LoRA: no decoder projection matches targets {list(lc.targets)} of experts "
                          f"{lc.experts!r} (a dense model has no gen expert)")
    return found


def init_adapter(lc: LoraConfig, shapes: Any, key: jax.Array) -> dict:
    """A fresh adapter (float32) for the kernels of ``shapes`` that ``lc`` targets: ``A`` uniform in
    ``+-1/sqrt(in)``, ``B`` zero, so the adapted model starts as the base."""
    flat = official._flatten(shapes)
    out = {}
    for i, p in enumerate(target_paths(lc, shapes)):
        *lead, n_in, n_out = flat[p].shape
        bound = 1.0 / np.sqrt(n_in)
        out[p[:-1] + ("lora_a",)] = jax.random.uniform(jax.random.fold_in(key, i), (*lead, n_in, lc.rank),
                                                       jnp.float32, -bound, bound)
        out[p[:-1] + ("lora_b",)] = jnp.zeros((*lead, lc.rank, n_out), jnp.float32)
    return official._unflatten(out)


def adapter_shapes(lc: LoraConfig, shapes: Any) -> Any:
    """``jax.ShapeDtypeStruct`` tree of :func:`init_adapter` (nothing allocated)."""
    return jax.eval_shape(lambda: init_adapter(lc, shapes, jax.random.PRNGKey(0)))


def combine(base: Any, extra: Any) -> dict:
    """The nested dict ``base`` with the leaves of ``extra`` added (no leaf may be in both)."""
    out = official._flatten(base)
    for p, v in official._flatten(extra).items():
        if p in out:
            raise ValueError(f"LoRA: {'/'.join(p)} is in the base params already")
        out[p] = v
    return official._unflatten(out)


def attach(params: Any, adapter: Any, lc: LoraConfig) -> dict:
    """``params`` with the adapter's leaves beside its kernels, ``lora_b`` scaled by ``alpha / rank`` (what
    :class:`~bagel_jax.nn.lora.LoraDense` reads). Differentiable in ``adapter``; ``params`` may hold int8 kernels."""
    scaled = jax.tree_util.tree_map_with_path(
        lambda p, x: x * lc.scale if getattr(p[-1], "key", None) == "lora_b" else x, adapter)
    return combine(params, scaled)


def merge(params: Any, adapter: Any, lc: LoraConfig) -> dict:
    """``params`` with every adapted kernel replaced by ``W + scale * A @ B`` (float32 math, the kernel's dtype)."""
    flat = official._flatten(params)
    ad = official._flatten(adapter)
    for p in sorted({p[:-1] for p in ad}):
        w = flat[p + ("kernel",)]
        if w.dtype == jnp.int8 or p + ("scale",) in flat:
            raise ValueError("LoRA merge needs a float base (load it without quantize=int8)")
        delta = jnp.einsum("...ir,...ro->...io", jnp.asarray(ad[p + ("lora_a",)], jnp.float32),
                           jnp.asarray(ad[p + ("lora_b",)], jnp.float32)) * lc.scale
        flat[p + ("kernel",)] = (jnp.asarray(w, jnp.float32) + delta).astype(w.dtype)
    return official._unflatten(flat)


# -------------------------------------------------------------------------------------------------
# Files
# -------------------------------------------------------------------------------------------------

def _module_names(cfg) -> dict[tuple, str]:
    """Path of a layer-stacked dense module -> official module name with ``{layer}`` in it."""
    out = {}
    for e in key_map(cfg):
        if e.path[:len(_LAYERS)] == _LAYERS and e.path[-1] == "kernel" and e.layer is not None:
            out[e.path[:-1]] = re.sub(r"\.layers\.\d+\.", ".layers.{layer}.", e.official[:-len(".weight")])
    return out


def save_adapter(folder: str, adapter: Any, lc: LoraConfig, cfg) -> None:
    """Write ``adapter`` (float32, unscaled) and its config under PEFT's names (module docstring)."""
    os.makedirs(folder, exist_ok=True)
    names = _module_names(cfg)
    tensors = {}
    for p, a in official._flatten(jax.device_get(adapter)).items():
        a = np.asarray(a, np.float32)
        tag = {"lora_a": "lora_A", "lora_b": "lora_B"}[p[-1]]
        for i in range(a.shape[0]):
            name = names[p[:-1]].format(layer=i)
            tensors[f"{name}.{tag}.weight"] = np.ascontiguousarray(a[i].T)   # torch Linear layout [out, in]
    save_file(tensors, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})
    conf = dict(peft_type="LORA", r=lc.rank, lora_alpha=lc.alpha if lc.alpha is not None else lc.rank,
                lora_dropout=lc.dropout, target_modules=sorted({names[p[:-1]].split("{layer}.")[1]
                                                                for p in official._flatten(adapter)}),
                targets=list(lc.targets), experts=lc.experts, base_quantize=lc.quantize, bias="none")
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(conf, f, indent=2)


def read_config(folder: str) -> LoraConfig:
    """The :class:`LoraConfig` of an adapter folder (ConfigError naming the file on anything missing or bad)."""
    path = os.path.join(folder, CONFIG_FILE)
    for f in (path, os.path.join(folder, WEIGHTS_FILE)):
        if not os.path.isfile(f):
            raise ConfigError(f"LoRA adapter: {f} not found (an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    d = read_json(path)
    if "r" not in d or "targets" not in d:
        raise ConfigError(f"{path}: expected fields r, lora_alpha, targets, experts")
    return LoraConfig.from_dict(dict(rank=d["r"], alpha=d.get("lora_alpha"), dropout=d.get("lora_dropout", 0.0),
                                     targets=d["targets"], experts=d.get("experts", "both")), path)


def load_adapter(folder: str, cfg, shapes: Any) -> tuple[dict, LoraConfig]:
    """``(adapter as float32 numpy tree, config)`` of an adapter folder, every tensor checked against the
    base params ``shapes`` (scan layout) of the model ``cfg``."""
    lc = read_config(folder)
    path = os.path.join(folder, WEIGHTS_FILE)
    f = SafeTensorsFile(path)
    names = _module_names(cfg)
    want = official._flatten(adapter_shapes(lc, shapes))
    used, out = set(), {}
    for p, s in want.items():
        tag = {"lora_a": "lora_A", "lora_b": "lora_B"}[p[-1]]
        layers = []
        for i in range(s.shape[0]):
            name = f"{names[p[:-1]].format(layer=i)}.{tag}.weight"
            if name not in f:
                raise ConfigError(f"{path}: missing tensor {name} (the adapter does not fit this model)")
            x = np.asarray(f.get(name), np.float32).T
            if x.shape != tuple(s.shape[1:]):
                raise ConfigError(f"{path}: {name} has shape {x.shape[::-1]}, this model needs {tuple(s.shape[1:])[::-1]}")
            layers.append(x)
            used.add(name)
        out[p] = np.stack(layers)
    extra = sorted(set(f.keys()) - used)
    if extra:
        raise ConfigError(f"{path}: {len(extra)} tensor(s) this config does not use, e.g. {extra[0]}")
    return official._unflatten(out), lc


def attach_folder(bm: BagelModel, folder: str) -> BagelModel:
    """``bm`` (a loaded model, float or int8) running the adapter of ``folder`` unmerged: its module with
    :class:`~bagel_jax.nn.lora.LoraDense` layers and its params with the adapter attached (:func:`attach`), in
    the params' storage dtype and placed as the model's small companion trees (:func:`follow_shardings`)."""
    unrolled = bm.model.opts.layer_loop == "unrolled"
    # adapter files hold layer stacks: read them in the scan layout, then split like the model's params
    scan_model = bm.model.clone(opts=dataclasses.replace(bm.model.opts, layer_loop="scan")) if unrolled else bm.model
    ad, lc = load_adapter(folder, bm.cfg, param_shapes(scan_model))
    ad = layer_loop.unstack(ad) if unrolled else ad
    dt = bm.model.opts.param_dtype
    sh = follow_shardings(ad, jax.tree_util.tree_map(lambda x: getattr(x, "sharding", None), bm.params))
    ad = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dt), ad) if sh is None else \
        jax.tree_util.tree_map(lambda x, s: jax.device_put(np.asarray(x, dt), s), ad, sh)
    model = bm.model.clone(opts=dataclasses.replace(bm.model.opts, lora=True))
    return dataclasses.replace(bm, model=model, params=attach(bm.params, ad, lc))
