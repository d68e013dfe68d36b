"""Loading an official folder: every failure is one clear line naming what is wrong; load -> export is the identity."""

import json
import os
import shutil

import numpy as np
import pytest

from bagel_jax.config import ConfigError, config_from_folder, load_config
from bagel_jax.convert.official import CheckpointError
from bagel_jax.convert.safetensors_io import SafeTensorsFile, load_file, save_file
from bagel_jax.loading import load_model, save_model
from bagel_jax.tokenizer import TokenizerError


@pytest.fixture()
def folder(tiny_a, tmp_path):
    """A writable copy of tiny-a's checkpoint files (no case files)."""
    dst = tmp_path / "model"
    dst.mkdir()
    for name in os.listdir(tiny_a):
        if name.endswith(".json") and name != "manifest.json" or name in (
                "ema.safetensors", "ae.safetensors", "vocab.json", "merges.txt", "tokenizer.json"):
            shutil.copy(os.path.join(tiny_a, name), dst / name)
    return str(dst)


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


def test_config_overrides_applied(tiny_a):
    cfg = config_from_folder(tiny_a)
    assert cfg.vit.num_hidden_layers == 2          # vit_config.json says 3: the official loader drops one
    assert cfg.llm.qk_norm and not cfg.llm.tie_word_embeddings and cfg.llm.use_moe
    assert cfg.vae.ch == 32 and cfg.vae.ch_mult == (1, 1, 1, 1)   # from bagel_config.json
    assert cfg.latent_downsample == 16 and cfg.patch_latent_dim == 64


def test_flux_defaults_without_bagel_config(folder):
    os.remove(os.path.join(folder, "bagel_config.json"))
    cfg = config_from_folder(folder)
    assert cfg.vae.ch == 128 and cfg.vae.ch_mult == (1, 2, 4, 4)
    assert cfg.max_latent_size == 64 and cfg.vit_max_num_patch_per_side == 70


def test_load_matches_files_and_export_is_identity(folder, tmp_path):
    m = load_model(folder)
    out = str(tmp_path / "export")
    save_model(m, out)
    for name in ("ema.safetensors", "ae.safetensors"):
        a, b = load_file(os.path.join(folder, name)), load_file(os.path.join(out, name))
        assert set(a) == set(b)
        for k in a:
            assert a[k].shape == b[k].shape, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert config_from_folder(out) == config_from_folder(folder)


@pytest.mark.parametrize("missing", ["ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json"])
def test_missing_file(folder, missing):
    os.remove(os.path.join(folder, missing))
    with pytest.raises((ConfigError, CheckpointError)) as e:
        load_model(folder)
    assert missing in one_line(e.value)


def test_missing_tokenizer(folder):
    for f in ("vocab.json", "merges.txt", "tokenizer.json"):
        os.remove(os.path.join(folder, f))
    with pytest.raises(TokenizerError) as e:
        load_model(folder)
    assert "tokenizer" in one_line(e.value)


def _rewrite_ema(folder, fn):
    path = os.path.join(folder, "ema.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def test_missing_tensor(folder):
    key = "language_model.model.layers.1.mlp_moe_gen.up_proj.weight"
    _rewrite_ema(folder, lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    msg = one_line(e.value)
    assert "missing tensor" in msg and key in msg


def test_unexpected_tensor(folder):
    _rewrite_ema(folder, lambda t: t.__setitem__("language_model.model.layers.0.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    msg = one_line(e.value)
    assert "unexpected tensor" in msg and "language_model.model.layers.0.extra.weight" in msg


def test_misshaped_tensor(folder):
    key = "connector.fc1.weight"
    _rewrite_ema(folder, lambda t: t.__setitem__(key, np.zeros((64, 31), np.float32)))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    msg = one_line(e.value)
    assert key in msg and "[64, 31]" in msg and "[64, 32]" in msg


def test_truncated_file(folder):
    path = os.path.join(folder, "ae.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(ValueError) as e:
        load_model(folder)
    assert "ae.safetensors" in one_line(e.value)


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "vocab_size"])
def test_llm_config_missing_field(folder, field):
    path = os.path.join(folder, "llm_config.json")
    d = json.load(open(path))
    d.pop(field)
    json.dump(d, open(path, "w"))
    with pytest.raises(ConfigError) as e:
        load_config(folder)
    msg = one_line(e.value)
    assert field in msg and "llm_config.json" in msg


def test_vit_config_missing_field(folder):
    path = os.path.join(folder, "vit_config.json")
    d = json.load(open(path))
    d.pop("num_hidden_layers")
    json.dump(d, open(path, "w"))
    with pytest.raises(ConfigError) as e:
        load_config(folder)
    assert "num_hidden_layers" in one_line(e.value)


def test_bad_config_values(folder):
    path = os.path.join(folder, "llm_config.json")
    d = json.load(open(path))
    d["num_key_value_heads"] = 3
    json.dump(d, open(path, "w"))
    with pytest.raises(ConfigError) as e:
        load_config(folder)
    assert "num_key_value_heads" in one_line(e.value)


def test_bfloat16_on_disk(folder):
    """A bf16 ema.safetensors (the released file's storage dtype) loads and casts to the chosen dtype."""
    import jax.numpy as jnp
    import ml_dtypes

    _rewrite_ema(folder, lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}))
    assert SafeTensorsFile(os.path.join(folder, "ema.safetensors")).dtype("connector.fc1.weight") == ml_dtypes.bfloat16
    m = load_model(folder, dtype=jnp.float32)
    w = np.asarray(m.params["connector"]["fc1"]["kernel"])
    assert w.dtype == np.float32
    m16 = load_model(folder, dtype=jnp.bfloat16)
    assert m16.params["connector"]["fc1"]["kernel"].dtype == jnp.bfloat16
