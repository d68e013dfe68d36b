"""Fuzz tests of the safetensors reader and the config loader: random corruptions of valid files
(byte flips, truncation, header / field edits; fixed seeds). Every outcome must be either the same model (the
same tensors / a config equal to what the files now say) or a one-line error of our own type naming the file;
never another exception type and never a silently different result.

Not fuzzed: the tensor data bytes of a safetensors file. The format has no checksum, so a flipped data byte
is a different weight that no reader can tell from a real one; everything that says where and what the data
is (the length prefix and the JSON header) is fuzzed, and so is the file length."""

import json
import math
import os
import struct

import numpy as np
import pytest

from bagel_jax.config import ConfigError, load_config
from bagel_jax.convert.official import CheckpointError, check_file
from bagel_jax.convert.safetensors_io import DTYPES, SafeTensorsError, SafeTensorsFile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "bagel_jax", "assets", "demo")
N_CASES = 300


def _one_line_naming(e: BaseException, path: str) -> None:
    msg = str(e)
    assert "\n" not in msg and path in msg, msg


# -- safetensors ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae_file():
    """The demo VAE file split into (length prefix, header dict, data), with the key map and the expected
    parameter shapes the loader checks it against."""
    import jax.numpy as jnp

    from bagel_jax import loading
    from bagel_jax.models import flux_vae

    path = os.path.join(DEMO, "ae.safetensors")
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    cfg = load_config(DEMO).vae
    f = SafeTensorsFile(path)
    want = {k: (str(f.dtype(k)), f.shape(k), f.get(k).tobytes()) for k in f.keys()}
    return dict(raw=raw, n=n, header=json.loads(raw[8:8 + n]), data=raw[8 + n:], want=want,
                entries=flux_vae.key_map(cfg), shapes=loading.vae_param_shapes(flux_vae.AutoEncoder(cfg, dtype=jnp.float32)))


HOSTILE = [-1, -8, 0, 1, 2 ** 64, 1.5, "8", None, True, [], {}, [0], [1, 2, 3], math.nan]


def _edit_header(rng, header: dict) -> dict:
    """One JSON-level edit of a random entry: a hostile value in a field, a field removed, the offsets of
    another entry, a shifted span, another dtype, or an extra entry."""
    h = json.loads(json.dumps(header))
    names = sorted(k for k in h if k != "__metadata__")
    name = names[rng.integers(len(names))]
    e = h[name]
    op = rng.integers(8)
    if op == 0:
        e[rng.choice(["dtype", "shape", "data_offsets"])] = HOSTILE[rng.integers(len(HOSTILE))]
    elif op == 1:
        del e[rng.choice(["dtype", "shape", "data_offsets"])]
    elif op == 2:
        e["data_offsets"] = list(h[names[rng.integers(len(names))]]["data_offsets"])
    elif op == 3:
        d = int(rng.integers(-16, 17))
        e["data_offsets"] = [e["data_offsets"][0] + d, e["data_offsets"][1] + d]
    elif op == 4:
        e["dtype"] = rng.choice(list(DTYPES) + ["F8", "f32", ""])
    elif op == 5:
        e["shape"] = [int(rng.integers(0, 4))] + e["shape"]
    elif op == 6:
        h[name + ".extra"] = dict(e)
    else:
        h["__metadata__"] = HOSTILE[rng.integers(len(HOSTILE))]
    return h


def _corrupt_safetensors(rng, src) -> bytes:
    raw, n = src["raw"], src["n"]
    kind = rng.integers(4)
    if kind == 0:                                   # byte flips in the length prefix or the header
        b = bytearray(raw)
        for i in rng.integers(0, 8 + n, size=int(rng.integers(1, 4))):
            b[i] = int(rng.integers(256))
        return bytes(b)
    if kind == 1:                                   # truncation anywhere
        return raw[:int(rng.integers(0, len(raw)))]
    if kind == 2:                                   # a header edit, re-serialised with a right length prefix
        blob = json.dumps(_edit_header(rng, src["header"])).encode()
        return struct.pack("<Q", len(blob)) + blob + src["data"]
    blob = bytearray(raw[8:8 + n])                  # bytes inserted into / deleted from the header
    i = int(rng.integers(len(blob)))
    if rng.integers(2):
        del blob[i:i + int(rng.integers(1, 4))]
    else:
        blob[i:i] = bytes(rng.integers(0, 256, size=int(rng.integers(1, 4)), dtype=np.uint8))
    return struct.pack("<Q", len(blob)) + bytes(blob) + src["data"]


