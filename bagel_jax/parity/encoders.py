"""Runners of the single-pass cases: ``vae`` (the autoencoder), ``vit`` (SigLIP + connector) and ``text``
(the language model on text alone).

``vit`` packs its images with the trainer's packing (:func:`bagel_jax.data.packing.pack`, one sample
per image) and runs :meth:`Bagel.embed_vit` on the pack, as the training forward does. ``text`` runs
the engine's text prefill (:func:`bagel_jax.inference.blocks.text_chunk`, one row per prompt, empty cache).
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from ..data import packing
from ..images import load_image, to_tensor
from ..inference import blocks
from ..inference.kv_cache import KVCache
from ..models import flux_vae
from ..models.bagel import Bagel
from ..nn import intermediates
from .common import CaseError, Fixture, nchw, nhwc


def run_vae(fx: Fixture, meta: dict, arr: dict) -> dict:
    vae, vp, vcfg = fx.bm.vae, fx.bm.vae_params, fx.cfg.vae
    moments, inter = intermediates.apply(vae, {"params": vp}, nhwc(arr["image"]),
                                         method=flux_vae.AutoEncoder.encode_moments)
    C = vcfg.z_channels
    out = dict(encoder_moments=nchw(moments), posterior_mean=nchw(moments[..., :C]),
               posterior_logvar=nchw(moments[..., C:]), encoder_mid_out=nchw(inter["encoder_mid_out"]))
    z_mean = flux_vae.latent_from_moments(moments, vcfg)
    z_samp = flux_vae.latent_from_moments(moments, vcfg, nhwc(arr["posterior_eps"]))
    out["latent_from_mean"], out["latent_sampled"] = nchw(z_mean), nchw(z_samp)
    for name, z in (("from_mean", z_mean), ("from_sampled", z_samp)):
        dec, inter = intermediates.apply(vae, {"params": vp}, z, method=flux_vae.AutoEncoder.decode)
        out[f"decoded_{name}"] = nchw(dec)
        out[f"decoder_conv_in_out_{name}"] = nchw(inter["decoder_conv_in_out"])
        out[f"decoder_mid_out_{name}"] = nchw(inter["decoder_mid_out"])
    return out


_IMAGE = re.compile(r"^image(\d*)_uint8$")


def image_packs(params: dict, arr: dict) -> list[list[str]]:
    """The image packs of a ``vit`` case: ``params["packs"]`` (lists of array names), else one pack of
    every ``image_uint8`` / ``image<k>_uint8`` array (in ``k`` order)."""
    if "packs" in params:
        packs = [list(p) for p in params["packs"]]
        missing = [n for p in packs for n in p if n not in arr]
        if missing or not all(packs):
            raise CaseError(f"vit: packs {packs} name arrays not in the case file: {missing} (or an empty pack)")
        return packs
    names = sorted((n for n in arr if _IMAGE.match(n)), key=lambda n: int(_IMAGE.match(n).group(1) or -1))
    if not names:
        raise CaseError("vit: no image_uint8 / image<k>_uint8 array and no 'packs' parameter")
    return [names]


def _vit_pack(fx: Fixture, params: dict, images: list) -> dict:
    """Embeddings and layout arrays of one pack of images (one packed sample per image)."""
    tf = fx.transform(params, "vit_transform")
    Gv = int(params.get("vit_max_num_patch_per_side", fx.cfg.vit_max_num_patch_per_side))
    if Gv != fx.cfg.vit_max_num_patch_per_side:
        raise CaseError(f"vit: vit_max_num_patch_per_side {Gv} differs from the model's "
                        f"{fx.cfg.vit_max_num_patch_per_side}")
    pixels = [tf(load_image(im)) if tf is not None else to_tensor(load_image(im)) for im in images]
    b = packing.pack([[[packing.VitItem(px)] for px in pixels]], fx.sp, fx.cfg)
    emb, extra = intermediates.apply(fx.bm.model, {"params": fx.bm.params}, jnp.asarray(b.vit_patches)[None],
                                     jnp.asarray(b.vit_pos)[None], jnp.asarray(b.vit_seg)[None], method=Bagel.embed_vit)
    lens = np.bincount(b.vit_seg)[1:]
    text_pos = np.nonzero(b.kind[0] == packing.KIND_TEXT)[0]
    out = dict(packed_vit_tokens=b.vit_patches, packed_vit_position_ids=b.vit_pos, vit_token_seqlens=lens,
               cu_seqlens=np.concatenate([[0], np.cumsum(lens)]), packed_text_ids=b.token_ids[0][text_pos],
               packed_text_indexes=text_pos, packed_vit_token_indexes=b.vit_dest,
               packed_position_ids=b.positions[0], packed_seqlens=np.bincount(b.seg[0])[1:],
               packed_indexes=np.arange(b.shape[1]), vit_embeddings=extra["vit_embeddings"][0],
               vit_output=extra["vit_output"][0], connector_output=extra["connector_output"][0],
               vit_pos_embed=np.asarray(fx.bm.params["vit_pos_embed"]["pos_embed"])[b.vit_pos],
               llm_input_embeds=emb[0])
    for i in range(extra["vit_layers"].shape[0]):
        out[f"vit_layer{i}_out"] = extra["vit_layers"][i, 0]
    return out


def run_vit(fx: Fixture, meta: dict, arr: dict) -> dict:
    params = meta.get("params", {})
    packs = image_packs(params, arr)
    out = {}
    for j, names in enumerate(packs):
        prefix = f"pack{j}." if len(packs) > 1 else ""
        out.update({prefix + k: v for k, v in _vit_pack(fx, params, [arr[n] for n in names]).items()})
    ex = meta.get("resize_example")
    tf = fx.transform(params, "vit_transform")
    if ex is not None and tf is not None and "resize_example.image_uint8" in arr:
        rimg = load_image(arr["resize_example.image_uint8"])
        w, h = tf.target_size(*rimg.size)
        out["resize_example.output_hw"] = (np.array([h, w]), np.array(ex["output_hw"]))
        mean = tf(rimg).reshape(3, -1).mean(axis=1)   # of the normalised [-1, 1] tensor
        out["resize_example.output_channel_mean"] = (mean, np.array(ex["output_channel_mean"], np.float32))
    return out


def run_text(fx: Fixture, meta: dict, arr: dict) -> dict:
    sp = fx.sp
    seqs = [[sp.bos] + fx.tok.encode(p) + [sp.eos] for p in meta["params"]["prompts"]]
    n = np.array([len(s) for s in seqs])
    B, Lq = len(seqs), int(n.max())
    ids = np.zeros((B, Lq), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    m, params = fx.bm.model, fx.bm.params
    cache = KVCache.empty(fx.cfg.llm, B, Lq, jnp.float32)
    pos = np.broadcast_to(np.arange(Lq, dtype=np.int32), (B, Lq))
    h, _, inter = blocks.text_chunk(m, params, cache, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(n, jnp.int32),
                                    True, True)
    hidden = inter["hidden"]
    x = m.apply({"params": params}, jnp.asarray(ids), method=Bagel.embed_text)
    logits = m.apply({"params": params}, h, method=Bagel.lm_logits)
    packed = lambda a: np.concatenate([np.asarray(a)[i, :k] for i, k in enumerate(n)])   # rows back to back
    out = dict(text_token_lens=n, packed_text_ids=packed(ids), packed_text_position_ids=packed(pos),
               packed_text_indexes=np.arange(n.sum()), packed_key_value_indexes=np.arange(0),
               key_values_lens=np.zeros(B, np.int64), input_embeds=packed(x), final_hidden=packed(h),
               logits=packed(logits))
    for i in range(hidden.shape[0]):
        out[f"layer{i}_out"] = packed(hidden[i])
    return out


RUNNERS = {"vae": run_vae, "vit": run_vit, "text": run_text}
