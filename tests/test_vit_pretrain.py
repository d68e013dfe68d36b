"""The ViT pre-training stage of the demo recipe: per-patch targets, learning, and a Hugging Face SigLIP
file that transformers loads strictly and that init_folder / train.init load into BAGEL's ViT."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bagel_jax.config import load_config
from bagel_jax.demo import synthetic as syn
from bagel_jax.demo import vit_pretrain
from tests.train_helpers import REPO, env

CONFIG = os.path.join(REPO, "configs", "demo.yaml")


def test_labels_put_each_shape_in_the_patch_of_its_position():
    P = syn.POSITIONS
    objs = [(0, 0, P.index("left")), (1, 1, P.index("right")), (2, 2, P.index("center")), (3, 3, P.index("top"))]
    cell, shape, colour = vit_pretrain.labels(objs, grid=3, max_side=8)
    np.testing.assert_array_equal(cell, [0, 1, 2, 8, 9, 10, 16, 17, 18])
    want_shape = np.zeros(9, int)
    want_colour = np.zeros(9, int)
    for (c, s, _), k in zip(objs, (3, 5, 4, 1)):   # left = (1, 0), right = (1, 2), center = (1, 1), top = (0, 1)
        want_shape[k], want_colour[k] = s + 1, c + 1
    np.testing.assert_array_equal(shape, want_shape)
    np.testing.assert_array_equal(colour, want_colour)
    cell, shape, _ = vit_pretrain.labels([(0, 0, P.index("bottom"))], grid=4, max_side=4)   # 56-px inputs
    np.testing.assert_array_equal(cell, np.arange(16))
    assert shape.nonzero()[0].tolist() == [3 * 4 + 2]


def test_scenes_never_show_a_held_out_combination():
    rng = np.random.default_rng(0)
    for _ in range(500):
        assert not any(syn.held_out(*o) for o in syn.sample_objs(rng))


def test_learns_and_writes_a_siglip_tower_transformers_loads(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax

    from bagel_jax.loading import build_modules
    from bagel_jax.images import patchify
    from bagel_jax.models.siglip_navit import SiglipNavit
    from bagel_jax.train.init import init_from_components

    cfg = load_config(CONFIG)
    last = vit_pretrain.train(cfg, str(tmp_path), size=32, steps=150, batch=16, lr=1e-3, seed=0, log_every=50)
    with open(tmp_path / "vit_metrics.jsonl") as f:
        curve = [json.loads(line) for line in f]
    assert [r["step"] for r in curve] == [50, 100, 150]
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"]
    assert last["cell_acc"] > 0.95 and last["colour_acc"] > 0.9, last

    v = cfg.vit
    hf, info = transformers.SiglipVisionModel.from_pretrained(str(tmp_path), output_loading_info=True,
                                                             attn_implementation="eager")
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf = hf.float().eval()

    image = np.random.default_rng(1).uniform(-1, 1, (3, v.image_size, v.image_size)).astype(np.float32)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(image)[None]).last_hidden_state[0].numpy()

    # the same file through the train.init / init_folder loader into BAGEL's ViT
    model, vae = build_modules(cfg)
    params, _, _ = init_from_components({"siglip": str(tmp_path)}, cfg, model, vae, None, None, seed=0)
    g = v.image_size // v.patch_size
    tokens, pos = patchify(image, v.patch_size, g)
    out = SiglipNavit(v).apply({"params": jax.device_get(params["vit_model"])}, tokens[None], pos[None],
                               np.ones((1, g * g), np.int32))
    err = float(np.abs(np.asarray(out[0]) - ref).max())
    assert err <= 1e-4 * max(1.0, float(np.abs(ref).max())), err


def test_cli_rejects_bad_arguments(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bagel_jax.demo.vit_pretrain", "--config", CONFIG, "--out",
                        str(tmp_path / "v"), "--steps", "0"], env=env(1), capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2 and "--steps" in p.stderr, p.stderr[-1000:]
    p = subprocess.run([sys.executable, "-m", "bagel_jax.demo.vit_pretrain", "--config", str(tmp_path / "none.yaml"),
                        "--out", str(tmp_path / "v")], env=env(1), capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2 and "none.yaml" in p.stderr, p.stderr[-1000:]
