"""Runners of the engine cases (``understanding``, ``t2i_sampling``, ``edit_sampling``,
``t2i_sampling_taylorseer``).

Each goes through the inference engine: :class:`~bagel_jax.inference.context.Context` for the contexts,
:func:`~bagel_jax.inference.decode.generate_text` (the ``while_loop``) for decoding and
:func:`~bagel_jax.inference.sampler.generate_images` (the ``scan``) for sampling, injecting the recorded
noise. Prompts, sizes, hyperparameters and transforms come from the manifest.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import jax.numpy as jnp

from ..inference import blocks
from ..inference.context import GEN_THINK_SYSTEM_PROMPT, Context
from ..inference.decode import SamplingParams, generate_text
from ..inference.sampler import ImageParams, generate_images
from ..inference.taylorseer import TaylorSeer
from ..models.bagel import Bagel
from .common import CaseError, Fixture, image_layout, official_order, param, query_layout, text_layout
from .gen_step import BRANCHES


def run_understanding(fx: Fixture, meta: dict, arr: dict) -> dict:
    P = meta["params"]
    eng = fx.engine(P)
    sp = eng.sp
    if bool(P.get("do_sample", False)):
        raise CaseError("understanding: do_sample=True cannot be compared (random draws are not recorded)")
    out = {}
    c1 = Context.new(eng, 1, track_cfg=True).add_image(arr["image_uint8"], vae=False, vit=True, keep_hidden=True)
    vi = c1.last_hidden["vit"]
    n = int(vi["n"][0])
    out.update(image_layout("ctx0_vit", "vit", n, 0, 0, vi["pos"][0], sp))
    out["ctx0_vit.final_hidden"] = np.asarray(vi["h"][0, : n + 2])
    q_ids = eng.tok.encode(P["question"])
    out["question_token_ids"] = np.array(q_ids)
    kv1, rope1 = int(c1.gen.length[0]), int(c1.gen.rope[0])
    c2 = c1.add_text(P["question"])
    seq = [sp.bos] + q_ids + [sp.eos]
    out.update(text_layout("ctx1_text", seq, kv1, rope1))
    h = np.asarray(c2.last_hidden[0, : len(seq)])
    out["ctx1_text.final_hidden"] = h
    out["ctx1_text.last_position_logits"] = np.asarray(
        eng.model.apply({"params": eng.params}, jnp.asarray(h[-1:]), method=Bagel.lm_logits))
    out.update(text_layout("ctx1_text.cfg_img_unused", seq, 0, 0))
    kv2, rope2 = int(c2.gen.length[0]), int(c2.gen.rope[0])
    out.update({"decode_start.packed_start_tokens": np.array([sp.bos]),
                "decode_start.packed_query_position_ids": np.array([rope2]),
                "decode_start.key_values_lens": np.array([kv2]),
                "decode_start.packed_key_value_indexes": np.arange(kv2)})
    r = generate_text(c2, max_length=int(param(P, "max_think_token_n", 1000)), sampling=SamplingParams(do_sample=False),
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


def _start(fx: Fixture, P: dict):
    """The engine of a sampling case and its first context (with the think system prompt if asked)."""
    eng = fx.engine(P)
    c = Context.new(eng, 1)
    if P.get("think"):
        c = c.add_text(GEN_THINK_SYSTEM_PROMPT, role="system")
    return eng, c


def _add_instruction(c: Context, text: str, prefix: str, out: dict) -> Context:
    """Add the prompt / instruction, recording its layout in the conditional and image-uncond branches."""
    sp = c.engine.sp
    seq = [sp.bos] + c.engine.tok.encode(text) + [sp.eos]
    out.update(text_layout(f"{prefix}.cond", seq, int(c.gen.length[0]), int(c.gen.rope[0])))
    out.update(text_layout(f"{prefix}.cfg_img", seq, int(c.cfg_img.length[0]), int(c.cfg_img.rope[0])))
    return c.add_text(text)


def _sample(c: Context, P: dict, arr: dict, hw) -> dict:
    """Optional thinking, then the sampling loop with the recorded initial noise (both sampling cases)."""
    eng = c.engine
    if P.get("think"):   # thinking text from gen, prefilled into gen only
        c = c.add_generated_text(generate_text(c, max_length=int(param(P, "max_think_token_n", 1000))).texts[0])
    H, W = hw
    ds = eng.cfg.latent_downsample
    pos = np.asarray(blocks.latent_grid(H // ds, W // ds, eng.cfg.max_latent_size))
    out = query_layout("gen.cond_latent", "gen.", (H // ds) * (W // ds), pos,
                       dict(cond=c.gen, text_uncond=c.cfg_text, img_uncond=c.cfg_img), eng.sp)
    ts = bool(P.get("enable_taylorseer"))
    ip = _image_params(P)
    if ts:
        ip = dataclasses.replace(ip, step_cache="taylorseer")
    res = generate_images(c, (H, W), ip, noise=np.asarray(arr["init_noise"])[None], record=True,
                          taylorseer_rule=_taylorseer_rule(P) if ts else None)
    sig = res["sigmas"]
    out.update({"schedule": sig, "steps.t": sig[:-1], "steps.x_t": res["x_t"][:, 0], "steps.v": res["v"][:, 0],
                "final_latent_tokens": res["latent_tokens"][0],
                "final_latent": np.transpose(res["latent"], (0, 3, 1, 2)),
                "decoded": np.transpose(res["decoded"], (0, 3, 1, 2)), "output_image_uint8": res["image"][0]})
    if ts:
        out["steps.x_next"] = np.concatenate([res["x_t"][1:, 0], res["latent_tokens"][:1]], axis=0)
        out.update(_branch_records(res))
    return out


def _taylorseer_rule(P: dict) -> TaylorSeer:
    """The manifest's TaylorSeer parameters (the official defaults where absent), every layer kept."""
    q = P.get("taylorseer", {}) if isinstance(P.get("taylorseer"), dict) else {}
    kw = {k: int(q[k]) for k in ("fresh_threshold", "first_enhance", "max_order") if k in q}
    return TaylorSeer(all_layers=True, **kw)