def test_fuzz_safetensors_reader(vae_file, tmp_path):
    rng = np.random.default_rng(17)
    path = str(tmp_path / "ae.safetensors")
    outcomes = {"error": 0, "same": 0}
    for case in range(N_CASES):
        with open(path, "wb") as f:
            f.write(_corrupt_safetensors(rng, vae_file))
        try:
            st = SafeTensorsFile(path)
            check_file(st, vae_file["entries"], vae_file["shapes"], path)   # what official.load_params checks
            for e in vae_file["entries"]:
                st.require_float(e.official)
            got = {k: (str(st.dtype(k)), st.shape(k), st.get(k).tobytes()) for k in st.keys()}
        except (SafeTensorsError, CheckpointError) as e:
            _one_line_naming(e, path)
            outcomes["error"] += 1
            continue
        assert got == vae_file["want"], f"case {case}: a corrupted file loaded as different tensors"
        outcomes["same"] += 1
    assert outcomes["error"] > N_CASES // 2 and outcomes["same"] > 0, outcomes   # the fuzzing bites, not only


# -- configs ----------------------------------------------------------------------------------------------
CONFIG_FILES = ("llm_config.json", "vit_config.json", "bagel_config.json", "inference.json")


def _as_loaded(cfg, fd) -> dict:
    """Loaded values as the files spell them (official overrides undone: the ViT json has one layer more)."""
    vit = {f: getattr(cfg.vit, f) for f in cfg.vit.__dataclass_fields__}
    vit["num_hidden_layers"] += 1
    vae = {f: list(v) if isinstance(v, tuple) else v for f, v in vars(cfg.vae).items()}
    bagel = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__ if f not in ("llm", "vit", "vae")}
    inf = {"image_size": list(fd["image_size"])} if "image_size" in fd else {}
    for k in ("vae_transform", "vit_transform"):
        if k in fd:
            inf[k] = vars(fd[k])
    return {"llm_config.json": {f: getattr(cfg.llm, f) for f in cfg.llm.__dataclass_fields__},
            "vit_config.json": vit, "bagel_config.json": dict(bagel, vae_config=vae), "inference.json": inf}


def _same_as_files(loaded: dict, files: dict) -> None:
    """Every field a file states is loaded as exactly that value (no casts: "128" never becomes 128, true
    never 1); the official overrides of llm_config.json are the exception (official app.py)."""
    override = {"qk_norm", "tie_word_embeddings", "layer_module"}
    for name, raw in files.items():
        have = loaded[name]
        for k, v in raw.items():
            if k in have and not (name == "llm_config.json" and k in override):
                got = have[k]
                if isinstance(v, dict):
                    for kk, vv in v.items():
                        if kk in got:
                            assert got[kk] == vv and type(got[kk]) is type(vv), (name, k, kk, vv, got[kk])
                    continue
                if name == "inference.json" and k == "image_size" and not isinstance(v, list):
                    v = [v, v]
                assert got == v and (type(got) is type(v) or isinstance(got, float) and type(v) is int), \
                    (name, k, v, got)


FIELD_VALUES = [0, 3, 7, 64, 1e-3, "silu", False]


def _corrupt_json(rng, text: str) -> bytes:
    """Byte flips, truncation, or one field set to a hostile or plausible value / removed."""
    kind = rng.integers(3)
    if kind == 0:
        b = bytearray(text.encode())
        for i in rng.integers(0, len(b), size=int(rng.integers(1, 3))):
            b[i] = int(rng.integers(256))
        return bytes(b)
    if kind == 1:
        return text.encode()[:int(rng.integers(0, len(text)))]
    d = json.loads(text)
    target = d
    if "vae_config" in d and rng.integers(2):
        target = d["vae_config"]
    elif any(isinstance(v, dict) for v in d.values()) and rng.integers(2):
        target = next(v for v in d.values() if isinstance(v, dict))
    key = sorted(target)[rng.integers(len(target))]
    if rng.integers(4) == 0:
        del target[key]
    else:
        pool = HOSTILE if rng.integers(2) else FIELD_VALUES
        target[key] = pool[rng.integers(len(pool))]
    return json.dumps(d).encode()


def test_fuzz_config_loader(tmp_path):
    from bagel_jax.inference.api import folder_defaults

    rng = np.random.default_rng(11)
    orig = {f: open(os.path.join(DEMO, f), encoding="utf-8").read() for f in CONFIG_FILES}
    folder = tmp_path / "model"
    folder.mkdir()
    outcomes = {"error": 0, "loaded": 0}
    for case in range(N_CASES):
        name = CONFIG_FILES[rng.integers(len(CONFIG_FILES))]
        for f, text in orig.items():
            (folder / f).write_text(text, encoding="utf-8")
        (folder / name).write_bytes(_corrupt_json(rng, orig[name]))
        try:
            cfg, fd = load_config(str(folder)), folder_defaults(str(folder))
        except ConfigError as e:
            _one_line_naming(e, str(folder))
            outcomes["error"] += 1
            continue
        files = {f: json.loads((folder / f).read_text(encoding="utf-8")) for f in CONFIG_FILES}
        _same_as_files(_as_loaded(cfg, fd), files)
        outcomes["loaded"] += 1
    assert outcomes["error"] > N_CASES // 3 and outcomes["loaded"] > 0, outcomes
