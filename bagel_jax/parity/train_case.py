"""Runner of ``train_forward``: one packed training batch through the training forward.

The batch is built as the trainer builds it: each sample of ``params["samples"]`` becomes the official
sequence plan of its kind (the dataset plans of :mod:`bagel_jax.data.datasets`), then
:func:`~bagel_jax.data.datasets.plan_to_items` and :func:`~bagel_jax.data.packing.pack` (all samples in
one row, in the manifest's order), the expert-stream layout, and
:func:`~bagel_jax.train.forward.train_forward` with the recorded noise and raw timesteps.

Sample descriptions (``kind`` and its fields; images are the arrays ``sample<i>.image_uint8`` for a
one-image sample or ``sample<i>.image<k>_uint8``, k = 0, 1, ...):

* ``t2i``: ``caption``; the image (``t2i_transform``) is the noised target;
* ``vlm``: ``question`` + ``answer`` (the image first), or ``conversations`` (``[{from, value}]`` with
  ``<image>`` tags); images through ``vit_transform``;
* ``text``: ``conversations``, or ``question`` + ``answer``; no image;
* ``edit``: ``instructions`` (one per step, a step's text as the trainer chose it); pictures ``0 ..
  len(instructions)``: the source (clean VAE + ViT), intermediate targets (noised, then clean VAE + ViT)
  and the final target; ``edit_vae_transform`` / ``edit_vit_transform`` (default ``t2i_transform`` /
  ``vit_transform``).

A transform that is absent means the image is used as given. Conditional dropout must be 0
(``cond_dropout_probs``): the fixture does not record its draws.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..data import datasets, packing
from ..images import load_image, to_tensor
from ..train.forward import TrainNoise, train_forward
from .common import CaseError, Fixture, nchw, nhwc

CE_CHUNK = 8   # CE tokens per chunk: small, so the fixture's CE runs in several chunks
# one program for the whole forward (op-by-op dispatch of the same function takes twice as long on CPU)
jit_train_forward = jax.jit(train_forward, static_argnames=("model", "vae", "ce_loss_reweighting",
                                                            "collect", "expert_split", "ce_chunk_tokens"))
KINDS = ("text", "vlm", "t2i", "edit")


def _images(arr: dict, i: int) -> list:
    if f"sample{i}.image_uint8" in arr:
        return [arr[f"sample{i}.image_uint8"]]
    out = []
    while f"sample{i}.image{len(out)}_uint8" in arr:
        out.append(arr[f"sample{i}.image{len(out)}_uint8"])
    return out


def _tensor(fx: Fixture, P: dict, keys, image, img_num: int = 1) -> np.ndarray:
    """``[3, H, W]`` of a uint8 image through the first transform of ``keys`` in the params (else as given)."""
    img = load_image(image)
    for k in keys:
        tf = fx.transform(P, k)
        if tf is not None:
            return tf(img, img_num)
    return to_tensor(img)


def sample_plan(fx: Fixture, P: dict, i: int, s: dict, arr: dict) -> list:
    """The official sequence plan of sample ``i`` (described by ``s``) from the trainer's dataset plans."""
    kind, enc, imgs = s.get("kind"), fx.tok.encode, _images(arr, i)
    if kind == "t2i":
        if len(imgs) != 1:
            raise CaseError(f"train_forward sample {i} (t2i): expected one image array, found {len(imgs)}")
        return datasets.t2i_plan(enc(s["caption"]), _tensor(fx, P, ("t2i_transform",), imgs[0]))
    if kind in ("vlm", "text"):
        conv = s.get("conversations")
        if conv is None:
            tag = "<image>" * len(imgs)
            conv = [{"from": "human", "value": tag + s["question"]}, {"from": "gpt", "value": s["answer"]}]
        if (kind == "text") != (not imgs):
            raise CaseError(f"train_forward sample {i} ({kind}): {len(imgs)} image arrays")
        px = [_tensor(fx, P, ("vit_transform",), im, max(1, len(imgs))) for im in imgs]
        return datasets.vlm_plan(conv, px, enc)
    if kind == "edit":
        steps = list(s["instructions"])
        if len(imgs) != len(steps) + 1:
            raise CaseError(f"train_forward sample {i} (edit): {len(steps)} instructions need "
                            f"{len(steps) + 1} images, found {len(imgs)}")
        return datasets.edit_plan(lambda k: _tensor(fx, P, ("edit_vae_transform", "t2i_transform"), imgs[k]),
                                  lambda k: _tensor(fx, P, ("edit_vit_transform", "vit_transform"), imgs[k]),
                                  [enc(t) for t in steps])
    raise CaseError(f"train_forward sample {i}: unsupported kind {kind!r} (supported: {', '.join(KINDS)})")


@dataclasses.dataclass
class TrainInputs:
    packed: packing.PackedBatch      # logical (official) order
    batch: dict                      # the same pack as expert streams (device arrays): the training layout
    noise: TrainNoise
    perm: np.ndarray                 # stream position -> logical position (packing.unpermute_tokens)
    split: tuple[int, int]           # (und_tokens, gen_tokens): train_forward's expert_split
    items: list                      # packing items of each sample


