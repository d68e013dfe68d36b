"""Sharded inference: activation layout rules, and a mesh of 8 fake CPU devices giving the same image and the
same answer as one device on the embedded demo model.

The 8-device part runs this file as a script in a subprocess (the device count is fixed when JAX starts).
Tolerance of the image comparison: at most 1 uint8 level on at most 1% of the values. On a mesh the matmuls and
norms sum their partial products in another order (psum over fsdp / tensor), which moves float32 values by
~1e-7 relative; a value that lands within that distance of a rounding boundary of the final uint8 conversion
can flip by one level. Observed on this machine: identical images. Text must give identical token ids.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "bagel_jax", "assets", "demo")
PROMPTS = ["a red circle on the left", "a blue square on the right"]
STEPS = 8


def test_activation_spec_rules():
    from jax.sharding import PartitionSpec as P

    from bagel_jax import sharding as shd
    from bagel_jax.inference.kv_cache import CACHE_AXES

    mesh = dict(data=2, fsdp=2, tensor=2)
    # batch over (data, fsdp) when both divide; heads over tensor
    assert shd.activation_spec(("batch", "length", "heads", "head_dim"), (4, 7, 4, 8), mesh) == \
        P(("data", "fsdp"), None, "tensor", None)
    # batch 2: fsdp no longer divides after data took its factor of 2
    assert shd.activation_spec(("batch", "length", "embed"), (2, 16, 128), mesh) == P("data", None, None)
    # batch 1 (one pack per vmapped forward) and an odd head count stay whole
    assert shd.activation_spec(("batch", "length", "kv_heads", "head_dim"), (1, 16, 3, 8), mesh) == \
        P(None, None, None, None)
    # a mesh axis of size 1 is never named
    assert shd.activation_spec(("batch", "length", "mlp"), (8, 4, 64), dict(data=1, fsdp=8, tensor=1)) == \
        P("fsdp", None, None)
    # KV cache [layers, batch, capacity, kv_heads, head_dim]: 6 rows split over data only
    assert shd.activation_spec(CACHE_AXES, (4, 6, 256, 2, 32), mesh) == P(None, "data", None, "tensor", None)
    # the rules the models pass: ModelOptions(seq_parallel=True) splits the residual stream; the module table
    # is read-only (rules are passed, never patched in)
    from bagel_jax.nn.options import ModelOptions

    res = ("batch", "res_length", "embed")
    assert shd.activation_spec(res, (1, 16, 8), mesh, ModelOptions(seq_parallel=True).activation_rules) == \
        P(None, "tensor", None)
    assert shd.activation_spec(res, (1, 16, 8), mesh, ModelOptions().activation_rules) == P(None, None, None)
    assert shd.ACTIVATION_RULES["res_length"] is None
    with pytest.raises(TypeError):
        shd.ACTIVATION_RULES["res_length"] = "tensor"
    with pytest.raises(ValueError, match="unknown logical axes"):
        shd.with_rules(sequence="tensor")
    with pytest.raises(ValueError, match="unknown logical axis"):
        shd.activation_spec(("batch", "sequence"), (2, 2), mesh)
    with pytest.raises(ValueError, match="2 axis names"):
        shd.activation_spec(("batch", "length"), (2, 2, 2), mesh)


def test_constrain_is_identity_without_mesh():
    import jax.numpy as jnp

    from bagel_jax import sharding as shd

    x = jnp.ones((2, 4, 8))
    assert shd.constrain(x, ("batch", "length", "embed")) is x


@pytest.mark.slow
def test_mesh_inference_equals_one_device(tmp_path):
    """~3 min on 2 shared cores: the demo model on one device, on data=2,fsdp=2,tensor=2 (load(mesh=...)), on
    fsdp=4,tensor=2 through load(shardings=...) without vae_shardings (used to fail with "incompatible
    devices"), and through sample.py --mesh."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "ALL OK" in p.stdout, p.stdout[-3000:]


def _close(a: np.ndarray, b: np.ndarray, what: str) -> None:
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    print(f"{what}: max diff {d.max()}, values differing {(d > 0).mean():.4%}", flush=True)
    assert a.shape == b.shape and d.max() <= 1 and (d > 0).mean() <= 0.01, what


def _spec(x) -> tuple:
    """A NamedSharding's spec with one entry per dimension (JAX drops trailing Nones)."""
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _script(out_dir: str) -> None:
    import jax
    from jax.sharding import NamedSharding
    from PIL import Image

    import bagel_jax
    import sample
    from bagel_jax import sharding as shd
    from bagel_jax.inference.decode import generate_text
    from bagel_jax.models.bagel import param_shapes

    assert jax.device_count() == 8
    one = bagel_jax.load(DEMO, dtype="float32")
    many = bagel_jax.load(DEMO, dtype="float32", mesh="data=2,fsdp=2,tensor=2")
    assert one.engine.mesh is None and dict(many.engine.mesh.shape) == dict(data=2, fsdp=2, tensor=2)
    q = many.engine.params["language_model"]["model"]["layers"]["layer"]["q_proj"]["kernel"]
    assert _spec(q) == (None, "fsdp", "tensor"), q.sharding
    vae_leaf = jax.tree_util.tree_leaves(many.engine.vae_params)[0]
    assert vae_leaf.sharding.mesh == many.engine.mesh and _spec(vae_leaf) == (None,) * vae_leaf.ndim

    # text-to-image, 2 prompts: 2 CFG branches x 2 rows = a 4-row cache split over data x fsdp
    ref = one.generate_image(PROMPTS, num_timesteps=STEPS)
    got = many.generate_image(PROMPTS, num_timesteps=STEPS)
    _close(ref.arrays, got.arrays, "t2i data=2,fsdp=2,tensor=2")

    # understanding: the same token ids; the cache split over kv heads (2 kv heads / tensor 2)
    def answer(pipe):
        ctx = pipe.context(1, track_cfg=False).add_image(ref.images[0], vae=False, vit=True)
        ctx = ctx.add_text("what colour is the shape?")
        return ctx, generate_text(ctx, 24).token_ids[0]

    _, ids1 = answer(one)
    ctx, ids8 = answer(many)
    print("answer ids", ids1.tolist(), ids8.tolist(), flush=True)
    assert ids1.tolist() == ids8.tolist() and len(ids1) > 1
    assert _spec(ctx.gen.cache.k) == (None, None, None, "tensor", None), ctx.gen.cache.k.sharding
    ctx2 = many.context(2).add_text(PROMPTS)
    assert _spec(ctx2.gen.cache.k) == (None, "data", None, "tensor", None), ctx2.gen.cache.k.sharding

    # load(shardings=...) alone: the VAE follows the model's mesh
    mesh = shd.make_mesh(fsdp=4, tensor=2)
    sh = shd.tree_shardings(param_shapes(many.engine.model), mesh)   # the stacked layout of the files
    third = bagel_jax.load(DEMO, dtype="float32", shardings=sh)
    assert third.engine.mesh == mesh
    vae_leaf = jax.tree_util.tree_leaves(third.engine.vae_params)[0]
    assert isinstance(vae_leaf.sharding, NamedSharding) and vae_leaf.sharding.mesh == mesh
    _close(ref.arrays, third.generate_image(PROMPTS, num_timesteps=STEPS).arrays, "t2i shardings= fsdp=4,tensor=2")

    # an Engine given a mesh for params on one device moves them onto it (a model loaded with the scan layout:
    # the engine runs the model as it is given)
    from bagel_jax.inference.api import Pipeline
    from bagel_jax.inference.engine import Engine
    from bagel_jax.loading import load_model

    moved = Pipeline(Engine(load_model(DEMO), one.engine.options, mesh=mesh))
    assert _spec(moved.engine.params["language_model"]["model"]["layers"]["layer"]["q_proj"]["kernel"]) == \
        (None, "fsdp", "tensor")
    assert jax.tree_util.tree_leaves(moved.engine.vae_params)[0].sharding.mesh == mesh
    assert _spec(moved.context(1).add_text("hello").gen.cache.k) == (None, None, None, "tensor", None)

    # sample.py --mesh (prompt 0 alone with seed 0 = row 0 of the batch)
    rc = sample.main(["generate", "--prompt", PROMPTS[0], "--num-timesteps", str(STEPS), "--mesh", "fsdp=4,tensor=2",
                      "--out", out_dir, "--compilation-cache", "", "--no-progress", "--dtype", "float32"])
    assert rc == 0
    pngs = sorted(f for f in os.listdir(out_dir) if f.endswith(".png"))
    assert len(pngs) == 1, pngs
    _close(ref.arrays[0], np.asarray(Image.open(os.path.join(out_dir, pngs[0])).convert("RGB")), "sample.py --mesh")
    rc = sample.main(["understand", "--question", "x", "--mesh", "data=3", "--out", out_dir, "--no-progress",
                      "--compilation-cache", ""])
    assert rc == 2   # 3 devices asked, 8 present: a clear error, not a crash
    print("ALL OK", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    _script(sys.argv[1])
