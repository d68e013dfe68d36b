"""Distil a 1/8-width draft for the demo model (docs/inference.md, speculative decoding); writes a Hugging Face Qwen2 folder.

The target is the shipped demo model (``bagel_jax/assets/demo``, hidden 128). Its greedy outputs in the bench's
setting (understanding think mode, no stop token, ``--new-tokens`` tokens) for ``--prompts`` synthetic-world
questions (never the bench's own prompt) are the training data; the draft (dense Qwen2, hidden 16 = 1/8, 2
layers, tied embeddings) learns next-token prediction on the draft's view of each sample: the context's text
blocks (what :class:`~bagel_jax.inference.draft_lm.LMDraft` prefills) followed by the generated ids. The result
is written as ``config.json`` + ``model.safetensors`` (Hugging Face names) + the demo tokenizer files, so the
bench loads it through :func:`~bagel_jax.inference.draft_lm.load_qwen2_draft` like any HF draft.

    PYTHONPATH=. nice -n 5 python bench/train_draft.py --out out/demo_draft     (a few minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bagel_jax.config import LLMConfig  # noqa: E402
from bagel_jax.convert import keymap  # noqa: E402
from bagel_jax.convert.safetensors_io import save_file  # noqa: E402
from bagel_jax.demo import synthetic  # noqa: E402
from bagel_jax.inference import api  # noqa: E402
from bagel_jax.inference.context import VLM_THINK_SYSTEM_PROMPT  # noqa: E402
from bagel_jax.inference.decode import generate_text  # noqa: E402
from bagel_jax.inference.speculative import _prompt_ids  # noqa: E402
from bagel_jax.models.qwen2_mot import Qwen2MoT, Routing, key_map  # noqa: E402
from bagel_jax.nn.attention import MaskVectors  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bagel_jax", "assets", "demo")
BENCH_PROMPT = "Describe a red circle on the left and a blue square on the right."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def think_context(pipe, questions):
    ctx = pipe.context(len(questions), track_cfg=False).add_text(VLM_THINK_SYSTEM_PROMPT, role="system")
    return ctx.add_text(list(questions))


def questions(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        objs = synthetic.sample_objs(rng, allow_held_out=True)
        q = (f"Describe {synthetic.captions(objs, rng)['short']}." if rng.random() < 0.6
             else synthetic.vqa(objs, rng)[0].capitalize())
        if q != BENCH_PROMPT:
            out.append(q)
    return out


def distil_data(pipe, qs, new_tokens: int, batch: int) -> list:
    seqs = []
    for i in range(0, len(qs), batch):
        ctx = think_context(pipe, qs[i:i + batch])
        r = generate_text(ctx, new_tokens, stop_tokens=[-1])
        seqs += [list(p) + [int(t) for t in ids] for p, ids in zip(_prompt_ids(ctx), r.token_ids)]
        print(f"  target outputs {len(seqs)}/{len(qs)}", flush=True)
    return seqs


def train(cfg: LLMConfig, seqs: list, steps: int, batch: int, lr: float, seed: int):
    T = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), T), np.int32)
    valid = np.zeros((len(seqs), T), np.float32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], valid[i, :len(s)] = s, 1
    model = Qwen2MoT(cfg)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (batch, T))

    def vec(v):
        return MaskVectors(v.astype(jnp.int32), pos, jnp.zeros_like(pos))

    params = model.init(jax.random.PRNGKey(seed), jnp.asarray(ids[:batch]), pos, vec(jnp.ones((batch, T))),
                        method=Qwen2MoT.init_all)["params"]
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(lr, steps), 0.01))
    state = opt.init(params)

    def loss_fn(p, x, v):
        h, _ = model.apply({"params": p}, model.apply({"params": p}, x, method=Qwen2MoT.embed), pos, vec(v),
                           Routing.und())
        logits = model.apply({"params": p}, h[:, :-1], method=Qwen2MoT.logits)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:])
        w = v[:, 1:]
        return jnp.sum(nll * w) / jnp.sum(w)

    @jax.jit
    def step(p, s, x, v):
        loss, g = jax.value_and_grad(loss_fn)(p, x, v)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    rng = np.random.default_rng(seed)
    for i in range(steps):
        idx = rng.integers(0, len(seqs), batch)
        params, state, loss = step(params, state, jnp.asarray(ids[idx]), jnp.asarray(valid[idx]))
        if i % 100 == 0 or i == steps - 1:
            print(f"  step {i}: loss {float(loss):.3f}", flush=True)
    return params


def write_hf_folder(cfg: LLMConfig, params, out: str, tokenizer_from: str) -> None:
    os.makedirs(out, exist_ok=True)
    hf = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
              num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
              vocab_size=cfg.vocab_size, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
              hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings,
              tie_word_embeddings=cfg.tie_word_embeddings, use_sliding_window=False, torch_dtype="float32")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    tensors = keymap.params_to_tensors(key_map(cfg), jax.device_get(params))
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, os.path.join(out, "model.safetensors"))
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tokenizer_from, name)):
            shutil.copy(os.path.join(tokenizer_from, name), out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.time()
    pipe = api.load(DEMO, dtype="float32")
    tcfg = pipe.engine.cfg.llm
    cfg = LLMConfig(hidden_size=tcfg.hidden_size // 8, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, intermediate_size=3 * tcfg.hidden_size // 8, vocab_size=tcfg.vocab_size,
                    rope_theta=tcfg.rope_theta, rms_norm_eps=tcfg.rms_norm_eps,
                    max_position_embeddings=tcfg.max_position_embeddings, tie_word_embeddings=True, qk_norm=False,
                    layer_module="Qwen2DecoderLayer")
    print(f"draft: hidden {cfg.hidden_size} (target {tcfg.hidden_size}), {cfg.num_hidden_layers} layers")
    cache = os.path.join(args.out, "distil_data.json")        # the target's outputs, reused by a rerun
    if os.path.isfile(cache):
        with open(cache) as f:
            seqs = json.load(f)
    else:
        seqs = distil_data(pipe, questions(args.prompts, args.seed), args.new_tokens, 32)
        os.makedirs(args.out, exist_ok=True)
        with open(cache, "w") as f:
            json.dump(seqs, f)
    params = train(cfg, seqs, args.steps, args.batch, args.lr, args.seed)
    write_hf_folder(cfg, params, args.out, DEMO)
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
