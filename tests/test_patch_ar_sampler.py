"""Patch-AR sampling (bagel_jax/inference/patch_ar.py) on the KV cache equals a full recompute without a
cache in the training layout (bagel_jax/data/patch_ar.py); a batch equals its rows one at a time; the
mode is refused for a whole-image model. Runs on a copy of the demo model's folder switched to patch-AR
(the same parameters; the layout, not the quality, is under test).

Tolerances: float32; cached vs full recompute differ in attention summation order (a cache block plus
the chunk vs one softmax over the sequence), accumulated over every step of every group: 1e-4 of the
latents' scale (observed ~1e-6); batched vs single: the same programs on more rows, 1e-5.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bagel_jax
from bagel_jax.data.patch_ar import block_vectors
from bagel_jax.inference.cfg import ImageParams
from bagel_jax.inference.patch_ar import generate_images_patch_ar
from bagel_jax.models.bagel import Bagel
from bagel_jax.models.qwen2_mot import Routing
from bagel_jax.nn.attention import MaskVectors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "bagel_jax", "assets", "demo")
STEPS = 4


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo_patch_ar")
    for f in os.listdir(DEMO):
        shutil.copy(os.path.join(DEMO, f), d / f)
    bc = json.loads((d / "bagel_config.json").read_text())
    (d / "bagel_config.json").write_text(json.dumps(dict(bc, image_mode="patch_ar", patch_ar_groups=[1, 4])))
    return bagel_jax.load(str(d), dtype="float32", compilation_cache=None)


def _recompute(pipe, prompt, x0, k, sigmas):
    """Euler loops of every group by full forwards of the whole training-layout sequence (no cache):
    ``[bos, prompt, eos, soi, noisy_0, clean_0, ..., eoi]`` with the noisy group under denoising, the clean
    groups before it finished, the others placeholders their mask hides."""
    eng = pipe.engine
    model, params = eng.model, eng.params
    ids = [eng.sp.bos] + eng.tok.encode(prompt) + [eng.sp.eos]
    T, N = len(ids), x0.shape[0]
    lat_pos = np.arange(N) // 4 * eng.cfg.max_latent_size + np.arange(N) % 4      # 4x4 latent grid
    seg, vis, nblk = block_vectors(N, k, T, 1, 1)
    vec = MaskVectors(*(jnp.asarray([np.r_[a, b]], jnp.int32)
                        for a, b in ((np.ones(T), seg), (np.arange(T), vis), (np.zeros(T), nblk))))
    body = [(g, i, noisy) for g in range(N // k) for noisy in (True, False) for i in range(g * k, g * k + k)]
    positions = jnp.asarray([list(range(T)) + [T] * (2 * N + 2)], jnp.int32)
    is_gen = jnp.asarray([[False] * (T + 1) + [True] * (2 * N) + [False]])
    noisy_slot = np.array([T + 1 + j for j, (_, _, nz) in enumerate(body) if nz]).reshape(N // k, k)
    clean_slot = np.array([T + 1 + j for j, (_, _, nz) in enumerate(body) if not nz]).reshape(N // k, k)

    @jax.jit
    def velocity(lat, t_lat, g):
        emb_t = model.apply({"params": params}, jnp.asarray([ids + [eng.sp.start_of_image]]), method=Bagel.embed_text)
        emb_l = model.apply({"params": params}, lat, t_lat, jnp.asarray(lat_pos)[jnp.asarray([i for _, i, _ in body])],
                            method=Bagel.embed_latents)
        emb_e = model.apply({"params": params}, jnp.asarray([[eng.sp.end_of_image]]), method=Bagel.embed_text)
        x = jnp.concatenate([emb_t, emb_l[None], emb_e], axis=1)
        h, _ = model.apply({"params": params}, x, positions, vec, Routing.select(), is_gen, method=Bagel.decode)
        v = model.apply({"params": params}, h[0], method=Bagel.velocity)
        return v[jnp.asarray(noisy_slot)[g]]

    done = np.zeros_like(x0)
    for g in range(N // k):
        x = x0[g * k:(g + 1) * k]
        for s in range(len(sigmas) - 1):
            lat = np.zeros((2 * N, x0.shape[1]), np.float32)
            t_lat = np.zeros((2 * N,), np.float32)
            lat[clean_slot - T - 1] = done.reshape(N // k, k, -1)
            lat[noisy_slot[g] - T - 1] = x
            t_lat[noisy_slot[g] - T - 1] = sigmas[s]
            x = x - np.asarray(velocity(jnp.asarray(lat), jnp.asarray(t_lat), g)) * (sigmas[s] - sigmas[s + 1])
        done[g * k:(g + 1) * k] = x
    return done


@pytest.mark.parametrize("k", [1, 4])
def test_cached_equals_full_recompute(pipe, k):
    prompt = "a red circle on the left"
    ip = ImageParams.t2i(num_timesteps=STEPS + 1, cfg_text_scale=1.0, cfg_img_scale=1.0)
    ctx = pipe.context(1, seed=0).add_text(prompt)
    out = generate_images_patch_ar(ctx, (32, 32), ip, group=k, keys=[jax.random.PRNGKey(3)], decode=False)
    assert out["n_branches"] == 1 and out["group"] == k
    x0 = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (16, pipe.engine.cfg.patch_latent_dim)))
    want = _recompute(pipe, prompt, x0, k, np.asarray(out["sigmas"]))
    got = out["latent_tokens"][0]
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()))
    # the cache after the image: context + soi + N clean tokens + eoi
    assert int(out["cache"].length[0]) == len(ctx.text_ids([prompt])[0]) + 16 + 2


def test_batched_equals_single_with_cfg(pipe):
    prompts = ["a blue square on the right", "a green star on the top"]
    ip = ImageParams.t2i(num_timesteps=STEPS + 1)
    keys = [jax.random.PRNGKey(7), jax.random.PRNGKey(8)]
    both = generate_images_patch_ar(pipe.context(2, seed=0).add_text(prompts), (32, 32), ip, group=4, keys=keys)
    assert both["n_branches"] == 2 and both["image"].shape == (2, 32, 32, 3)
    for i, p in enumerate(prompts):
        one = generate_images_patch_ar(pipe.context(1, seed=0).add_text(p), (32, 32), ip, group=4, keys=[keys[i]])
        np.testing.assert_allclose(both["latent_tokens"][i], one["latent_tokens"][0], atol=1e-5)
        np.testing.assert_allclose(both["next_logits"][i], one["next_logits"][0], atol=1e-4)


def test_refused_for_whole_image_model_and_bad_group(pipe):
    whole = bagel_jax.load(DEMO, dtype="float32", compilation_cache=None)
    with pytest.raises(ValueError, match="not 'patch_ar'"):
        generate_images_patch_ar(whole.context(1).add_text("a red circle"), (32, 32), ImageParams.t2i(num_timesteps=3))
    with pytest.raises(ValueError, match="divide"):
        generate_images_patch_ar(pipe.context(1).add_text("a red circle"), (32, 32), ImageParams.t2i(num_timesteps=3),
                                 group=3)
