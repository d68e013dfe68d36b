"""bench/gpu_check.py on CPU (``--tiny``): the correctness part passes for every implementation, a part that runs
out of time is reported and sets the exit status, and the KV cache of bench/gpu_infer.py fits its image.

The default run covers the correctness part (~25 s); ``-m slow`` also runs every part (infer and train at tiny
shapes, with their profiles: a few minutes on a 2-core CPU).
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.py")


def run_check(tmp_path, *args, timeout=600):
    jsonl = tmp_path / "check.jsonl"
    proc = subprocess.run([sys.executable, SCRIPT, "--tiny", "--jsonl", str(jsonl), *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    rows = [json.loads(line) for line in open(jsonl)]
    return proc, rows


def test_tiny_correctness_part_passes_every_implementation(tmp_path):
    proc, rows = run_check(tmp_path, "--parts", "correctness")
    assert proc.returncode == 0, proc.stdout[-3000:]
    checks = [r for r in rows if r["what"] == "correctness"]
    assert {(r["shape"], r["impl"]) for r in checks} == {
        (s, i) for s in ("vit-tiny", "decoder-tiny")
        for i in ("xla", "blocked", "pallas", "cudnn (dense sdpa on CPU)")}
    for r in checks:
        assert r["ok"] and r["dead_rows_zero"], r
        assert max(r["rel_err"].values()) <= 2e-2
    assert [r["status"] for r in rows if r["what"] == "part"] == ["ok"]
    assert rows[0]["what"] == "environment" and rows[0]["tiny"] is True
    assert "| correctness decoder-tiny pallas | ok" in proc.stdout


def test_a_part_out_of_time_is_reported_and_fails_the_run(tmp_path):
    proc, rows = run_check(tmp_path, "--parts", "infer", "--limit", "infer=1")
    assert proc.returncode == 2, proc.stdout[-3000:]
    part = [r for r in rows if r["what"] == "part"]
    assert [(r["part"], r["status"]) for r in part] == [("infer", "timeout after 1 s")]


def test_infer_context_fits_the_image(monkeypatch):
    """1024 px at BAGEL-7B's VAE needs 4,096 latents + 2 markers after the prompt (the H200 run needed 4,151
    slots and had 4,096); the bench sizes the cache from the image."""
    monkeypatch.syspath_prepend(REPO)
    from bench.gpu_infer import PROMPT, context_slots
    from bagel_jax import layout
    from bagel_jax.config import config_from_yaml
    from bagel_jax.tokenizer import load_tokenizer

    cfg = config_from_yaml(os.path.join(REPO, "configs", "bagel-7b-mot.yaml"))
    tok = load_tokenizer(os.path.join(REPO, "bagel_jax", "assets", "demo"))
    prompt = layout.text_block(len(tok.encode(PROMPT))).length
    for size, decode in ((1024, 256), (512, 256), (256, 2000)):
        need = prompt + max(layout.vae_block(size, size, cfg.latent_downsample, noised=True).length, decode)
        got = context_slots(cfg, tok, size, decode)
        assert need <= got < need + 256 and got % 256 == 0
    assert context_slots(cfg, tok, 1024, 256) > 4151


@pytest.mark.slow
def test_tiny_every_part(tmp_path):
    proc, rows = run_check(tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert [(r["part"], r["status"]) for r in rows if r["what"] == "part"] == [
        ("correctness", "ok"), ("infer", "ok"), ("train", "ok")]
    assert {r["what"] for r in rows} >= {"t2i", "decode", "train", "profile"}
    profiles = [r["of"] for r in rows if r["what"] == "profile"]
    assert any(p.startswith("flow step") for p in profiles) and any(p.startswith("decode step") for p in profiles)
    assert any(p.startswith("train_step") for p in profiles)
    assert all(r["top"] for r in rows if r["what"] == "profile")
