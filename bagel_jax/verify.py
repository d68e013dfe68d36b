"""Parity verifier: run fixture cases through bagel_jax and compare with the official outputs.

    python -m bagel_jax.verify --fixtures DIR [--cases a,b,...] [--save-outputs DIR] [--dtype float32|bfloat16]

DIR is a fixture folder: a checkpoint in the official layout, ``manifest.json`` and one
``<case>.safetensors`` per case (like ``../shared/reference/fixtures/tiny-a``). Everything is driven by
the manifest: prompts, image sizes, hyperparameters and the recorded random draws. Inputs are rebuilt
by our own preprocessing, tokenizer and packing (so the layout arrays are compared too); recorded
noise is injected.

One line per compared array: ``case array max_abs_err ref_scale tol PASS|FAIL``.
Tolerances: ``tol = rtol * max(1, max|ref|)`` with ``rtol = 1e-4`` for single forward passes and
``1e-3`` for arrays accumulated over a multi-step sampling loop (final latents, decoded images);
integer arrays must be equal; uint8 images may differ by one level (truncation boundary).
Exit status 1 if any comparison fails or a requested case cannot be run. With ``--dtype bfloat16``
the errors are reported (status INFO) but do not gate the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .convert.safetensors_io import load_file, save_file
from .data import packing
from .data.images import ImageTransform, load_image, to_uint8
from .inference import blocks
from .inference.cfg import combine_cfg
from .inference.kv_cache import KVCache
from .loading import BagelModel, load_model
from .nn.attention import AUTO_BLOCKED_MIN_LEN, IMPLEMENTATIONS
from .models import flux_vae
from .models.bagel import Bagel, unpatchify_latents
from .models.siglip_navit import patchify
from .train.forward import TrainNoise, train_forward

RTOL_FORWARD = 1e-4
RTOL_SAMPLING = 1e-3
# CE tokens per chunk in the train_forward case: small, so the fixture's CE runs in several chunks
CE_CHUNK = 8


class CaseError(RuntimeError):
    pass


def nchw(x) -> np.ndarray:
    x = np.asarray(x)
    return np.transpose(x, (0, 3, 1, 2))


def nhwc(x) -> np.ndarray:
    return np.transpose(np.asarray(x, np.float32), (0, 2, 3, 1))


class Ctx:
    """Loaded model + helpers shared by the case runners."""

    def __init__(self, folder: str, manifest: dict, dtype, attention_impl: str = "auto"):
        self.folder = folder
        self.manifest = manifest
        self.bm: BagelModel = load_model(folder, dtype=dtype, param_dtype=jnp.float32, attention_impl=attention_impl)
        self.cfg = self.bm.cfg
        self.tok = self.bm.tokenizer
        self.sp = self.tok.special
        self.markers = jnp.asarray([self.sp.start_of_image, self.sp.end_of_image], jnp.int32)

    # -- transforms ----------------------------------------------------------------------------
    def transform(self, params: dict, key: str):
        """The image transform named in the case params; None (= use the image as given) otherwise."""
        for k in (key, f"{key}(resize only)"):
            if k in params:
                return ImageTransform.from_dict(params[k])
        return None

    def preprocess(self, image_uint8: np.ndarray, params: dict, vae: bool, vit: bool):
        """Official inferencer preprocessing: VAE-rule resize first, the ViT transform on that result."""
        img = load_image(image_uint8)
        tv = self.transform(params, "vae_transform")
        if tv is not None:
            img = tv.resize(img)
        out = {}
        if vae:
            out["vae"] = tv(img) if tv is not None else _pixels(img)
        if vit:
            tt = self.transform(params, "vit_transform")
            out["vit"] = tt(img) if tt is not None else _pixels(img)
        return out

    # -- context blocks (batch of one row) -----------------------------------------------------
    def new_cache(self, capacity: int) -> KVCache:
        return KVCache.empty(self.cfg.llm, 1, capacity, jnp.float32)

    def text(self, cache: KVCache, ids: list[int], rope: int, return_hidden=False):
        seq = [self.sp.bos] + list(ids) + [self.sp.eos]
        n = len(seq)
        h, cache, hid = blocks.text_chunk(self.bm.model, self.bm.params, cache, jnp.asarray([seq], jnp.int32),
                                          jnp.arange(rope, rope + n, dtype=jnp.int32)[None],
                                          jnp.asarray([n], jnp.int32), True, return_hidden)
        return h[0], cache, rope + n, dict(ids=np.asarray(seq), positions=np.arange(rope, rope + n))

    def vit(self, cache: KVCache, pixel_chw: np.ndarray, rope: int):
        tokens, pos = patchify(pixel_chw, self.cfg.vit.patch_size, self.cfg.vit_max_num_patch_per_side)
        n = tokens.shape[0]
        h, cache, _ = blocks.vit_chunk(self.bm.model, self.bm.params, cache, jnp.asarray(tokens)[None],
                                       jnp.asarray(pos, jnp.int32)[None], jnp.asarray([n], jnp.int32),
                                       jnp.asarray([rope], jnp.int32), self.markers)
        return h[0], cache, rope + 1, dict(tokens=tokens, pos=pos, n=n)

    def vae(self, cache: KVCache, pixel_chw: np.ndarray, eps_nchw: np.ndarray, rope: int):
        _, H, W = pixel_chw.shape
        ds, Gl = self.cfg.latent_downsample, self.cfg.max_latent_size
        h, w = H // ds, W // ds
        pos = blocks.latent_grid(h, w, Gl)
        hid, cache, _, x0 = blocks.vae_chunk(
            self.bm.model, self.bm.params, self.bm.vae, self.bm.vae_params, cache, nhwc(pixel_chw[None]),
            nhwc(eps_nchw), jnp.arange(h * w, dtype=jnp.int32)[None], pos[None], jnp.asarray([h * w], jnp.int32),
            jnp.asarray([rope], jnp.int32), self.markers, self.cfg.latent_patch_size)
        return hid[0], cache, rope + 1, dict(latent_tokens=np.asarray(x0[0]), pos=np.asarray(pos), n=h * w)

    def velocity(self, cache: KVCache, x_t: np.ndarray, t: float, hw, rope: int, return_hidden=False):
        ds, Gl = self.cfg.latent_downsample, self.cfg.max_latent_size
        h, w = hw[0] // ds, hw[1] // ds
        pos = blocks.latent_grid(h, w, Gl)
        v, hid, layers = blocks.flow_velocity(
            self.bm.model, self.bm.params, cache, jnp.asarray(x_t, jnp.float32)[None],
            jnp.asarray([t], jnp.float32), pos[None], jnp.asarray([h * w], jnp.int32),
            jnp.asarray([rope], jnp.int32), self.markers, return_hidden)
        return v[0], hid[0], layers, np.asarray(pos)


def _pixels(img) -> np.ndarray:
    from .data.images import to_tensor
    return to_tensor(img)


def official_order(h) -> np.ndarray:
    """Our flow/VAE chunk order ``[start, end, latents]`` -> official ``[start, latents, end]`` (axis -2)."""
    h = np.asarray(h)
    return np.concatenate([h[..., :1, :], h[..., 2:, :], h[..., 1:2, :]], axis=-2)


# -------------------------------------------------------------------------------------------------
# Case runners: each returns {manifest array name: our array}.
# -------------------------------------------------------------------------------------------------

def _sown(tree, name: str):
    """Find a value sown with ``self.sow("intermediates", name, ...)`` anywhere in the collection."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        for k, v in tree.items():
            if k == name:
                return v[0] if isinstance(v, tuple) else v
            found = _sown(v, name)
            if found is not None:
                return found
    return None