def _branch_records(res: dict) -> dict:
    """``steps.<branch>.*`` of a TaylorSeer run: step types, branch steps and factor counts for every step
    (-1 where the branch did not run), velocities / layer outputs / final hidden for the steps it ran
    (query rows in the official order). A branch computed as another's row block (equal contexts, see
    ``make_plan``) reports that block's arrays on its own steps; one the plan does not run, -1."""
    plan, rec = res["plan"], res["branch"]
    steps = rec["full"].shape[0]
    out = {}
    for name, ours in BRANCHES.items():
        row = plan.rows[plan.names.index(ours)] if ours in plan.names else None
        if row is None:
            out.update({f"steps.{name}.{k}": -np.ones(steps, np.int64) for k in ("full", "branch_step", "num_factors")})
            continue
        # a guidance branch runs on the CFG steps only, also when its row block is gen's (computed once)
        ran = (rec["full"][:, row] >= 0) & (rec["active"] if name != "cond" else True)
        for k, key in (("full", "full"), ("branch_step", "step"), ("num_factors", "n_valid")):
            out[f"steps.{name}.{k}"] = np.where(ran, rec[key][:, row], -1)
        out[f"steps.{name}.v"] = rec["v"][ran, row, 0]
        out[f"steps.{name}.final_hidden"] = official_order(rec["final_hidden"][ran, row, 0])
        out[f"steps.{name}.layer_out"] = official_order(rec["layer_out"][ran, row, :, 0])
    return out


def run_t2i_sampling(fx: Fixture, meta: dict, arr: dict) -> dict:
    P = meta["params"]
    eng, c = _start(fx, P)
    out = {"prompt_token_ids": np.array(eng.tok.encode(P["prompt"]))}
    c = _add_instruction(c, P["prompt"], "ctx_text", out)
    out.update(_sample(c, P, arr, tuple(int(v) for v in P["image_hw"])))
    return out


def run_edit_sampling(fx: Fixture, meta: dict, arr: dict) -> dict:
    P = meta["params"]
    eng, c = _start(fx, P)
    sp = eng.sp
    eps = np.transpose(np.asarray(arr["vae_posterior_eps"], np.float32), (0, 2, 3, 1))
    pre = eng.preprocess(arr["image_uint8"], vae=True, vit=True)
    # The engine's add_image(vae=True, vit=True) does these two prefills in one call; two calls here
    # record each block.
    kv0, rope0 = int(c.gen.length[0]), int(c.gen.rope[0])
    cv = c.add_image(None, vit=False, vae_eps=[eps[0]], preprocessed=[pre])
    vinfo = cv.last_hidden["vae"]
    n_vae = int(vinfo["n"][0])
    out = image_layout("ctx0_vae", "vae", n_vae, kv0, rope0, vinfo["lat_pos"][0, :n_vae], sp)
    H, W = pre["hw"]
    ds = eng.cfg.latent_downsample
    out["ctx0_vae.patchified_vae_latent_shapes"] = np.array([[H // ds, W // ds]])
    out["ctx0_vae.latent_tokens"] = np.asarray(vinfo["latent_tokens"][0])
    kv1, rope1 = int(cv.gen.length[0]), int(cv.gen.rope[0])
    c1 = cv.add_image(None, vae=False, preprocessed=[pre])
    ti = c1.last_hidden["vit"]
    out.update(image_layout("ctx1_vit", "vit", int(ti["n"][0]), kv1, rope1, ti["pos"][0], sp))
    out["instruction_token_ids"] = np.array(eng.tok.encode(P["instruction"]))
    c2 = _add_instruction(c1, P["instruction"], "ctx2_text", out)
    out.update(_sample(c2, P, arr, (H, W)))
    return out


RUNNERS = {
    "understanding": run_understanding,
    "t2i_sampling": run_t2i_sampling,
    "t2i_sampling_taylorseer": run_t2i_sampling,   # the same case with TaylorSeer on (params.enable_taylorseer)
    "edit_sampling": run_edit_sampling,
}
