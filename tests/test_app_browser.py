"""The web app in a real headless browser: Debian's Chromium driven by Playwright's Python client
(``executable_path``, never a browser download) against ``bagel_jax.app`` served on 127.0.0.1 (free port)
with the embedded demo model, loaded once in this process and shared with the checks below.

Generate "a blue square on the right" (the demo checker reads the page's image; it equals the library's);
ask about an uploaded image (the page's answer equals the library's); a two-turn chat, image in and out
(the answer and the drawn image equal a library Conversation's given the same turns); bad input (edit with
no image, invalid sizes) shows its message in the page. Skips with a message only where Chromium,
Playwright or Gradio is missing.
"""

import io
import os
import shutil
import socket

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "bagel_jax", "assets", "demo")
DONE = "v => v.startsWith('done') || v.startsWith('Error') || v.startsWith('Stopped')"


def find_chromium():
    for p in (os.environ.get("BAGEL_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
              "/usr/lib/chromium/chromium", shutil.which("google-chrome")):
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


@pytest.fixture(scope="module")
def app():
    pytest.importorskip("gradio", reason="the app needs gradio (pip install -e '.[app]')")
    pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (requirements-test.txt)")
    exe = find_chromium()
    if exe is None:
        pytest.skip("Chromium not found (install Debian's chromium package, or set BAGEL_CHROMIUM); scripts/test.sh "
                    "installs it where it can")
    if not os.path.isfile(os.path.join(DEMO, "ema.safetensors")):
        pytest.skip("no embedded demo model in this checkout")
    from playwright.sync_api import sync_playwright

    from bagel_jax.app.__main__ import serve
    from bagel_jax.inference.api import load

    pipe = load(DEMO, dtype="float32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = serve(pipe, "127.0.0.1", port, chunk=4, block=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            yield dict(url=f"http://127.0.0.1:{port}/", pipe=pipe, browser=browser)
        finally:
            browser.close()
            demo.close()


@pytest.fixture
def page(app):
    pg = app["browser"].new_page(viewport={"width": 1280, "height": 900})
    pg.goto(app["url"])
    pg.wait_for_selector("#gen_prompt textarea", timeout=60_000)
    yield pg
    pg.close()


def _tab(page, name):
    page.get_by_role("tab", name=name).click()


def _run(page, tab, timeout=300_000) -> str:
    """Click the tab's run button and wait for its status line to say done / Error / Stopped."""
    sel = f"#{tab}_status textarea"
    page.eval_on_selector(sel, "e => e.value = ''")
    page.click(f"#{tab}_run")
    page.wait_for_function(f"(s => {{ const v = document.querySelector(s).value; return ({DONE})(v); }})",
                           arg=sel, timeout=timeout)
    return page.input_value(sel)


def _fetch_image(page, src) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def _page_image(page, selector) -> np.ndarray:
    return _fetch_image(page, page.get_attribute(f"{selector} img", "src"))


def _shape_png(tmp_path, obj=(2, 1, 1)):
    """A demo-world image (default: a blue square on the right) as a PNG file."""
    from bagel_jax.demo import synthetic

    path = tmp_path / "shape.png"
    synthetic.render([obj], 0, 32).save(path)
    return str(path)


def _upload(page, tab, path, selector):
    _tab(page, tab)
    page.set_input_files(f"{selector} input[type=file]", path)
    page.wait_for_selector(f"{selector} img", timeout=30_000)


def test_generate_blue_square(app, page):
    from bagel_jax.demo.checker import detect

    page.fill("#gen_prompt textarea", "a blue square on the right")
    status = _run(page, "gen")
    assert status.startswith("done"), status
    img = _page_image(page, "#gen_image")
    d = detect(img)
    assert (d.colour, d.position, d.shape) == ("blue", "right", "square"), d
    np.testing.assert_array_equal(img, app["pipe"].generate_image("a blue square on the right").arrays[0])


def test_understand_uploaded_image(app, page, tmp_path):
    path = _shape_png(tmp_path)
    _upload(page, "Understand", path, "#und_input")
    page.fill("#und_question textarea", "what colour is the square?")
    status = _run(page, "und")
    assert status.startswith("done"), status
    answer = page.input_value("#und_answer textarea")
    assert answer and answer == app["pipe"].understand(path, "what colour is the square?")


def test_two_turn_chat(app, page, tmp_path):
    """Turn 1: an uploaded image and a question (text out); turn 2: draw (image out) from the whole
    conversation. Both equal a library Conversation given the same turns (the context is kept)."""
    path = _shape_png(tmp_path)
    _upload(page, "Chat", path, "#chat_attach")
    page.fill("#chat_message textarea", "what colour is the square?")
    assert _run(page, "chat").startswith("done")
    page.fill("#chat_message textarea", "a red circle on the left")
    page.get_by_label("image", exact=True).check()
    assert _run(page, "chat").startswith("done")
    conv = app["pipe"].conversation(seed=0)
    conv.add_image(path)
    answer = conv.ask("what colour is the square?")
    drawn = np.asarray(conv.generate_image("a red circle on the left", image_size=(32, 32)))
    shown = page.inner_text("#chat_history")
    for text in ("what colour is the square?", answer, "a red circle on the left"):
        assert text in shown, (text, shown)
    assert shown.index(answer) < shown.index("a red circle on the left")
    imgs = page.locator("#chat_history img")
    assert imgs.count() == 2                                       # the uploaded image, the drawn one
    np.testing.assert_array_equal(_fetch_image(page, imgs.nth(1).get_attribute("src")), drawn)


def test_bad_input_shows_message(page):
    _tab(page, "Edit")
    page.fill("#edit_prompt textarea", "make it red")
    assert _run(page, "edit") == "Error: upload an image to edit"
    _tab(page, "Generate")
    page.fill("#gen_prompt textarea", "a red circle")
    for size, msg in (("30x30", "output image size 30x30"), ("big", "image size must be HxW")):
        page.fill("#gen_size textarea, #gen_size input", size)
        status = _run(page, "gen")
        assert status.startswith("Error: ") and msg in status, status
    page.fill("#gen_size textarea, #gen_size input", "32x32")     # the page still works after errors
    assert _run(page, "gen").startswith("done")