def run_vae(ctx: Ctx, meta: dict, arr: dict) -> dict:
    vae, vp, vcfg = ctx.bm.vae, ctx.bm.vae_params, ctx.cfg.vae
    x = nhwc(arr["image"])
    moments, inter = vae.apply({"params": vp}, x, method=flux_vae.AutoEncoder.encode_moments,
                               mutable=["intermediates"])
    C = vcfg.z_channels
    out = dict(encoder_moments=nchw(moments), posterior_mean=nchw(moments[..., :C]),
               posterior_logvar=nchw(moments[..., C:]))
    out["encoder_mid_out"] = nchw(_sown(inter, "encoder_mid_out"))
    z_mean = flux_vae.latent_from_moments(moments, vcfg)
    z_samp = flux_vae.latent_from_moments(moments, vcfg, nhwc(arr["posterior_eps"]))
    out["latent_from_mean"], out["latent_sampled"] = nchw(z_mean), nchw(z_samp)
    for name, z in (("from_mean", z_mean), ("from_sampled", z_samp)):
        dec, inter = vae.apply({"params": vp}, z, method=flux_vae.AutoEncoder.decode, mutable=["intermediates"])
        out[f"decoded_{name}"] = nchw(dec)
        out[f"decoder_conv_in_out_{name}"] = nchw(_sown(inter, "decoder_conv_in_out"))
        out[f"decoder_mid_out_{name}"] = nchw(_sown(inter, "decoder_mid_out"))
    return out


