"""Hostile input, inference side: it gets a clear one-line error (exit status 2 on the CLI, before the model is
loaded) or correct behaviour. One test per kind of bad input (or per group sharing a mechanism); the CLI tests
stub the model load, so they cost no compute."""

import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import sample  # noqa: E402
from bagel_jax.cli import sample as sample_program  # noqa: E402  (the program behind sample.main)
from bagel_jax.config import ConfigError, load_config  # noqa: E402
from bagel_jax.convert.safetensors_io import DTYPES, SafeTensorsError, SafeTensorsFile, save_file  # noqa: E402
from bagel_jax.images import load_image, to_rgb  # noqa: E402
from bagel_jax.inference.api import folder_defaults  # noqa: E402
from bagel_jax.inference.cfg import ImageParams  # noqa: E402
from bagel_jax.inference.context import MAX_SEED, ContextError, seed_key  # noqa: E402
from bagel_jax.inference.conversation import check_interleave, sampling  # noqa: E402

DEMO = sample.DEMO_MODEL


@pytest.fixture
def no_load(monkeypatch):
    """sample._load replaced by a stub that fails the test if it is reached (checks come first)."""
    def boom(args):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(sample_program, "_load", boom)


@pytest.fixture
def png(tmp_path):
    p = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(p)
    return str(p)


def _cli(capsys, *argv):
    rc = sample.main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


# -- rows 3, 4: sampling settings finite and in range ---------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("cfg_text_scale", math.inf), ("cfg_text_scale", math.nan), ("cfg_img_scale", math.inf),
    ("cfg_img_scale", math.nan), ("timestep_shift", math.inf), ("timestep_shift", 0.0), ("cfg_renorm_min", math.nan),
    ("cfg_renorm_min", 1.5), ("cfg_text_scale", -1.0), ("num_timesteps", 1), ("num_timesteps", 2.5),
    ("cfg_interval", (0.0, math.nan)), ("cfg_interval", (0.6, 0.2)), ("cfg_interval", (-0.1, 1.0)),
])
def test_image_params_refuse_non_finite_and_out_of_range(field, value):
    for edit in (False, True):
        with pytest.raises(ValueError, match=field) as e:
            ImageParams.fill(edit, **{field: value})
        assert "\n" not in str(e.value)
    assert ImageParams.fill(True, cfg_img_scale=1.5).cfg_img_scale == 1.5   # in range: kept


@pytest.mark.parametrize("kw,field", [(dict(temperature=math.nan), "temperature"),
                                      (dict(temperature=math.inf), "temperature"),
                                      (dict(top_p=math.inf), "top_p"), (dict(top_k=1.5), "top_k")])
def test_text_sampling_refuses_non_finite(kw, field):
    args = dict(do_sample=True, temperature=0.3, top_k=0, top_p=1.0)
    args.update(kw)
    with pytest.raises(ValueError, match=field):
        sampling(**args)


