"""sample.py: every subcommand runs on the tiny-a folder (tiny sizes, few steps), --help documents every
flag, bad input gives a clear error, a failure midway saves the partial transcript."""

import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import sample  # noqa: E402
from bagel_jax.cli import checks  # noqa: E402
from bagel_jax.cli import sample as sample_program  # noqa: E402  (the program behind sample.main)


@pytest.fixture(scope="module")
def base(tiny_a, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    img = d / "in.png"
    Image.fromarray((np.random.RandomState(0).rand(32, 48, 3) * 255).astype(np.uint8)).save(img)
    common = ["--model-path", tiny_a, "--vae-transform", "256,32,16", "--vit-transform", "256,28,14",
              "--compilation-cache", str(d / "jaxcache"), "--no-progress", "--dtype", "float32"]
    return dict(dir=d, img=str(img), common=common)


def _run(base, cmd, *args, out="out"):
    out_dir = base["dir"] / out
    rc = sample.main([cmd, *base["common"], "--out", str(out_dir), *args])
    return rc, out_dir


def test_help_documents_every_flag(capsys):
    parser = sample.build_parser()
    sub = parser._subparsers._group_actions[0]
    for name, p in sub.choices.items():
        for a in p._actions:
            assert a.help and a.help.strip(), f"{name}: flag {a.option_strings} has no help"
        text = p.format_help()
        for flag in ("--model-path", "--seed", "--out", "--dtype", "--mesh", "--think", "--cfg-text-scale",
                     "--num-timesteps", "--attention"):
            assert flag in text
    with pytest.raises(SystemExit):
        sample.main(["generate", "--help"])
    assert "--cfg-renorm-type" in capsys.readouterr().out


def test_attention_option_reaches_load(monkeypatch, tiny_a):
    """--attention NAME (every subcommand) reaches bagel_jax.load in its ModelOptions; unknown names are refused."""
    from bagel_jax.inference import api

    seen = {}

    def fake_load(folder, **kw):
        seen.update(kw)
        raise RuntimeError("stop after load")

    monkeypatch.setattr(api, "load", fake_load)
    args = sample.build_parser().parse_args(["understand", "--model-path", tiny_a, "--question", "q",
                                            "--attention", "blocked"])
    with pytest.raises(RuntimeError, match="stop after load"):
        sample_program._load(args)
    assert seen["options"].attention_impl == "blocked"
    required = {"generate": ["--prompt", "p"], "edit": ["--prompt", "p", "--image", "i.png"], "interleave": [],
                "chat": []}
    for cmd, extra in required.items():
        assert sample.build_parser().parse_args([cmd, *extra, "--attention", "xla"]).attention == "xla"
    with pytest.raises(SystemExit):
        sample.build_parser().parse_args(["generate", "--prompt", "p", "--attention", "flash"])


def test_missing_demo_model_says_pass_model_path(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(checks, "DEMO_MODEL", str(tmp_path / "absent"))
    rc = sample.main(["generate", "--prompt", "x"])
    assert rc == 2 and "--model-path" in capsys.readouterr().err


def test_default_model_generates_a_png(tmp_path):
    """The README's command 1: with no --model-path, sample.py uses the embedded demo model (its
    inference.json sets 32x32) and the PNG shows a blue shape on the right (read by the pixel checker)."""
    if not os.path.isdir(sample.DEMO_MODEL):
        pytest.skip("no embedded demo model in this checkout")
    from PIL import Image

    from bagel_jax.demo.checker import detect
    rc = sample.main(["generate", "--prompt", "a blue square on the right", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (32, 32)
    d = detect(np.asarray(Image.open(pngs[0]).convert("RGB")))
    assert (d.colour, d.position) == ("blue", "right"), d


def test_understand(base, capsys):
    rc, out = _run(base, "understand", "--image", base["img"], "--question", "What is it?", "--max-new-tokens", "6")
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.endswith("\n") and (out / "answer.txt").read_text(encoding="utf-8") == printed[:-1]


def test_generate_reproducible(base):
    args = ["--prompt", "a red cat", "--image-size", "32x32", "--num-timesteps", "3", "--seed", "5"]
    rc, out = _run(base, "generate", *args, out="g1")
    rc2, out2 = _run(base, "generate", *args, out="g2")
    assert rc == rc2 == 0
    a, b = np.asarray(Image.open(out / "image_00.png")), np.asarray(Image.open(out2 / "image_00.png"))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)


def test_edit(base):
    rc, out = _run(base, "edit", "--image", base["img"], "--prompt", "make it blue", "--num-timesteps", "3")
    assert rc == 0 and Image.open(out / "edited_00.png").size == (48, 32)


def test_interleave_transcript(base):
    rc, out = _run(base, "interleave", "--prompt", "a story", "--num-images", "1", "--image-size", "32",
                   "--num-timesteps", "3", "--max-text-length", "6", out="il")
    assert rc == 0
    md = (out / "transcript.md").read_text(encoding="utf-8")
    assert "![image 1](image_01.png)" in md and (out / "image_01.png").is_file()


def test_chat(base, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/gen a dog\nwhat is it?\n/quit\n"))
    rc, out = _run(base, "chat", "--image-size", "32", "--num-timesteps", "3", "--max-new-tokens", "6", out="chat")
    assert rc == 0
    md = (out / "transcript.md").read_text(encoding="utf-8")
    assert md.count("**user:**") == 3 and "image_01.png" in md


def test_bad_image_clear_error(base, capsys):
    rc, _ = _run(base, "understand", "--image", str(base["dir"] / "nope.png"), "--question", "q")
    assert rc == 2 and "image file not found" in capsys.readouterr().err


def test_interleave_failure_saves_partial(base, monkeypatch, capsys):
    from bagel_jax.inference import api

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(api, "generate_images", boom)
    rc, out = _run(base, "interleave", "--prompt", "a story", "--num-images", "1", "--image-size", "32",
                   "--num-timesteps", "3", "--max-text-length", "6", out="fail")
    assert rc == 1
    md = (out / "transcript.md").read_text(encoding="utf-8")
    assert "injected failure" in md and "**assistant:**" in md
    assert "partial output saved" in capsys.readouterr().err


def _spy_think(monkeypatch):
    """Record max_length of every thinking decode (Pipeline._think calls api.decode_text)."""
    from bagel_jax.inference import api

    seen, real = [], api.decode_text

    def spy(ctx, max_length, *a, **k):
        seen.append(int(max_length))
        return real(ctx, max_length, *a, **k)

    monkeypatch.setattr(api, "decode_text", spy)
    return seen


def test_interleave_think_keeps_thinking_and_max_think_tokens(base, monkeypatch):
    seen = _spy_think(monkeypatch)
    rc, out = _run(base, "interleave", "--prompt", "a story", "--num-images", "1", "--image-size", "32",
                   "--num-timesteps", "3", "--max-text-length", "4", "--think", "--max-think-tokens", "3",
                   out="il_think")
    assert rc == 0 and seen == [3]                     # one image, its thinking capped by --max-think-tokens
    md = (out / "transcript.md").read_text(encoding="utf-8")
    assert md.count("**assistant (thinking):**") == 1
    assert md.index("(thinking)") < md.index("![image 1]")


def test_chat_think_thinks_before_gen(base, monkeypatch):
    seen = _spy_think(monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/gen a dog\n/quit\n"))
    rc, out = _run(base, "chat", "--image-size", "32", "--num-timesteps", "3", "--think", "--max-think-tokens", "4",
                   out="chat_think")
    assert rc == 0 and seen == [4]
    md = (out / "transcript.md").read_text(encoding="utf-8")
    assert md.index("**assistant (thinking):**") < md.index("![image 1]")