def run_vit(ctx: Ctx, meta: dict, arr: dict) -> dict:
    params = meta.get("params", {})
    tf = ctx.transform(params, "vit_transform")
    img = load_image(arr["image_uint8"])
    pixel = tf(img) if tf is not None else _pixels(img)
    Gv = int(params.get("vit_max_num_patch_per_side", ctx.cfg.vit_max_num_patch_per_side))
    tokens, pos = patchify(pixel, ctx.cfg.vit.patch_size, Gv)
    n = tokens.shape[0]
    emb, extra = ctx.bm.model.apply({"params": ctx.bm.params}, jnp.asarray(tokens)[None],
                                    jnp.asarray(pos, jnp.int32)[None], jnp.ones((1, n), jnp.int32), True,
                                    method=Bagel.embed_vit)
    out = dict(packed_vit_tokens=tokens, packed_vit_position_ids=pos, vit_token_seqlens=np.array([n]),
               cu_seqlens=np.array([0, n]), packed_text_ids=np.array([ctx.sp.start_of_image, ctx.sp.end_of_image]),
               packed_text_indexes=np.array([0, n + 1]), packed_vit_token_indexes=np.arange(1, n + 1),
               packed_position_ids=np.zeros(n + 2, np.int64), packed_seqlens=np.array([n + 2]),
               packed_indexes=np.arange(n + 2),
               vit_embeddings=extra["embeddings"][0], vit_output=extra["vit_output"][0],
               connector_output=extra["connector_output"][0],
               vit_pos_embed=np.asarray(ctx.bm.params["vit_pos_embed"]["pos_embed"])[pos],
               llm_input_embeds=emb[0])
    for i in range(extra["layers"].shape[0]):
        out[f"vit_layer{i}_out"] = extra["layers"][i, 0]
    ex = meta.get("resize_example")
    if ex is not None and "resize_example.image_uint8" in arr:
        rimg = load_image(arr["resize_example.image_uint8"])
        w, h = tf.target_size(*rimg.size)
        out["resize_example.output_hw"] = (np.array([h, w]), np.array(ex["output_hw"]))
        px = tf(rimg)
        mean = px.reshape(3, -1).mean(axis=1)   # of the normalised [-1, 1] tensor
        out["resize_example.output_channel_mean"] = (mean, np.array(ex["output_channel_mean"], np.float32))
    return out


