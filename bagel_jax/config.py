"""Frozen configuration dataclasses for BAGEL and how to build them.

Two sources:
  * an official model folder (``llm_config.json``, ``vit_config.json`` and, optionally,
    ``bagel_config.json``) with the load-time overrides of the official loader applied
    (docs/architecture.md#model; official ``app.py``): ``qk_norm=True``, ``tie_word_embeddings=False``,
    ``layer_module="Qwen2MoTDecoderLayer"``, ViT ``rope=False`` and one ViT layer fewer;
  * our YAML files (``configs/*.yaml``), which store the values *as used* (no overrides applied).

Every missing required field, and every field of the wrong type or out of range (sizes are integers >= 1,
floats finite), is reported as one line naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration file is missing, unreadable, or lacks/has a bad field."""


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Qwen2(-MoT) decoder. ``head_dim = hidden_size // num_attention_heads``."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qk_norm: bool = True
    layer_module: str = "Qwen2MoTDecoderLayer"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def use_moe(self) -> bool:
        """Official rule: a ``layer_module`` name containing "Mo" turns on the two-expert (MoT) layer."""
        return "Mo" in self.layer_module

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"llm: hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"llm: num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"llm: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.hidden_act != "silu":
            raise ConfigError(f"llm: hidden_act {self.hidden_act!r} is not supported (expected 'silu')")
        if self.layer_module not in ("Qwen2MoTDecoderLayer", "Qwen2DecoderLayer"):
            raise ConfigError(
                f"llm: layer_module {self.layer_module!r} is not supported "
                "(expected 'Qwen2MoTDecoderLayer' or 'Qwen2DecoderLayer')")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """SigLIP NaViT encoder. ``num_hidden_layers`` is the number of layers *used*
    (the official folder's ``vit_config.json`` value minus one)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    rope: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vit: hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.rope:
            raise ConfigError("vit: rope=True (2D RoPE ViT) is not supported; BAGEL-7B-MoT uses rope=False")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"vit: hidden_act {self.hidden_act!r} is not supported (expected 'gelu_pytorch_tanh')")
        if self.num_hidden_layers < 1:
            raise ConfigError(f"vit: num_hidden_layers {self.num_hidden_layers} must be >= 1")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """FLUX autoencoder (hard-coded in the official code; FLUX defaults here)."""

    resolution: int = 256
    in_channels: int = 3
    downsample: int = 8
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32
    norm_eps: float = 1e-6

    def validate(self) -> None:
        if 2 ** (len(self.ch_mult) - 1) != self.downsample:
            raise ConfigError(
                f"vae: downsample {self.downsample} does not match ch_mult {list(self.ch_mult)} "
                f"(expected 2**(len(ch_mult)-1) = {2 ** (len(self.ch_mult) - 1)})")
        for c in [self.ch * m for m in self.ch_mult]:
            if c % self.norm_groups:
                raise ConfigError(f"vae: width {c} is not divisible by norm_groups {self.norm_groups}")


@dataclasses.dataclass(frozen=True)
class BagelConfig:
    llm: LLMConfig
    vit: ViTConfig
    vae: VAEConfig
    visual_gen: bool = True
    visual_und: bool = True
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    timestep_shift: float = 1.0
    # how a generated image is laid out (bagel_jax/data/patch_ar.py): "whole" (official: one noised block
    # denoised at once) or "patch_ar" (groups of latent tokens generated one after another, each appended to
    # the context as clean tokens); patch_ar_groups: the group sizes k (latent tokens per step) a patch-AR
    # model is trained with (each training image draws one), the first is the default at inference
    image_mode: str = "whole"
    patch_ar_groups: tuple[int, ...] = (1,)

    @property
    def latent_downsample(self) -> int:
        return self.vae.downsample * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size ** 2 * self.vae.z_channels

    @property
    def max_image_side(self) -> int:
        """Largest generated image side in pixels that the latent position table covers."""
        return self.max_latent_size * self.latent_downsample

    def validate(self) -> None:
        self.llm.validate()
        self.vit.validate()
        self.vae.validate()
        D = self.llm.hidden_size
        if D % 4:
            raise ConfigError(f"llm: hidden_size {D} must be divisible by 4 for the 2D sin-cos position tables")
        if self.interpolate_pos:
            raise ConfigError("bagel: interpolate_pos=True is not supported (official 7B-MoT uses False)")
        if self.connector_act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"bagel: connector_act {self.connector_act!r} is not supported")
        if self.latent_patch_size < 1 or self.max_latent_size < 1 or self.vit_max_num_patch_per_side < 1:
            raise ConfigError("bagel: latent_patch_size, max_latent_size and vit_max_num_patch_per_side must be >= 1")
        if self.image_mode not in IMAGE_MODES:
            raise ConfigError(f"bagel: image_mode must be one of {', '.join(IMAGE_MODES)}, got {self.image_mode!r}")

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["vae"]["ch_mult"] = list(self.vae.ch_mult)
        return d

    def replace(self, **kw) -> "BagelConfig":
        return dataclasses.replace(self, **kw)


# -------------------------------------------------------------------------------------------------
# Building from dicts
# -------------------------------------------------------------------------------------------------

# Field kinds by annotation: ints are >= 1 (sizes, counts), floats finite and > 0 (eps, theta, scales) except
# the few in _ANY_SIGN; a bool is not taken for a number.
_ANY_SIGN = {"shift_factor"}


def check_field(source: str, name: str, value, kind: str):
    """``value`` of field ``name`` if it is of ``kind`` ("int": an integer >= 1; "float": a finite number,
    > 0 unless ``name`` is in ``_ANY_SIGN``; "bool"; "str"; "tuple[int, ...]": a list of integers >= 1), else
    :class:`ConfigError` naming ``source`` and the field. Returns the value (a tuple for lists)."""
    def bad(want):
        return ConfigError(f"{source}: field '{name}' must be {want}, got {value!r}")

    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        if value < 1:
            raise bad("an integer >= 1")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a finite number")
        if name not in _ANY_SIGN and not value > 0:
            raise bad("a number > 0")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
    elif kind.startswith("tuple"):
        if not isinstance(value, (list, tuple)) or not value or \
                any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
            raise bad("a non-empty list of integers >= 1")
        return tuple(value)
    return value


def _kind(cls, name: str) -> str:
    return next(str(f.type) for f in dataclasses.fields(cls) if f.name == name)


def _build(cls, data: Mapping[str, Any], source: str, renames: Mapping[str, str] | None = None):
    """Instantiate ``cls`` from ``data``; required fields must be present and every field's type and range
    right (:func:`check_field`); unknown keys are ignored."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f.name
        if renames and key in renames and renames[key] in data:
            key = renames[key]
        if key in data:
            kwargs[f.name] = check_field(source, key, data[key], str(f.type))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise ConfigError(f"{source}: missing required field '{f.name}'")
    return cls(**kwargs)


