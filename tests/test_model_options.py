"""ModelOptions: the run options (dtypes, remat policy, attention implementation, layer loop, quantization,
sequence parallelism) given once and seen by every module; the trainer's config makes the same object; one remat
table; bad names fail where they are given, with the choices."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest

from bagel_jax.config import ConfigError, load_config
from bagel_jax.loading import build_modules
from bagel_jax.nn.options import REMAT_POLICIES, ModelOptions, options_with
from bagel_jax.train.optimizer import TrainConfig

DEMO = os.path.join(os.path.dirname(__file__), "..", "bagel_jax", "assets", "demo")


def test_options_validate_and_normalise():
    o = ModelOptions("bfloat16", jnp.float32, "dots", "blocked")
    assert o.dtype == jnp.bfloat16 and o.param_dtype == jnp.float32
    assert o == ModelOptions(jnp.bfloat16, "float32", "dots", "blocked")        # same options, same hash
    assert hash(o) == hash(ModelOptions(jnp.bfloat16, "float32", "dots", "blocked"))
    assert ModelOptions(attention_impl=None).attention_impl == "auto"
    with pytest.raises(ValueError, match="unknown remat policy 'dots_everything'; choose one of none, full, dots"):
        ModelOptions(remat_policy="dots_everything")
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        ModelOptions(attention_impl="flash")
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="auto_blocked_min_len must be None or an integer >= 0"):
            ModelOptions(auto_blocked_min_len=bad)


def test_options_fields_dtypes_and_the_keyword_conveniences():
    assert ModelOptions("bf16").param_dtype == jnp.bfloat16            # param_dtype follows dtype unless given
    assert ModelOptions("bfloat16", "fp32").param_dtype == jnp.float32
    with pytest.raises(ValueError, match="unknown dtype 'float16'; choose one of float32, fp32, bfloat16, bf16"):
        ModelOptions("float16")
    with pytest.raises(ValueError, match="quantize_vit=True needs quantize='int8'"):
        ModelOptions(quantize_vit=True)
    assert options_with(dtype="bfloat16", quantize="int8") == ModelOptions("bfloat16", quantize="int8")
    base = ModelOptions("bfloat16", "float32", "dots")
    assert options_with(base) is base
    assert options_with(base, attention_impl="xla") == ModelOptions("bfloat16", "float32", "dots", "xla")
    with pytest.raises(TypeError, match="unknown model option.*'vae_transform'.*fields: dtype, param_dtype"):
        options_with(vae_transform=None)
    with pytest.raises(TypeError, match="options must be a ModelOptions"):
        options_with("bfloat16")
    # "auto" layer loop: resolved by build_modules for the mesh (one CPU device: unrolled), so modules never see it
    auto = ModelOptions(layer_loop="auto")
    assert auto.resolve().layer_loop == ("unrolled" if jax.default_backend() == "cpu" else "scan")
    assert ModelOptions().resolve() == ModelOptions()
    assert build_modules(load_config(DEMO), auto)[0].opts == auto.resolve()


def test_train_config_checks_its_model_options_in_one_place():
    for name in REMAT_POLICIES:                      # every policy the model accepts passes the config ...
        assert TrainConfig.from_dict({"remat_policy": name}).model_options.remat_policy == name
    with pytest.raises(ConfigError, match="train: unknown remat policy 'bogus'; choose one of none, full, dots, dots_all"):
        TrainConfig.from_dict({"remat_policy": "bogus"})          # ... and a bad one fails there, not at build
    with pytest.raises(ConfigError, match="train: unknown attention implementation 'flash'"):
        TrainConfig.from_dict({"attention_impl": "flash"})
    with pytest.raises(ConfigError, match="train: unknown dtype 'float16'"):
        TrainConfig.from_dict({"compute_dtype": "float16"})
    with pytest.raises(ConfigError, match="train: seq_parallel must be True or False"):
        TrainConfig.from_dict({"seq_parallel": 1})
    tc = TrainConfig.from_dict({"compute_dtype": "bfloat16", "remat_policy": "full", "freeze_und": True,
                                "seq_parallel": True, "attention_impl": "xla"})
    assert tc.model_options == ModelOptions("bfloat16", "float32", "full", "xla", freeze_und=True, seq_parallel=True)
    assert tc.model_options.activation_rules["res_length"] == "tensor"   # what the trainer's modules pass


def test_one_options_object_reaches_every_module():
    cfg = load_config(DEMO)
    model, _ = build_modules(cfg, ModelOptions(jnp.bfloat16, jnp.float32, "dots_all", "xla"))
    bound = model.bind({})
    lm, vit = bound.language_model, bound.vit_model
    lm.stack  # noqa: B018  (setup runs lazily)
    want = ModelOptions(jnp.bfloat16, jnp.float32, "dots_all", "xla")
    assert model.opts == want
    for m in (lm, vit, bound.connector, bound.time_embedder):
        assert m.opts is model.opts