def run_text(ctx: Ctx, meta: dict, arr: dict) -> dict:
    prompts = meta["params"]["prompts"]
    samples = [[packing.TextItem(ctx.tok.encode(p))] for p in prompts]
    b = packing.pack([samples], ctx.sp, ctx.cfg)
    L = b.shape[1]
    m, p = ctx.bm.model, {"params": ctx.bm.params}
    x = m.apply(p, jnp.asarray(b.token_ids), method=Bagel.embed_text)
    from .nn.attention import MaskVectors
    from .models.qwen2_mot import Routing
    vec = MaskVectors(jnp.asarray(b.seg), jnp.asarray(b.vis), jnp.asarray(b.nblk))
    h, _, hidden = m.apply(p, x, jnp.asarray(b.positions), vec, Routing.und(), None, None, True,
                           method=Bagel.decode)
    logits = m.apply(p, h, method=Bagel.lm_logits)
    out = dict(text_token_lens=np.array([len(ctx.tok.encode(q)) + 2 for q in prompts]),
               packed_text_ids=b.token_ids[0], packed_text_position_ids=b.positions[0],
               packed_text_indexes=np.arange(L), input_embeds=x[0], final_hidden=h[0], logits=logits[0])
    for i in range(hidden.shape[0]):
        out[f"layer{i}_out"] = hidden[i, 0]
    return out


def _ctx_text_layout(prefix: str, info: dict, kv_before: int, rope_after: int) -> dict:
    n = len(info["ids"])
    return {f"{prefix}.text_token_lens": np.array([n]), f"{prefix}.packed_text_ids": info["ids"],
            f"{prefix}.packed_text_position_ids": info["positions"],
            f"{prefix}.packed_text_indexes": np.arange(kv_before, kv_before + n),
            f"{prefix}.key_values_lens": np.array([kv_before]), f"{prefix}.newlens": np.array([kv_before + n]),
            f"{prefix}.new_rope": np.array([rope_after])}


def _query_layout(prefix: str, cfg_prefix: str, n_lat: int, pos: np.ndarray, ropes: dict, kv: dict, sp) -> dict:
    out = {f"{prefix}.cond.packed_vae_position_ids": pos,
           f"{prefix}.cond.packed_text_ids": np.array([sp.start_of_image, sp.end_of_image]),
           f"{prefix}.cond.packed_text_indexes": np.array([0, n_lat + 1]),
           f"{prefix}.cond.packed_vae_token_indexes": np.arange(1, n_lat + 1),
           f"{prefix}.cond.packed_position_ids": np.full(n_lat + 2, ropes["cond"]),
           f"{prefix}.cond.key_values_lens": np.array([kv["cond"]])}
    for br in ("text_uncond", "img_uncond"):
        if br in ropes:
            out[f"{cfg_prefix}{br}.cfg_packed_position_ids"] = np.full(n_lat + 2, ropes[br])
            out[f"{cfg_prefix}{br}.cfg_key_values_lens"] = np.array([kv[br]])
    return out


def _branch_outputs(prefix: str, name: str, v, hid, layers, n_layers: int) -> dict:
    out = {f"{prefix}.{name}": v, f"{prefix}.{name}.final_hidden": official_order(hid)}
    if layers is not None:
        for i in range(n_layers):
            out[f"{prefix}.{name}.layer{i}_out"] = official_order(layers[i, 0])
    return out


