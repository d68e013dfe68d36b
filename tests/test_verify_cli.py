"""The parity verifier on the shared tiny-a fixture (the acceptance command of the core issue)."""

import os
import subprocess
import sys

from conftest import REPO

CORE_CASES = "vae,vit,text,gen_single_step,train_forward"


def run_verify(*args):
    return subprocess.run([sys.executable, "-m", "bagel_jax.verify", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=1200)


def test_verify_every_case_passes(tiny_a, tmp_path):
    """The default run (every case of the manifest: the core cases plus understanding, t2i_sampling
    and edit_sampling through the inference engine)."""
    import json
    from bagel_jax.convert.safetensors_io import load_file
    manifest = json.load(open(os.path.join(tiny_a, "manifest.json")))
    cases = list(manifest["cases"])
    assert set(CORE_CASES.split(",")) <= set(cases)
    out_dir = tmp_path / "outputs"
    r = run_verify("--fixtures", tiny_a, "--save-outputs", str(out_dir))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    lines = [l for l in r.stdout.splitlines() if l.split()[:1] and l.split()[0] in cases]
    assert {l.split()[0] for l in lines} == set(cases)
    assert len(lines) > 200 and all(l.rstrip().endswith("PASS") for l in lines)
    # --save-outputs writes every output array of the manifest under its name
    for case in cases:
        saved = load_file(str(out_dir / f"{case}.safetensors"))
        outputs = [k for k, v in manifest["cases"][case]["arrays"].items() if v["role"] == "output"]
        assert outputs and all(k in saved for k in outputs), (case, set(outputs) - set(saved))


def test_verify_taylorseer_fixture_passes(tiny_a_taylorseer):
    """The official TaylorSeer run on tiny-a (step types per branch, every layer's output on full and
    Taylor steps, the latents) is reproduced: every array of the case compared and PASS."""
    import json
    manifest = json.load(open(os.path.join(tiny_a_taylorseer, "manifest.json")))
    r = run_verify("--fixtures", tiny_a_taylorseer)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for case, meta in manifest["cases"].items():
        lines = [l for l in r.stdout.splitlines() if l.split()[:1] == [case]]
        names = {l.split()[1] for l in lines}
        assert {k for k in meta["arrays"] if k.startswith("steps.")} <= names, case
        assert all(l.rstrip().endswith("PASS") for l in lines)


def test_verify_fails_on_unknown_case(tiny_a):
    """An unknown case fails the run; the known ones beside it still run (``text``: the cheapest real case)."""
    r = run_verify("--fixtures", tiny_a, "--cases", "text,nonexistent")
    assert r.returncode == 1
    assert "nonexistent" in r.stdout and "cannot run" in r.stdout
    assert any(l.startswith("text") and l.rstrip().endswith("PASS") for l in r.stdout.splitlines())


def test_verify_detects_a_wrong_model(tiny_a, tmp_path):
    """A fixture whose checkpoint has one perturbed tensor must FAIL (the verifier can fail)."""
    import shutil
    from bagel_jax.convert.safetensors_io import load_file, save_file
    d = tmp_path / "fx"
    shutil.copytree(tiny_a, d)
    t = load_file(str(d / "ema.safetensors"))
    t["language_model.model.layers.0.mlp.up_proj.weight"] *= 1.01
    save_file(t, str(d / "ema.safetensors"))
    r = run_verify("--fixtures", str(d), "--cases", "text")
    assert r.returncode == 1
    assert any(l.startswith("text") and "logits" in l and l.rstrip().endswith("FAIL") for l in r.stdout.splitlines())


def test_verify_attention_option(tiny_a):
    """--attention selects the implementation of the decoder and the ViT; a bad name is refused by argparse."""
    r = run_verify("--fixtures", tiny_a, "--cases", "text,vit", "--attention", "blocked")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "verify: PASS" in r.stdout
    r = run_verify("--fixtures", tiny_a, "--attention", "flash")
    assert r.returncode == 2 and "invalid choice: 'flash'" in r.stderr