def inputs(fx: Fixture, meta: dict, arr: dict, rng: Optional[np.random.Generator] = None) -> TrainInputs:
    """The packed batch of a ``train_forward`` case with the recorded raw timesteps and noise."""
    P = meta["params"]
    drop = {k: float(v) for k, v in P.get("cond_dropout_probs", {}).items()}
    if any(drop.values()):
        raise CaseError(f"train_forward: conditional dropout {drop} is random and not recorded; it must be 0")
    rng = np.random.default_rng(0) if rng is None else rng
    items = [datasets.plan_to_items(sample_plan(fx, P, i, s, arr), rng, datasets.Dropout(0.0, 0.0, 0.0))
             for i, s in enumerate(P["samples"])]
    b = packing.pack([items], fx.sp, fx.cfg)
    if b.vae_t_raw.size:   # the raw timestep of each latent token as recorded (-inf: clean)
        t_raw = np.asarray(arr["packed_timesteps"], np.float32)
        if t_raw.shape != b.vae_t_raw.shape or not np.array_equal(np.isfinite(t_raw), b.vae_mse):
            raise CaseError(f"train_forward: packed_timesteps {t_raw.shape} (noised tokens "
                            f"{int(np.isfinite(t_raw).sum())}) does not match the samples' latent tokens "
                            f"{b.vae_t_raw.shape} (noised {int(b.vae_mse.sum())})")
        b = dataclasses.replace(b, vae_t_raw=t_raw)
    und, gen = packing.expert_counts(b)
    _, U, G = packing.choose_stream_layout(und, gen, [b.shape[1]], steps=b.shape[1])
    streams, perm = packing.to_expert_streams(b, U, G)
    batch = {k: jnp.asarray(v) for k, v in streams.arrays().items()}
    n_lat, D = b.vae_src.shape[0], fx.cfg.patch_latent_dim
    eps = nhwc(arr["vae_posterior_eps"]) if "vae_posterior_eps" in arr else np.zeros((0, 1, 1, 1), np.float32)
    flow = np.asarray(arr["noise"], np.float32) if "noise" in arr else np.zeros((n_lat, D), np.float32)
    if flow.shape != (n_lat, D) or eps.shape[0] != b.vae_images.shape[0]:
        raise CaseError(f"train_forward: noise {flow.shape} / vae_posterior_eps {eps.shape[0]} images do not "
                        f"match the batch's {n_lat} latent tokens / {b.vae_images.shape[0]} VAE images")
    return TrainInputs(b, batch, TrainNoise(jnp.asarray(eps), jnp.asarray(flow)), perm, (U, G), items)


def run_train_forward(fx: Fixture, meta: dict, arr: dict) -> dict:
    P = meta["params"]
    ti = inputs(fx, meta, arr)
    b, perm = ti.packed, ti.perm
    loss, aux = jit_train_forward(fx.bm.model, fx.bm.params, fx.bm.vae, fx.bm.vae_params, ti.batch, ti.noise,
                              ce_weight=float(P.get("ce_weight", 1.0)), mse_weight=float(P.get("mse_weight", 1.0)),
                              collect=True, expert_split=ti.split, ce_chunk_tokens=CE_CHUNK)
    inter = dict(aux["intermediates"])
    B, L = b.shape
    final = packing.unpermute_tokens(np.asarray(inter["final_hidden"]).reshape(B, L, -1), perm)[0]
    hidden = packing.unpermute_tokens(inter["hidden"], perm, axis=1)
    text_pos = np.nonzero(b.kind[0] == packing.KIND_TEXT)[0]
    out = dict(packed_text_ids=b.token_ids[0][text_pos], packed_text_indexes=text_pos,
               packed_position_ids=b.positions[0], packed_label_ids=b.ce_label, ce_loss_indexes=b.ce_index,
               ce_loss_weights=b.ce_reweight, final_hidden=final, ce_logits=inter["ce_logits"],
               ce_per_token=inter["ce_per_token"], ce_loss=np.array([aux["ce"]]))
    w = b.ce_reweight
    out["ce_loss_reweighted"] = np.array([(np.asarray(inter["ce_per_token"]) * w).sum() / max(w.sum(), 1e-30)])
    if b.vit_patches.shape[0]:
        out.update(packed_vit_position_ids=b.vit_pos, packed_vit_token_indexes=b.vit_dest,
                   vit_token_seqlens=np.bincount(b.vit_seg)[1:], vit_output=inter["vit_output"][0])
    if b.vae_src.shape[0]:
        m = b.vae_mse
        ds = fx.cfg.latent_downsample
        out.update(packed_vae_token_indexes=b.vae_dest, packed_latent_position_ids=b.vae_pos,
                   mse_loss_indexes=b.vae_dest[m], padded_latent=nchw(inter["latents"]),
                   patchified_vae_latent_shapes=np.array([(it.image.shape[1] // ds, it.image.shape[2] // ds)
                                                          for s in ti.items for it in s
                                                          if isinstance(it, packing.VaeItem)]),
                   packed_latent_clean=inter["packed_latent_clean"], timesteps_used=inter["timesteps_used"],
                   time_embedding=inter["time_embedding"], vae2llm_out=inter["vae2llm_out"],
                   mse_target=inter["mse_target"][m], mse_preds=inter["mse_preds"][m],
                   mse_per_element=inter["mse_per_element"][m], mse_loss=np.array([aux["mse"]]))
    mask = packing.dense_mask_np(b)[0]
    for s in range(len(P["samples"])):
        idx = np.nonzero(b.seg[0] == s + 1)[0]
        out[f"attention_mask_sample{s}"] = mask[np.ix_(idx, idx)]
    for i in range(hidden.shape[0]):
        out[f"layer{i}_out"] = hidden[i, 0]
    return out


RUNNERS = {"train_forward": run_train_forward}