def run_gen_single_step(ctx: Ctx, meta: dict, arr: dict) -> dict:
    P = meta["params"]
    t = float(P["t"])
    nl = ctx.cfg.llm.num_hidden_layers
    renorm_min = float(P.get("cfg_renorm_min", 0.0))
    out = {}
    cap = 1024

    # ---- text-to-image: cond = prompt; text_uncond = empty; img_uncond = prompt (same as cond).
    ids = ctx.tok.encode(P["t2i_prompt"])
    out["t2i.prompt_token_ids"] = np.array(ids)
    empty = ctx.new_cache(cap)
    _, cond, rope, info = ctx.text(empty, ids, 0)
    out.update(_ctx_text_layout("t2i.ctx_text.cond", info, 0, rope))
    out.update(_ctx_text_layout("t2i.ctx_text.cfg_img", info, 0, rope))
    hw = P["t2i_image_hw"]
    x_t = arr["t2i.x_t"]
    v, hid, layers, pos = ctx.velocity(cond, x_t, t, hw, rope, True)
    vt, hidt, _, _ = ctx.velocity(empty, x_t, t, hw, 0)
    out.update(_branch_outputs("t2i", "v_cond", v, hid, layers, nl))
    out.update(_branch_outputs("t2i", "v_text_uncond", vt, hidt, None, nl))
    n_lat = x_t.shape[0]
    out.update(_query_layout("t2i", "t2i.", n_lat, pos, dict(cond=rope, text_uncond=0, img_uncond=rope),
                             dict(cond=info["ids"].size, text_uncond=0, img_uncond=info["ids"].size), ctx.sp))
    emb, parts = ctx.bm.model.apply({"params": ctx.bm.params}, jnp.asarray(x_t), jnp.full((n_lat,), t),
                                    jnp.asarray(pos), True, method=Bagel.embed_latents)
    out.update({f"t2i.{k}": v_ for k, v_ in parts.items()})
    st, si = float(P["t2i_cfg_text_scale"]), float(P["t2i_cfg_img_scale"])
    # Plain T2I: the image-unconditional context equals the conditional one, so v_img = v.
    for rt in ("global", "channel", "text_channel"):
        out[f"t2i.v_cfg_{rt}"] = combine_cfg(v[None], vt[None], v[None], st, si, rt, renorm_min)[0]

    # ---- editing: cond = VAE + ViT + instruction; text_uncond = VAE + ViT; img_uncond = instruction.
    image = arr["edit.image_uint8"]
    px = ctx.preprocess(image, P, vae=True, vit=True)
    e = ctx.new_cache(cap)
    _, e, rope, vinfo = ctx.vae(e, px["vae"], arr["edit.vae_posterior_eps"], 0)
    out["edit.ctx0_vae.packed_vae_position_ids"] = vinfo["pos"]
    out["edit.ctx0_vae.newlens"] = np.array([vinfo["n"] + 2])
    out["edit.ctx0_vae.new_rope"] = np.array([rope])
    kv0 = vinfo["n"] + 2
    _, e, rope, tinfo = ctx.vit(e, px["vit"], rope)
    out["edit.ctx1_vit.packed_vit_position_ids"] = tinfo["pos"]
    out["edit.ctx1_vit.vit_token_seqlens"] = np.array([tinfo["n"]])
    out["edit.ctx1_vit.key_values_lens"] = np.array([kv0])
    out["edit.ctx1_vit.newlens"] = np.array([kv0 + tinfo["n"] + 2])
    out["edit.ctx1_vit.new_rope"] = np.array([rope])
    kv1, rope_img = kv0 + tinfo["n"] + 2, rope
    text_uncond = e
    ids = ctx.tok.encode(P["edit_instruction"])
    out["edit.instruction_token_ids"] = np.array(ids)
    _, cond, rope_c, info = ctx.text(e, ids, rope_img)
    out.update(_ctx_text_layout("edit.ctx2_text.cond", info, kv1, rope_c))
    _, img_uncond, rope_i, info_i = ctx.text(ctx.new_cache(cap), ids, 0)
    out.update(_ctx_text_layout("edit.ctx2_text.cfg_img", info_i, 0, rope_i))
    hw = px["vae"].shape[1:]
    x_t = arr["edit.x_t"]
    v, hid, layers, pos = ctx.velocity(cond, x_t, t, hw, rope_c, True)
    vt, hidt, _, _ = ctx.velocity(text_uncond, x_t, t, hw, rope_img)
    vi, hidi, _, _ = ctx.velocity(img_uncond, x_t, t, hw, rope_i)
    out.update(_branch_outputs("edit", "v_cond", v, hid, layers, nl))
    out.update(_branch_outputs("edit", "v_text_uncond", vt, hidt, None, nl))
    out.update(_branch_outputs("edit", "v_img_uncond", vi, hidi, None, nl))
    n_lat = x_t.shape[0]
    out.update(_query_layout("edit", "edit.", n_lat, pos, dict(cond=rope_c, text_uncond=rope_img, img_uncond=rope_i),
                             dict(cond=kv1 + len(info["ids"]), text_uncond=kv1, img_uncond=len(info_i["ids"])),
                             ctx.sp))
    emb, parts = ctx.bm.model.apply({"params": ctx.bm.params}, jnp.asarray(x_t), jnp.full((n_lat,), t),
                                    jnp.asarray(pos), True, method=Bagel.embed_latents)
    out.update({f"edit.{k}": v_ for k, v_ in parts.items()})
    st, si = float(P["edit_cfg_text_scale"]), float(P["edit_cfg_img_scale"])
    for rt in ("global", "channel", "text_channel"):
        out[f"edit.v_cfg_{rt}"] = combine_cfg(v[None], vt[None], vi[None], st, si, rt, renorm_min)[0]
    return out