@pytest.mark.parametrize("cmd,flags,field", [
    ("generate", ["--cfg-text-scale", "inf"], "cfg_text_scale"),
    ("generate", ["--cfg-text-scale", "nan"], "cfg_text_scale"),
    ("edit", ["--cfg-img-scale", "inf"], "cfg_img_scale"),
    ("edit", ["--cfg-img-scale", "nan"], "cfg_img_scale"),
    ("generate", ["--timestep-shift", "inf"], "timestep_shift"),
    ("interleave", ["--cfg-interval", "0", "nan"], "cfg_interval"),
    ("chat", ["--num-timesteps", "1"], "num_timesteps"),
    ("understand", ["--temperature", "nan", "--do-sample"], "temperature"),
    ("generate", ["--top-p", "inf"], "top_p"),
    ("understand", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("generate", ["--image-size", "0"], "--image-size"),
    ("edit", ["--vae-transform", "16,32,16"], "min_image_size"),
])
def test_cli_bad_numbers_exit_2_before_load(capsys, no_load, png, tmp_path, cmd, flags, field):
    need = {"generate": ["--prompt", "p"], "edit": ["--prompt", "p", "--image", png],
            "interleave": ["--prompt", "p"], "chat": [], "understand": ["--question", "q"]}[cmd]
    rc, err = _cli(capsys, cmd, "--model-path", DEMO, "--out", str(tmp_path / "o"), *need, *flags)
    assert rc == 2 and err.startswith("error: ") and field in err and "\n" not in err


# -- row 6: --out checked before any compute; results written as they come --------------------------------------
def test_out_not_writable_exit_2_before_load(capsys, no_load, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    for out in (f, f / "sub"):
        rc, err = _cli(capsys, "generate", "--model-path", DEMO, "--prompt", "p", "--out", str(out))
        assert rc == 2 and "--out" in err and "\n" not in err
    if os.geteuid() != 0:   # root writes into read-only folders anyway
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        rc, err = _cli(capsys, "generate", "--model-path", DEMO, "--prompt", "p", "--out", str(ro))
        assert rc == 2 and "--out" in err


class _FakePipe:
    """Stands in for the loaded Pipeline: interleave emits items through on_item and records what the
    transcript folder held at each step; conversation returns a _FakeConv."""

    default_image_size = (32, 32)

    def __init__(self, out):
        self.out, self.seen, self.kw = out, [], {}

    def interleave(self, inputs, on_item=None, **kw):
        from bagel_jax.inference.conversation import InterleaveResult

        self.kw = dict(kw, inputs=inputs)
        items = [("text", "once upon a time"), ("image", Image.new("RGB", (32, 32), (255, 0, 0)))]
        for it in items:
            on_item(it)
            self.seen.append((sorted(os.listdir(self.out)),
                              open(os.path.join(self.out, "transcript.md"), encoding="utf-8").read()))
        return InterleaveResult(items, RuntimeError("stopped") if kw.get("num_images") == 7 else None)

    def conversation(self, **kw):
        self.conv = _FakeConv()
        return self.conv


class _FakeConv:
    def __init__(self):
        self.calls, self.history, self.last_thinking = [], [], None

    @property
    def has_image(self):
        return any(k == "image" for _, k, _ in self.history)

    def add_image(self, im):
        self.history.append(("user", "image", load_image(im)))   # the real reader: a bad path raises ImageError

    def ask(self, q, **kw):
        self.calls.append(("ask", q))
        return "an answer"

    def generate_image(self, prompt, **kw):
        self.calls.append(("gen", prompt))
        img = Image.new("RGB", (32, 32))
        self.history.append(("assistant", "image", img))
        return img

    def edit(self, prompt, **kw):
        self.calls.append(("edit", prompt))
        img = Image.new("RGB", (32, 32))
        self.history.append(("assistant", "image", img))
        return img


def test_interleave_writes_each_item_as_it_exists(monkeypatch, tmp_path, capsys):
    out = tmp_path / "il"
    pipe = _FakePipe(str(out))
    monkeypatch.setattr(sample_program, "_load", lambda args: pipe)
    rc = sample.main(["interleave", "--model-path", DEMO, "--prompt", "a story", "--num-images", "7",
                      "--out", str(out)])
    assert rc == 1                                        # the injected failure after the items
    (files1, md1), (files2, md2) = pipe.seen
    assert "once upon a time" in md1 and "image_01.png" not in files1
    assert "image_01.png" in files2 and "![image 1](image_01.png)" in md2
    assert "RuntimeError: stopped" in (out / "transcript.md").read_text(encoding="utf-8")


# -- row 8, 9: safetensors headers --------------------------------------------------------------------------
def _write_raw(path, header, data: bytes, raw_header: bytes = None):
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
    return str(path)


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header,raw,why", [
    ({"w": _entry(offsets=(-8, 0))}, None, "0 <= begin"),
    ({"w": _entry(offsets=(8, 0))}, None, "0 <= begin <= end"),
    ({"w": _entry(shape=(6,), offsets=(0, 24))}, None, "run past the end"),
    ({"w": _entry(shape=(3,))}, None, "needs 12"),
    ({"w": _entry(), "b": _entry(offsets=(4, 12), shape=(2,))}, None, "overlap"),
    ({"w": _entry(), "b": _entry(offsets=(12, 16), shape=(1,))}, None, "belong to no tensor"),
    ({"w": _entry()}, None, "cover 8 bytes of data, the file holds 16"),
    ({"w": {"shape": [2], "data_offsets": [0, 8]}}, None, "dtype, shape and data_offsets"),
    ({"w": _entry(offsets=("0", "8"))}, None, "data_offsets must be"),
    ({"w": _entry(shape=(2.0,))}, None, "shape must be"),
    ({"w": _entry(shape=(True, 2))}, None, "shape must be"),
    ({"w": _entry(dtype="F8_E4M3")}, None, "supported: F64, F32, F16, BF16, I64"),
    ({"w": 3}, None, "must be an object"),
    (None, b"\xff\xfe not utf-8 ", "not UTF-8"),
    (None, b'[1, 2, 3]', "not an object"),
    (None, b'{"w": {"dtype": "F32", ', "corrupt safetensors header"),
    (None, b'{"w": {}, "w": {}}', "duplicate name"),
    ({"__metadata__": [1], "w": _entry()}, None, "__metadata__"),
])
def test_safetensors_header_refused_with_file_name(tmp_path, header, raw, why):
    path = _write_raw(tmp_path / "bad.safetensors", header, np.arange(4, dtype=np.float32).tobytes()[:8] * 2, raw)
    with pytest.raises(SafeTensorsError) as e:
        SafeTensorsFile(path)
    msg = str(e.value)
    assert why in msg and path in msg and "\n" not in msg