def _bagel_fields(raw: Mapping[str, Any], source: str) -> dict:
    """The top-level BagelConfig fields present in ``raw``, checked."""
    return {k: check_field(source, k, raw[k], _kind(BagelConfig, k)) for k in BAGEL_FIELDS + IMAGE_MODE_FIELDS
            if k in raw}


def check_keys(cls, d: Mapping[str, Any], section: str, error=None) -> None:
    """Raise ``error`` (default :class:`ConfigError`) if ``d`` has a key that is not a field of the
    dataclass ``cls``, naming the unknown and the known keys (``section``: e.g. "train config")."""
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - names)
    if bad:
        raise (error or ConfigError)(f"{section}: unknown key(s) {bad} (known: {sorted(names)})")


def read_json(path: str) -> dict[str, Any]:
    """A file holding one JSON object -> dict; anything else is a one-line :class:`ConfigError` naming it."""
    if not os.path.isfile(path):
        raise ConfigError(f"missing file: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, RecursionError) as e:
        raise ConfigError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


IMAGE_MODES = ("whole", "patch_ar")
# written to bagel_config.json only when the image mode is not the official one (official folders unchanged)
IMAGE_MODE_FIELDS = ("image_mode", "patch_ar_groups")

BAGEL_FIELDS = ("visual_gen", "visual_und", "latent_patch_size", "max_latent_size",
                "vit_max_num_patch_per_side", "connector_act", "interpolate_pos", "timestep_shift")

# Defaults the official loader (app / notebook) hard-codes for BAGEL-7B-MoT (official ``modeling/bagel/bagel.py``
# ``BagelConfig``, ``app.py``).
OFFICIAL_BAGEL_DEFAULTS = dict(visual_gen=True, visual_und=True, latent_patch_size=2, max_latent_size=64,
                               vit_max_num_patch_per_side=70, connector_act="gelu_pytorch_tanh",
                               interpolate_pos=False, timestep_shift=1.0)


def config_from_folder(folder: str) -> BagelConfig:
    """Build the config of an official model folder, applying the official load-time overrides."""
    if not os.path.isdir(folder):
        raise ConfigError(f"model folder not found: {folder}")
    llm_path = os.path.join(folder, "llm_config.json")
    vit_path = os.path.join(folder, "vit_config.json")
    llm_raw = read_json(llm_path)
    vit_raw = read_json(vit_path)
    # Official overrides (official ``app.py``): the json values of these three are ignored.
    llm_raw = dict(llm_raw, qk_norm=True, tie_word_embeddings=False, layer_module="Qwen2MoTDecoderLayer")
    llm = _build(LLMConfig, llm_raw, llm_path)
    if "num_hidden_layers" not in vit_raw:
        raise ConfigError(f"{vit_path}: missing required field 'num_hidden_layers'")
    n_vit = check_field(vit_path, "num_hidden_layers", vit_raw["num_hidden_layers"], "int")
    if n_vit < 2:
        raise ConfigError(f"{vit_path}: field 'num_hidden_layers' must be >= 2 (the official loader drops the "
                          f"last layer), got {n_vit}")
    vit = _build(ViTConfig, dict(vit_raw, rope=False, num_hidden_layers=n_vit - 1), vit_path)

    bagel_kw = dict(OFFICIAL_BAGEL_DEFAULTS)
    vae = VAEConfig()
    bagel_path = os.path.join(folder, "bagel_config.json")
    if os.path.isfile(bagel_path):
        raw = read_json(bagel_path)
        bagel_kw.update(_bagel_fields(raw, bagel_path))
        if "vae_config" in raw:
            if not isinstance(raw["vae_config"], Mapping):
                raise ConfigError(f"{bagel_path}: field 'vae_config' must be an object, got {raw['vae_config']!r}")
            vae = _build(VAEConfig, raw["vae_config"], bagel_path + ":vae_config")
    cfg = BagelConfig(llm=llm, vit=vit, vae=vae, **bagel_kw)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{folder}: {e}") from None
    return cfg


def config_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> BagelConfig:
    """Build from our YAML/dict layout: ``{llm: {...}, vit: {...}, vae: {...}, <bagel fields>}``."""
    for section in ("llm", "vit"):
        if section not in d or not isinstance(d[section], Mapping):
            raise ConfigError(f"{source}: missing required section '{section}'")
    llm = _build(LLMConfig, d["llm"], f"{source}:llm")
    vit = _build(ViTConfig, d["vit"], f"{source}:vit")
    vae_raw = d.get("vae", {}) or {}
    if not isinstance(vae_raw, Mapping):
        raise ConfigError(f"{source}: section 'vae' must be a mapping, got {vae_raw!r}")
    vae = _build(VAEConfig, vae_raw, f"{source}:vae")
    cfg = BagelConfig(llm=llm, vit=vit, vae=vae, **_bagel_fields(d, source))
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads exponent floats without a dot (``1e-3``, ``2E5``) as floats; plain
    YAML 1.1 reads them as strings, which would turn ``lr: 1e-3`` into a type error."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(stream) -> Any:
    """Parse YAML text or a file object with :class:`YamlLoader`."""
    return yaml.load(stream, Loader=YamlLoader)


def config_from_yaml(path: str) -> BagelConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"missing file: {path}")
    with open(path, "r", encoding="utf-8") as f:
        data = load_yaml(f)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at top level")
    model = data.get("model", data)
    return config_from_dict(model, path)


def load_config(path: str) -> BagelConfig:
    """A model folder (official layout) or one of our YAML files."""
    if os.path.isdir(path):
        return config_from_folder(path)
    if path.endswith((".yaml", ".yml")):
        return config_from_yaml(path)
    raise ConfigError(f"expected a model folder or a .yaml config, got: {path}")