def train_forward_inputs(ctx: Ctx, meta: dict, arr: dict):
    """The packed batch of the ``train_forward`` case: ``(PackedBatch, batch arrays, TrainNoise, layout)``.

    ``b`` is the official (logical) order; ``batch`` the same pack as expert streams (the training path);
    ``layout = (perm, (und_tokens, gen_tokens))`` maps stream positions back (``packing.unpermute_tokens``)
    and is the ``expert_split`` to pass to ``train_forward``."""
    P = meta["params"]
    t2i_tf = ImageTransform.from_dict(P["t2i_transform"]) if "t2i_transform" in P else None
    vit_tf = ImageTransform.from_dict(P["vit_transform"]) if "vit_transform" in P else None
    t_raw_all = list(np.asarray(arr["packed_timesteps"]))
    # The raw timestep of each noised image is recorded per token; take one per image, in order.
    t_iter = iter(t_raw_all)
    samples = []
    for i, s in enumerate(P["samples"]):
        img = load_image(arr[f"sample{i}.image_uint8"])
        kind = s["kind"]
        if kind == "vlm":
            pix = vit_tf(img) if vit_tf is not None else _pixels(img)
            samples.append([packing.VitItem(pix), packing.TextItem(ctx.tok.encode(s["question"])),
                            packing.TextItem(ctx.tok.encode(s["answer"]), loss=True)])
        elif kind == "t2i":
            pix = t2i_tf(img) if t2i_tf is not None else _pixels(img)
            h, w = pix.shape[1] // ctx.cfg.latent_downsample, pix.shape[2] // ctx.cfg.latent_downsample
            t_raw = next(t_iter)
            for _ in range(h * w - 1):
                next(t_iter)
            samples.append([packing.TextItem(ctx.tok.encode(s["caption"])),
                            packing.VaeItem(pix, loss=True, t_raw=float(t_raw))])
        else:
            raise CaseError(f"train_forward: unsupported sample kind {kind!r} (supported: vlm, t2i)")
    b = packing.pack([samples], ctx.sp, ctx.cfg)
    # The training path: the official (logical) packed order permuted into expert streams, each expert
    # run once on its own tokens; per-token outputs are put back in the official order to compare.
    und, gen = packing.expert_counts(b)
    _, U, G = packing.choose_stream_layout(und, gen, [b.shape[1]], steps=b.shape[1])
    streams, perm = packing.to_expert_streams(b, U, G)
    batch = {k: jnp.asarray(v) for k, v in streams.arrays().items()}
    noise = TrainNoise(jnp.asarray(nhwc(arr["vae_posterior_eps"])), jnp.asarray(arr["noise"]))
    return b, batch, noise, (perm, (U, G))