def test_safetensors_valid_edge_cases_read(tmp_path):
    """Empty tensors (anywhere, even inside another's span) and unsorted entries are valid."""
    a = np.arange(4, dtype=np.float32)
    path = _write_raw(tmp_path / "ok.safetensors", {"b": _entry(shape=(2,), offsets=(8, 16)), "a": _entry(),
                                                    "e": _entry(shape=(0, 3), offsets=(4, 4))}, a.tobytes())
    f = SafeTensorsFile(path)
    assert np.array_equal(f.get("a"), a[:2]) and np.array_equal(f.get("b"), a[2:]) and f.get("e").shape == (0, 3)
    assert list(DTYPES)[:4] == ["F64", "F32", "F16", "BF16"]


# -- row 10: an integer tensor where the model expects floats ---------------------------------------------
def test_integer_tensor_refused_by_loader(tmp_path):
    import jax.numpy as jnp

    from bagel_jax import loading
    from bagel_jax.convert import official
    from bagel_jax.models import flux_vae

    cfg = load_config(DEMO)
    src = SafeTensorsFile(os.path.join(DEMO, "ae.safetensors"))
    tensors = {k: np.array(src.get(k)) for k in src.keys()}
    key = sorted(tensors)[3]
    tensors[key] = tensors[key].astype(np.int32)
    path = str(tmp_path / "ae.safetensors")
    save_file(tensors, path)
    shapes = loading.vae_param_shapes(flux_vae.AutoEncoder(cfg.vae, dtype=jnp.float32))
    with pytest.raises(SafeTensorsError) as e:
        official.load_params(path, flux_vae.key_map(cfg.vae), shapes)
    msg = str(e.value)
    assert path in msg and key in msg and "I32" in msg and "BF16" in msg


