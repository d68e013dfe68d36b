"""Runner of ``gen_single_step``: one velocity prediction of every CFG branch, for a text-to-image and an
editing context.

The contexts are built by the inference engine (:class:`~bagel_jax.inference.context.Context`: its
``gen`` / ``cfg_text`` / ``cfg_img`` branches are the official conditional, text-unconditional and
image-unconditional contexts); each branch's velocity is :func:`~bagel_jax.inference.blocks.velocity`,
the function of the sampler's step; the CFG combinations are :func:`~bagel_jax.inference.cfg.combine_cfg`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..inference import blocks
from ..inference.cfg import combine_cfg
from ..inference.context import Context
from .common import Fixture, image_layout, nhwc, official_order, query_layout, text_layout

BRANCHES = {"cond": "gen", "text_uncond": "cfg_text", "img_uncond": "cfg_img"}


def _velocities(fx: Fixture, c: Context, names, x_t: np.ndarray, t: float, hw, prefix: str) -> tuple[dict, dict]:
    """Velocity ``[N, p*p*C]`` of each named branch of ``c`` and the arrays recorded for it."""
    eng, cfg = c.engine, fx.cfg
    ds = cfg.latent_downsample
    h, w = hw[0] // ds, hw[1] // ds
    pos = blocks.latent_grid(h, w, cfg.max_latent_size)
    out = {}
    branches = {name: getattr(c, BRANCHES[name]) for name in names}
    vs = {}
    for name, br in branches.items():
        hidden = name == "cond"
        v, hq, inter = blocks.velocity(eng.model, eng.params, br.cache, jnp.asarray(x_t, jnp.float32)[None],
                                            jnp.float32(t), pos[None], jnp.asarray(br.rope, jnp.int32), eng.markers,
                                            collect=hidden)
        if hidden:
            layers, cond_inter = inter["hidden"], inter
        vs[name] = np.asarray(v[0])
        out[f"{prefix}.v_{name}"] = vs[name]
        out[f"{prefix}.v_{name}.final_hidden"] = official_order(hq[0])
        for i in range(layers.shape[0] if hidden else 0):
            out[f"{prefix}.v_{name}.layer{i}_out"] = official_order(layers[i, 0])
    n_lat = x_t.shape[0]
    out.update(query_layout(f"{prefix}.cond", f"{prefix}.", n_lat, np.asarray(pos), branches, eng.sp))
    # the three terms of the latent embedding, as sown during the conditional branch's velocity
    out.update({f"{prefix}.{k}": cond_inter[s][0] for k, s in (("vae2llm", "vae2llm_out"),
                                                             ("time_embedding", "time_embedding"),
                                                             ("latent_pos_embed", "latent_pos_embed_out"))})
    return vs, out


def _cfg(vs: dict, st: float, si: float, renorm_min: float, prefix: str) -> dict:
    v = vs["cond"][None]
    vi = vs["img_uncond"][None] if "img_uncond" in vs else v   # plain T2I: image-uncond context == cond
    return {f"{prefix}.v_cfg_{rt}": combine_cfg(v, vs["text_uncond"][None], vi, st, si, rt, renorm_min)[0]
            for rt in ("global", "channel", "text_channel")}


def run_gen_single_step(fx: Fixture, meta: dict, arr: dict) -> dict:
    P = meta["params"]
    t = float(P["t"])
    renorm_min = float(P.get("cfg_renorm_min", 0.0))
    eng = fx.engine(P)
    sp = eng.sp
    out = {}

    # text-to-image: cond = prompt; text_uncond = empty; img_uncond = prompt (the same branch as cond)
    ids = eng.tok.encode(P["t2i_prompt"])
    out["t2i.prompt_token_ids"] = np.array(ids)
    seq = [sp.bos] + ids + [sp.eos]
    c = Context.new(eng, 1).add_text(P["t2i_prompt"])
    out.update(text_layout("t2i.ctx_text.cond", seq, 0, 0))
    out.update(text_layout("t2i.ctx_text.cfg_img", seq, 0, 0))
    vs, o = _velocities(fx, c, ("cond", "text_uncond"), arr["t2i.x_t"], t, P["t2i_image_hw"], "t2i")
    out.update(o)
    out.update(_cfg(vs, float(P["t2i_cfg_text_scale"]), float(P["t2i_cfg_img_scale"]), renorm_min, "t2i"))

    # editing: cond = VAE + ViT + instruction; text_uncond = VAE + ViT; img_uncond = instruction
    pre = fx.preprocess(arr["edit.image_uint8"], P)
    eps = nhwc(arr["edit.vae_posterior_eps"])
    c = Context.new(eng, 1).add_image(None, vit=False, vae_eps=[eps[0]], preprocessed=[pre])
    vinfo = c.last_hidden["vae"]
    n = int(vinfo["n"][0])
    out.update(image_layout("edit.ctx0_vae", "vae", n, 0, 0, vinfo["lat_pos"][0, :n], sp))
    kv1, rope1 = int(c.gen.length[0]), int(c.gen.rope[0])
    c = c.add_image(None, vae=False, preprocessed=[pre])
    out.update(image_layout("edit.ctx1_vit", "vit", int(c.last_hidden["vit"]["n"][0]), kv1, rope1,
                            c.last_hidden["vit"]["pos"][0], sp))
    ids = eng.tok.encode(P["edit_instruction"])
    out["edit.instruction_token_ids"] = np.array(ids)
    seq = [sp.bos] + ids + [sp.eos]
    out.update(text_layout("edit.ctx2_text.cond", seq, int(c.gen.length[0]), int(c.gen.rope[0])))
    out.update(text_layout("edit.ctx2_text.cfg_img", seq, 0, 0))
    c = c.add_text(P["edit_instruction"])
    vs, o = _velocities(fx, c, ("cond", "text_uncond", "img_uncond"), arr["edit.x_t"], t, pre["hw"], "edit")
    out.update(o)
    out.update(_cfg(vs, float(P["edit_cfg_text_scale"]), float(P["edit_cfg_img_scale"]), renorm_min, "edit"))
    return out


RUNNERS = {"gen_single_step": run_gen_single_step}