def run_train_forward(ctx: Ctx, meta: dict, arr: dict) -> dict:
    P = meta["params"]
    b, batch, noise, (perm, split) = train_forward_inputs(ctx, meta, arr)
    samples = P["samples"]
    loss, aux = train_forward(ctx.bm.model, ctx.bm.params, ctx.bm.vae, ctx.bm.vae_params, batch, noise,
                              ce_weight=float(P.get("ce_weight", 1.0)), mse_weight=float(P.get("mse_weight", 1.0)),
                              return_intermediates=True, expert_split=split, ce_chunk_tokens=CE_CHUNK)
    inter = dict(aux["intermediates"])
    B, L = b.shape
    inter["final_hidden"] = packing.unpermute_tokens(np.asarray(inter["final_hidden"]).reshape(B, L, -1),
                                                     perm).reshape(B * L, -1)
    inter["hidden"] = packing.unpermute_tokens(inter["hidden"], perm, axis=1)
    text_pos = np.nonzero(b.kind[0] == packing.KIND_TEXT)[0]
    out = dict(packed_text_ids=b.token_ids[0][text_pos], packed_text_indexes=text_pos,
               packed_position_ids=b.positions[0], packed_vit_position_ids=b.vit_pos,
               packed_vit_token_indexes=b.vit_dest, vit_token_seqlens=np.bincount(b.vit_seg)[1:],
               packed_vae_token_indexes=b.vae_dest, packed_latent_position_ids=b.vae_pos,
               mse_loss_indexes=b.vae_dest[b.vae_mse], packed_label_ids=b.ce_label, ce_loss_indexes=b.ce_index,
               ce_loss_weights=b.ce_reweight)
    mask = packing.dense_mask_np(b)[0]
    for s in range(len(samples)):
        idx = np.nonzero(b.seg[0] == s + 1)[0]
        out[f"attention_mask_sample{s}"] = mask[np.ix_(idx, idx)]
    out.update(padded_latent=nchw(inter["latents"]), packed_latent_clean=inter["packed_latent_clean"],
               timesteps_used=inter["timesteps_used"], time_embedding=inter["time_embedding"],
               vae2llm_out=inter["vae2llm"], vit_output=inter["vit_output"], final_hidden=inter["final_hidden"],
               mse_target=inter["mse_target"][b.vae_mse], mse_preds=inter["mse_preds"][b.vae_mse],
               mse_per_element=inter["mse_per_element"][b.vae_mse], ce_logits=inter["ce_logits"],
               ce_per_token=inter["ce_per_token"], ce_loss=np.array([aux["ce"]]), mse_loss=np.array([aux["mse"]]))
    w = b.ce_reweight
    out["ce_loss_reweighted"] = np.array([(np.asarray(inter["ce_per_token"]) * w).sum() / w.sum()])
    for i in range(inter["hidden"].shape[0]):
        out[f"layer{i}_out"] = inter["hidden"][i, 0]
    return out


RUNNERS: dict[str, Callable] = {
    "vae": run_vae,
    "vit": run_vit,
    "text": run_text,
    "gen_single_step": run_gen_single_step,
    "train_forward": run_train_forward,
}

try:  # the inference engine registers understanding / t2i_sampling / edit_sampling
    from .inference import verify_cases as _engine_cases

    RUNNERS.update(_engine_cases.RUNNERS)
except ImportError:  # pragma: no cover - engine not present
    pass

SAMPLING_ARRAYS = ("steps.", "final_latent", "decoded")


def tolerance(case: str, name: str, ref: np.ndarray) -> float:
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rtol = RTOL_SAMPLING if (case.endswith("_sampling") and name.startswith(SAMPLING_ARRAYS)) else RTOL_FORWARD
    return rtol * max(1.0, scale)


