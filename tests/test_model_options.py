"""ModelOptions: the run options (dtypes, remat policy, attention implementation) given once and seen by
every module; one remat table; bad names fail where they are given, with the choices."""

from __future__ import annotations

import os

import jax.numpy as jnp
import pytest

from bagel_jax.config import ConfigError, load_config
from bagel_jax.loading import build_modules
from bagel_jax.nn.options import REMAT_POLICIES, ModelOptions
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


def test_train_config_validates_remat_with_the_one_table():
    for name in REMAT_POLICIES:                      # every policy the model accepts passes the config ...
        assert TrainConfig.from_dict({"remat_policy": name}).remat_policy == name
    with pytest.raises(ConfigError, match="train: remat_policy must be one of none, full, dots, dots_all; got 'bogus'"):
        TrainConfig.from_dict({"remat_policy": "bogus"})          # ... and a bad one fails there, not at build


def test_one_options_object_reaches_every_module():
    cfg = load_config(DEMO)
    model, _ = build_modules(cfg, dtype=jnp.bfloat16, remat_policy="dots_all", attention_impl="xla")
    bound = model.bind({})
    lm, vit = bound.language_model, bound.vit_model
    lm.stack  # noqa: B018  (setup runs lazily)
    want = ModelOptions(jnp.bfloat16, jnp.float32, "dots_all", "xla")
    assert model.opts == want
    for m in (lm, vit, bound.connector, bound.time_embedder):
        assert m.opts is model.opts
