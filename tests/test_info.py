import os
import subprocess
import sys

from conftest import REPO


def info(path):
    r = subprocess.run([sys.executable, "-m", "bagel_jax.info", path], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_7b_ema_total_without_allocation():
    out = info("configs/bagel-7b-mot.yaml")
    assert out.strip().splitlines()[-1] == "ema_total=14607260128"


def test_info_on_folder_equals_file_contents(tiny_a):
    from bagel_jax.convert.safetensors_io import SafeTensorsFile
    import numpy as np
    f = SafeTensorsFile(os.path.join(tiny_a, "ema.safetensors"))
    n = sum(int(np.prod(f.shape(k))) for k in f.keys())
    assert info(tiny_a).strip().splitlines()[-1] == f"ema_total={n}"


def test_info_bad_path():
    r = subprocess.run([sys.executable, "-m", "bagel_jax.info", "nope.yaml"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "nope.yaml" in r.stderr
