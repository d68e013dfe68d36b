"""Pre-training init from separate HF-format Qwen2 / SigLIP / FLUX-AE checkpoints (copy_init_moe, llm2vae zeros)."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from bagel_jax.config import config_from_yaml
from bagel_jax.convert import keymap
from bagel_jax.convert.official import _flatten, export_params
from bagel_jax.convert.safetensors_io import save_file
from bagel_jax.loading import random_model
from bagel_jax.models import flux_vae, qwen2_mot, siglip_navit
from bagel_jax.train.init import InitError, init_from_components

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("init")
    cfg = config_from_yaml(os.path.join(REPO, "configs", "tiny.yaml"))
    src = random_model(cfg, jax.random.PRNGKey(1))  # the "pretrained" weights
    base = random_model(cfg, jax.random.PRNGKey(2))
    host = jax.tree_util.tree_map(np.asarray, src.params)
    # HF Qwen2 (dense, no q/k norm), split in two shard files like a real HF checkpoint
    dense = dataclasses.replace(cfg.llm, qk_norm=False, layer_module="Qwen2DecoderLayer")
    t = keymap.params_to_tensors(qwen2_mot.key_map(dense), host["language_model"])
    names = sorted(t)
    os.makedirs(d / "qwen2")
    save_file({k: t[k] for k in names[: len(names) // 2]}, str(d / "qwen2" / "model-00001-of-00002.safetensors"))
    save_file({k: t[k] for k in names[len(names) // 2:]}, str(d / "qwen2" / "model-00002-of-00002.safetensors"))
    # HF SigLIP: conv patch embedding, one extra layer, a pooling head and a text tower
    v = keymap.params_to_tensors(siglip_navit.key_map(cfg.vit), host["vit_model"])
    w = v.pop("embeddings.patch_embedding.weight")  # [out, p*p*3] in (py, px, c) order
    p = cfg.vit.patch_size
    v["embeddings.patch_embedding.weight"] = w.reshape(w.shape[0], p, p, 3).transpose(0, 3, 1, 2)
    n = cfg.vit.num_hidden_layers
    v[f"encoder.layers.{n}.mlp.fc1.weight"] = np.zeros((3, 3), np.float32)
    v["head.probe"] = np.zeros((1, 1, 4), np.float32)
    v = {"vision_model." + k: x for k, x in v.items()}
    v["text_model.embeddings.token_embedding.weight"] = np.zeros((4, 4), np.float32)
    save_file(v, str(d / "siglip.safetensors"))
    export_params(src.vae_params, flux_vae.key_map(cfg.vae), str(d / "ae.safetensors"))
    return d, cfg, src, base


def test_init_from_components(setup):
    d, cfg, src, base = setup
    params, vae_params, _ = init_from_components(
        dict(qwen2=str(d / "qwen2"), siglip=str(d / "siglip.safetensors"), ae=str(d / "ae.safetensors")),
        cfg, base.model, base.vae, None, None, 0, base=(base.params, base.vae_params))
    got, want, rnd = _flatten(params), _flatten(src.params), _flatten(base.params)
    for path, x in got.items():
        name = "/".join(path)
        if name.startswith("language_model"):
            und = tuple(k.replace("_moe_gen", "") for k in path)
            if "q_norm" in name or "k_norm" in name:
                np.testing.assert_array_equal(x, np.ones_like(x), err_msg=name)  # qk norms start at ones
            else:
                np.testing.assert_array_equal(x, want[und], err_msg=name)       # und loaded, gen = copy of und
        elif name.startswith("vit_model"):
            np.testing.assert_array_equal(x, want[path], err_msg=name)
        elif name.startswith("llm2vae"):
            assert not np.any(np.asarray(x))
        else:  # connector, time embedder, vae2llm, position tables: default init
            np.testing.assert_array_equal(x, rnd[path], err_msg=name)
    for path, x in _flatten(vae_params).items():
        np.testing.assert_array_equal(x, _flatten(src.vae_params)[path])


def test_init_errors(setup):
    d, cfg, _, base = setup
    with pytest.raises(InitError, match="unknown component"):
        init_from_components(dict(llama="x"), cfg, base.model, base.vae, None, None, 0,
                             base=(base.params, base.vae_params))
    with pytest.raises(InitError, match="not found"):
        init_from_components(dict(qwen2=str(d / "nope")), cfg, base.model, base.vae, None, None, 0,
                             base=(base.params, base.vae_params))


def test_init_from_model_folder_checks_shapes_not_training_shift():
    """train.init=FOLDER: the YAML's model must match the folder, except the training-only timestep_shift."""
    from bagel_jax.train.loop import init_params
    from bagel_jax.train.run_config import TrainSetupError
    from bagel_jax.train.optimizer import TrainConfig

    folder = os.path.join(REPO, "bagel_jax", "assets", "demo")
    cfg = config_from_yaml(os.path.join(REPO, "configs", "demo.yaml"))
    tc = TrainConfig(init=folder)
    params, vae_params, tok = init_params(tc, dataclasses.replace(cfg, timestep_shift=3.0), None, None, None, None)
    assert tok is not None and "language_model" in params and vae_params
    wider = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, intermediate_size=cfg.llm.intermediate_size * 2))
    with pytest.raises(TrainSetupError, match="different model config"):
        init_params(tc, wider, None, None, None, None)


def test_init_refuses_an_integer_weight(setup, tmp_path):
    """An integer tensor where a weight is expected is refused by name, never cast into garbage."""
    from bagel_jax.convert.safetensors_io import SafeTensorsError, load_file

    d, cfg, _, base = setup
    os.makedirs(tmp_path / "qwen2")
    for f in sorted(os.listdir(d / "qwen2")):
        t = load_file(str(d / "qwen2" / f))
        if f.startswith("model-00001"):
            name = sorted(t)[0]
            t[name] = t[name].astype(np.int32)
        save_file(t, str(tmp_path / "qwen2" / f))
    with pytest.raises((InitError, SafeTensorsError), match=f"'{name}' has dtype I32"):
        init_from_components(dict(qwen2=str(tmp_path / "qwen2")), cfg, base.model, base.vae, None, None, 0,
                             base=(base.params, base.vae_params))