# -- row 11: config field types and ranges -------------------------------------------------------------------
def _demo_copy(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    for f in ("llm_config.json", "vit_config.json", "bagel_config.json", "inference.json"):
        shutil.copy(os.path.join(DEMO, f), d / f)
    return d


def _edit(path, **kv):
    d = json.loads(path.read_text())
    for k, v in kv.items():
        if "." in k:
            a, b = k.split(".")
            d[a][b] = v
        else:
            d[k] = v
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("file,field,value", [
    ("llm_config.json", "hidden_size", "128"), ("llm_config.json", "num_hidden_layers", -1),
    ("llm_config.json", "num_attention_heads", 0), ("llm_config.json", "rms_norm_eps", math.nan),
    ("llm_config.json", "rope_theta", math.inf), ("llm_config.json", "vocab_size", 1.5),
    ("llm_config.json", "hidden_act", 3), ("vit_config.json", "num_hidden_layers", "3"),
    ("vit_config.json", "num_hidden_layers", 1), ("vit_config.json", "patch_size", True),
    ("bagel_config.json", "max_latent_size", 0), ("bagel_config.json", "timestep_shift", "x"),
    ("bagel_config.json", "vae_config.ch_mult", [1, 0]), ("bagel_config.json", "vae_config.z_channels", None),
])
def test_config_field_type_and_range(tmp_path, file, field, value):
    d = _demo_copy(tmp_path)
    _edit(d / file, **{field: value})
    with pytest.raises(ConfigError) as e:
        load_config(str(d))
    msg = str(e.value)
    assert str(d / file) in msg and field.split(".")[-1] in msg and "\n" not in msg


@pytest.mark.parametrize("edit,field", [(dict(image_size="big"), "image_size"), (dict(image_size=[32, 0]), "image_size"),
                                        (dict(image_size=[32, 32, 3]), "image_size"), (dict(size=32), "size"),
                                        ({"vae_transform.image_stride": "16"}, "image_stride"),
                                        ({"vit_transform.min_image_size": 99}, "min_image_size")])
def test_inference_json_fields(tmp_path, edit, field):
    d = _demo_copy(tmp_path)
    _edit(d / "inference.json", **edit)
    with pytest.raises(ConfigError) as e:
        folder_defaults(str(d))
    assert str(d / "inference.json") in str(e.value) and field in str(e.value)


def test_config_not_utf8_names_file(tmp_path):
    d = _demo_copy(tmp_path)
    (d / "llm_config.json").write_bytes(b'{"hidden_size": "\xff"}')
    with pytest.raises(ConfigError, match="llm_config.json: not UTF-8"):
        load_config(str(d))


# -- row 13: seeds ------------------------------------------------------------------------------------------
def test_seed_range(capsys, no_load, tmp_path):
    assert np.array_equal(seed_key(MAX_SEED), seed_key(np.int64(MAX_SEED)))
    for bad in (MAX_SEED + 1, 99999999999999999999, -1, 1.5, True):
        with pytest.raises(ContextError, match="seed must be an integer in"):
            seed_key(bad)
    for seed in ("99999999999999999999", "-1"):
        rc, err = _cli(capsys, "generate", "--model-path", DEMO, "--prompt", "p", "--seed", seed,
                       "--out", str(tmp_path / "o"))
        assert rc == 2 and "seed must be an integer in [0, 4294967295]" in err
    rc, err = _cli(capsys, "generate", "--model-path", DEMO, "--prompt", "p", "--prompt", "q",   # q uses seed+1
                   "--seed", str(MAX_SEED), "--out", str(tmp_path / "o"))
    assert rc == 2 and str(MAX_SEED + 1) in err


# -- row 14: 16-bit and other image modes -------------------------------------------------------------------
def test_16bit_grayscale_png(tmp_path):
    vals = np.array([[0, 257, 32896], [40000, 65535, 1000]], np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(vals).save(p)
    assert Image.open(p).mode in ("I;16", "I")
    got = np.asarray(load_image(str(p)))
    want = np.round(vals.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert got.shape == (2, 3, 3) and np.array_equal(got, np.repeat(want[..., None], 3, -1))
    # 32-bit "I" holding 16-bit data, alpha modes on white, float as 0..255
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(vals.astype(np.int32))))[..., 0], want)
    assert np.asarray(to_rgb(Image.new("La", (2, 2), (0, 0)))).tolist() == [[[255] * 3] * 2] * 2
    assert np.asarray(to_rgb(Image.new("PA", (1, 1), (0, 0)))).tolist() == [[[255] * 3]]
    assert np.asarray(to_rgb(Image.fromarray(np.full((1, 1), 300.0, np.float32)))).tolist() == [[[255] * 3]]
    white = np.asarray(to_rgb(Image.new("LAB", (1, 1), (255, 128, 128))))[0, 0]
    assert white.min() >= 250                                             # not copied channel by channel


