"""Verifier runners for the engine cases (``understanding``, ``t2i_sampling``, ``edit_sampling``).

Each runner goes through the engine: :class:`~bagel_jax.inference.context.Context` for the contexts,
:func:`~bagel_jax.inference.decode.generate_text` (the ``while_loop``) for decoding and
:func:`~bagel_jax.inference.sampler.generate_images` (the ``scan``) for sampling, injecting the recorded
noise. Everything else (prompts, sizes, hyperparameters, transforms) comes from the manifest.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from ..data.images import INFERENCE_VAE, INFERENCE_VIT
from ..models.bagel import Bagel
from . import blocks
from .context import Context, Engine, GEN_THINK_SYSTEM_PROMPT
from .decode import SamplingParams, generate_text
from .sampler import ImageParams, generate_images

_ENGINES: dict = {}


def _engine(vctx, params: dict) -> Engine:
    tv = vctx.transform(params, "vae_transform") or INFERENCE_VAE
    tt = vctx.transform(params, "vit_transform") or INFERENCE_VIT
    key = (id(vctx), tv, tt)
    if key not in _ENGINES:
        _ENGINES[key] = Engine(vctx.bm, tv, tt)
    return _ENGINES[key]


def _param(P: dict, prefix: str, default=None):
    for k, v in P.items():
        if k == prefix or k.startswith(prefix + " ") or k.startswith(prefix + "("):
            return v
    return default


def _text_layout(prefix: str, ids, kv_before: int, rope_before: int) -> dict:
    n = len(ids)
    return {f"{prefix}.text_token_lens": np.array([n]), f"{prefix}.packed_text_ids": np.asarray(ids),
            f"{prefix}.packed_text_position_ids": np.arange(rope_before, rope_before + n),
            f"{prefix}.packed_text_indexes": np.arange(kv_before, kv_before + n),
            f"{prefix}.packed_key_value_indexes": np.arange(kv_before),
            f"{prefix}.key_values_lens": np.array([kv_before]), f"{prefix}.newlens": np.array([kv_before + n]),
            f"{prefix}.new_rope": np.array([rope_before + n])}


def _image_layout(prefix: str, n: int, kv_before: int, rope: int, sp, kind: str, pos) -> dict:
    out = {f"{prefix}.packed_text_ids": np.array([sp.start_of_image, sp.end_of_image]),
           f"{prefix}.packed_text_indexes": np.array([0, n + 1]),   # relative to the chunk
           f"{prefix}.packed_position_ids": np.full(n + 2, rope), f"{prefix}.packed_seqlens": np.array([n + 2]),
           f"{prefix}.packed_indexes": np.arange(kv_before, kv_before + n + 2),
           f"{prefix}.packed_key_value_indexes": np.arange(kv_before),
           f"{prefix}.key_values_lens": np.array([kv_before]), f"{prefix}.newlens": np.array([kv_before + n + 2]),
           f"{prefix}.new_rope": np.array([rope + 1])}
    if kind == "vit":
        out[f"{prefix}.vit_token_seqlens"] = np.array([n])
        out[f"{prefix}.packed_vit_position_ids"] = np.asarray(pos)
        out[f"{prefix}.packed_vit_token_indexes"] = np.arange(1, n + 1)
    else:
        out[f"{prefix}.packed_vae_position_ids"] = np.asarray(pos)
        out[f"{prefix}.packed_vae_token_indexes"] = np.arange(1, n + 1)
        out[f"{prefix}.packed_timesteps"] = np.zeros(1, np.float32)
    return out


def _official_order(h, n: int) -> np.ndarray:
    """Our latent chunk order ``[start, end, latents]`` -> official ``[start, latents, end]``."""
    h = np.asarray(h)[: n + 2]
    return np.concatenate([h[:1], h[2:], h[1:2]], axis=0)


def run_understanding(vctx, meta: dict, arr: dict) -> dict:
    P = meta["params"]
    eng = _engine(vctx, P)
    sp = eng.sp
    max_length = int(_param(P, "max_think_token_n", 1000))
    do_sample = bool(P.get("do_sample", False))
    if do_sample:
        raise RuntimeError("understanding: do_sample=True cannot be compared (random draws are not recorded)")
    out = {}
    c0 = Context.new(eng, 1, track_cfg=True)
    c1 = c0.add_image(arr["image_uint8"], vae=False, vit=True)
    vi = c1.last_hidden["vit"]
    n = int(vi["n"][0])
    out.update(_image_layout("ctx0_vit", n, 0, 0, sp, "vit", vi["pos"][0]))
    out["ctx0_vit.final_hidden"] = np.asarray(vi["h"][0, : n + 2])
    q_ids = eng.tok.encode(P["question"])
    out["question_token_ids"] = np.array(q_ids)
    kv1, rope1 = int(c1.gen.length[0]), int(c1.gen.rope[0])
    c2 = c1.add_text(P["question"])
    seq = [sp.bos] + q_ids + [sp.eos]
    out.update(_text_layout("ctx1_text", seq, kv1, rope1))
    h = np.asarray(c2.last_hidden[0, : len(seq)])
    out["ctx1_text.final_hidden"] = h
    out["ctx1_text.last_position_logits"] = np.asarray(
        eng.model.apply({"params": eng.params}, jnp.asarray(h[-1:]), method=Bagel.lm_logits))
    out.update(_text_layout("ctx1_text.cfg_img_unused", seq, 0, 0))
    kv2, rope2 = int(c2.gen.length[0]), int(c2.gen.rope[0])
    out["decode_start.packed_start_tokens"] = np.array([sp.bos])
    out["decode_start.packed_query_position_ids"] = np.array([rope2])
    out["decode_start.key_values_lens"] = np.array([kv2])
    out["decode_start.packed_key_value_indexes"] = np.arange(kv2)
    r = generate_text(c2, max_length=max_length, sampling=SamplingParams(do_sample=False),
                      stop_tokens=[int(P.get("end_token_id", sp.eos))], record=True)
    steps = int(r.raw["steps"])
    out["decode.logits"] = r.raw["logits"][0, :steps]
    out["decode.final_hidden"] = r.raw["hidden"][0, :steps]
    out["decode.token_ids"] = np.asarray(r.token_ids[0])
    return out


def _image_params(P: dict) -> ImageParams:
    d = {k: P[k] for k in ("cfg_text_scale", "cfg_img_scale", "timestep_shift", "num_timesteps",
                           "cfg_renorm_min", "cfg_renorm_type") if k in P}
    if "cfg_interval" in P:
        d["cfg_interval"] = tuple(float(x) for x in P["cfg_interval"])
    if "num_timesteps" in d:
        d["num_timesteps"] = int(d["num_timesteps"])
    return ImageParams(**d)


def _sampling_outputs(res: dict) -> dict:
    sig = res["sigmas"]
    return {"schedule": sig, "steps.t": sig[:-1], "steps.x_t": res["x_t"][:, 0], "steps.v": res["v"][:, 0],
            "final_latent_tokens": res["latent_tokens"][0],
            "final_latent": np.transpose(res["latent"], (0, 3, 1, 2)),
            "decoded": np.transpose(res["decoded"], (0, 3, 1, 2)), "output_image_uint8": res["image"][0]}


def _query_layout(c: Context, n_lat: int, pos, sp) -> dict:
    g, t, i = c.gen, c.cfg_text, c.cfg_img
    kvg = int(g.length[0])
    out = {"gen.cond_latent.packed_text_ids": np.array([sp.start_of_image, sp.end_of_image]),
           "gen.cond_latent.packed_text_indexes": np.array([0, n_lat + 1]),
           "gen.cond_latent.packed_vae_position_ids": np.asarray(pos),
           "gen.cond_latent.packed_vae_token_indexes": np.arange(1, n_lat + 1),
           "gen.cond_latent.packed_seqlens": np.array([n_lat + 2]),
           "gen.cond_latent.packed_position_ids": np.full(n_lat + 2, int(g.rope[0])),
           "gen.cond_latent.key_values_lens": np.array([kvg]),
           "gen.cond_latent.packed_indexes": np.arange(kvg, kvg + n_lat + 2),
           "gen.cond_latent.packed_key_value_indexes": np.arange(kvg)}
    for name, br in (("text_uncond", t), ("img_uncond", i)):
        kv = int(br.length[0])
        out[f"gen.{name}.cfg_packed_position_ids"] = np.full(n_lat + 2, int(br.rope[0]))
        out[f"gen.{name}.cfg_key_values_lens"] = np.array([kv])
        out[f"gen.{name}.cfg_packed_query_indexes"] = np.arange(kv, kv + n_lat + 2)
        out[f"gen.{name}.cfg_packed_key_value_indexes"] = np.arange(kv)
    return out


def _think(c: Context, P: dict) -> Context:
    """Think mode for the sampling cases: generate thinking text from gen, prefill it into gen only."""
    r = generate_text(c, max_length=int(_param(P, "max_think_token_n", 1000)))
    return c.add_generated_text(r.texts[0])


def _start(vctx, P: dict):
    """The engine for a sampling case and its starting context (with the think system prompt if asked)."""
    eng = _engine(vctx, P)
    c = Context.new(eng, 1)
    if P.get("think"):
        c = c.add_text(GEN_THINK_SYSTEM_PROMPT, role="system")
    return eng, c


def run_t2i_sampling(vctx, meta: dict, arr: dict) -> dict:
    P = meta["params"]
    eng, c = _start(vctx, P)
    sp = eng.sp
    out = {}
    ids = eng.tok.encode(P["prompt"])
    out["prompt_token_ids"] = np.array(ids)
    seq = [sp.bos] + ids + [sp.eos]
    kv_g, rope_g, kv_i, rope_i = int(c.gen.length[0]), int(c.gen.rope[0]), int(c.cfg_img.length[0]), int(c.cfg_img.rope[0])
    c = c.add_text(P["prompt"])
    out.update(_text_layout("ctx_text.cond", seq, kv_g, rope_g))
    out.update(_text_layout("ctx_text.cfg_img", seq, kv_i, rope_i))
    H, W = (int(v) for v in P["image_hw"])
    out.update(_think_and_sample(c, eng, P, arr, (H, W)))
    return out


def _think_and_sample(c: Context, eng, P: dict, arr: dict, hw) -> dict:
    """Optional thinking, then the sampling loop with the recorded initial noise (both sampling cases)."""
    if P.get("think"):
        c = _think(c, P)
    H, W = hw
    ds = eng.cfg.latent_downsample
    pos = np.asarray(blocks.latent_grid(H // ds, W // ds, eng.cfg.max_latent_size))
    out = _query_layout(c, (H // ds) * (W // ds), pos, eng.sp)
    res = generate_images(c, (H, W), _image_params(P), noise=np.asarray(arr["init_noise"])[None], record=True)
    out.update(_sampling_outputs(res))
    return out


def run_edit_sampling(vctx, meta: dict, arr: dict) -> dict:
    P = meta["params"]
    eng, c = _start(vctx, P)
    sp = eng.sp
    out = {}
    eps = np.transpose(np.asarray(arr["vae_posterior_eps"], np.float32), (0, 2, 3, 1))
    kv0, rope0 = int(c.gen.length[0]), int(c.gen.rope[0])
    pre = eng.preprocess(arr["image_uint8"], vae=True, vit=True)
    cv = c.add_image(None, vit=False, vae_eps=[eps[0]], preprocessed=[pre])
    vinfo = cv.last_hidden["vae"]
    n_vae = int(vinfo["n"][0])
    out.update(_image_layout("ctx0_vae", n_vae, kv0, rope0, sp, "vae", vinfo["lat_pos"][0, :n_vae]))
    H, W = pre["hw"]
    ds = eng.cfg.latent_downsample
    out["ctx0_vae.patchified_vae_latent_shapes"] = np.array([[H // ds, W // ds]])
    out["ctx0_vae.latent_tokens"] = np.asarray(vinfo["latent_tokens"][0])
    kv1, rope1 = int(cv.gen.length[0]), int(cv.gen.rope[0])
    c1 = cv.add_image(None, vae=False, preprocessed=[pre])
    ti = c1.last_hidden["vit"]
    n_vit = int(ti["n"][0])
    out.update(_image_layout("ctx1_vit", n_vit, kv1, rope1, sp, "vit", ti["pos"][0]))
    # The context above was built in two calls (to record each block); the engine's add_image with
    # vae=True, vit=True does the same two prefills in one call.
    ids = eng.tok.encode(P["instruction"])
    out["instruction_token_ids"] = np.array(ids)
    seq = [sp.bos] + ids + [sp.eos]
    kv_g, rope_g, kv_i, rope_i = int(c1.gen.length[0]), int(c1.gen.rope[0]), int(c1.cfg_img.length[0]), int(c1.cfg_img.rope[0])
    c2 = c1.add_text(P["instruction"])
    out.update(_text_layout("ctx2_text.cond", seq, kv_g, rope_g))
    out.update(_text_layout("ctx2_text.cfg_img", seq, kv_i, rope_i))
    out.update(_think_and_sample(c2, eng, P, arr, (H, W)))
    return out


RUNNERS = {
    "understanding": run_understanding,
    "t2i_sampling": run_t2i_sampling,
    "edit_sampling": run_edit_sampling,
}