def compare(case: str, name: str, ours, ref) -> tuple[float, float, float, bool]:
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    if ours.shape != ref.shape:
        if ours.size == ref.size:
            ours = ours.reshape(ref.shape)
        else:
            return float("inf"), float("nan"), 0.0, False
    if ref.dtype == np.bool_ or np.issubdtype(ref.dtype, np.integer) and ref.dtype != np.uint8:
        err = float(np.max(np.abs(ours.astype(np.int64) - ref.astype(np.int64)))) if ref.size else 0.0
        return err, float(np.max(np.abs(ref))) if ref.size else 0.0, 0.0, err == 0
    if ref.dtype == np.uint8:
        err = float(np.max(np.abs(ours.astype(np.int64) - ref.astype(np.int64)))) if ref.size else 0.0
        return err, 255.0, 1.0, err <= 1
    ours = ours.astype(np.float64)
    ref = ref.astype(np.float64)
    err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    tol = tolerance(case, name, ref)
    return err, float(np.max(np.abs(ref))) if ref.size else 0.0, tol, bool(np.isfinite(err) and err <= tol)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bagel_jax.verify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", required=True, help="fixture folder (checkpoint + manifest.json + <case>.safetensors)")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: every case in the manifest)")
    ap.add_argument("--save-outputs", default=None, metavar="DIR",
                    help="also write DIR/<case>.safetensors with every array computed, under the manifest's names")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype of the Bagel model (bfloat16 reports errors without gating)")
    ap.add_argument("--attention", default="auto", choices=("auto",) + IMPLEMENTATIONS,
                    help="attention implementation of the decoder and the ViT (default auto: 'blocked' with a KV "
                         "cache or above %d keys, else 'xla')" % AUTO_BLOCKED_MIN_LEN)
    args = ap.parse_args(argv)

    mpath = os.path.join(args.fixtures, "manifest.json")
    if not os.path.isfile(mpath):
        print(f"error: {mpath} not found", file=sys.stderr)
        return 1
    with open(mpath) as f:
        manifest = json.load(f)
    all_cases = list(manifest.get("cases", {}))
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else all_cases
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    gate = args.dtype == "float32"
    ok = True
    try:
        ctx = Ctx(args.fixtures, manifest, dtype, args.attention)
    except Exception as e:
        print(f"error: cannot load the model from {args.fixtures}: {e}", file=sys.stderr)
        return 1
    if args.save_outputs:
        os.makedirs(args.save_outputs, exist_ok=True)
    print(f"{'case':<16} {'array':<48} {'max_abs_err':>12} {'ref_scale':>11} {'tol':>10}  status")
    for case in cases:
        if case not in manifest.get("cases", {}):
            print(f"{case:<16} cannot run: not in {mpath} (cases: {', '.join(all_cases)})")
            ok = False
            continue
        if case not in RUNNERS:
            print(f"{case:<16} cannot run: no runner for this case in this version of bagel_jax")
            ok = False
            continue
        meta = manifest["cases"][case]
        try:
            arr = load_file(os.path.join(args.fixtures, meta.get("file", f"{case}.safetensors")))
            ours = RUNNERS[case](ctx, meta, arr)
        except Exception as e:
            print(f"{case:<16} cannot run: {type(e).__name__}: {e}")
            if os.environ.get("BAGEL_VERIFY_DEBUG"):
                traceback.print_exc()
            ok = False
            continue
        saved = {}
        n_cmp = 0
        for name in sorted(ours):
            val = ours[name]
            if isinstance(val, tuple):      # (ours, reference) for values kept in the manifest, not the file
                val, ref = val
            elif name in arr:
                ref = arr[name]
            else:
                saved[name] = np.asarray(val)
                continue
            saved[name] = np.asarray(val)
            err, scale, tol, passed = compare(case, name, val, ref)
            n_cmp += 1
            status = ("PASS" if passed else "FAIL") if gate else "INFO"
            ok &= passed or not gate
            print(f"{case:<16} {name:<48} {err:>12.3e} {scale:>11.3e} {tol:>10.1e}  {status}")
        outputs = [k for k, v in meta.get("arrays", {}).items() if v.get("role") == "output"]
        missing = [k for k in outputs if k not in ours]
        if missing:
            print(f"{case:<16} cannot run fully: outputs not computed: {', '.join(missing)}")
            ok = False
        if args.save_outputs:
            save_file({k: _storable(v) for k, v in saved.items()}, os.path.join(args.save_outputs, f"{case}.safetensors"))
    print("verify:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def _storable(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.float64:
        return x.astype(np.float32)
    if x.dtype == np.int32:
        return x.astype(np.int64)
    return x


if __name__ == "__main__":
    sys.exit(main())