# -- rows 15, 16: interleave --num-images and --mode explicit ---------------------------------------------------
def test_interleave_num_images_and_explicit(capsys, monkeypatch, no_load, tmp_path):
    assert check_interleave("a", "auto", 0) == ["a"]
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="num_images"):
            check_interleave("a", "auto", bad)
    with pytest.raises(ValueError, match="explicit"):
        check_interleave(["no markers here"], "explicit", 1)
    cases = [(["--num-images", "-1"], "num_images"), (["--num-images", "2", "--mode", "model"], "--mode auto"),
             (["--mode", "explicit"], "<|vision_start|>")]
    for flags, why in cases:
        rc, err = _cli(capsys, "interleave", "--model-path", DEMO, "--prompt", "p", "--out", str(tmp_path / "o"), *flags)
        assert rc == 2 and why in err
    pipe = _FakePipe(str(tmp_path / "zero"))
    monkeypatch.setattr(sample_program, "_load", lambda args: pipe)
    assert sample.main(["interleave", "--model-path", DEMO, "--prompt", "p", "--num-images", "0",
                        "--out", str(tmp_path / "zero")]) == 0
    assert pipe.kw["num_images"] == 0 and pipe.kw["mode"] == "auto"


def test_interleave_api_refuses_before_compute():
    from bagel_jax.inference.api import Pipeline

    pipe = Pipeline(engine=None)   # the checks come before the engine is touched
    with pytest.raises(ValueError, match="explicit"):
        pipe.interleave("no markers", mode="explicit")
    with pytest.raises(ValueError, match="num_images"):
        pipe.interleave("a story", mode="auto", num_images=-1)


# -- row 17: chat survives bad lines ---------------------------------------------------------------------
def test_chat_bad_lines(capsys, monkeypatch, tmp_path):
    pipe = _FakePipe(str(tmp_path / "chat"))
    monkeypatch.setattr(sample_program, "_load", lambda args: pipe)
    lines = ["/image nope.png", "/bogus", "/gen", "/edit make it red", "/image", "hello", "/gen a dog",
             "/edit make it red", "/quit"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    rc = sample.main(["chat", "--model-path", DEMO, "--out", str(tmp_path / "chat")])
    err = capsys.readouterr().err
    assert rc == 0
    assert pipe.conv.calls == [("ask", "hello"), ("gen", "a dog"), ("edit", "make it red")]
    for why in ("image file not found: nope.png", "unknown command /bogus", "/gen needs a prompt",
                "no image in the conversation", "/image needs a path"):
        assert why in err
    md = (tmp_path / "chat" / "transcript.md").read_text(encoding="utf-8")
    assert "image_02.png" in md and "nope.png" in md   # the error is in the transcript too


def test_conversation_edit_without_image():
    from bagel_jax.inference.conversation import Conversation

    conv = object.__new__(Conversation)    # no engine: edit must refuse before any compute
    conv.history = [("user", "text", "hi")]
    with pytest.raises(ValueError, match="no image to edit"):
        conv.edit("make it red")
    conv.history.append(("user", "image", Image.new("RGB", (4, 4))))
    assert conv.has_image


# -- newcomer friction --------------------------------------------------------------------------------------
def test_tokenizer_import_is_quiet():
    code = f"from bagel_jax.tokenizer import load_tokenizer; load_tokenizer({DEMO!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert r.returncode == 0 and "PyTorch was not found" not in r.stderr, r.stderr
