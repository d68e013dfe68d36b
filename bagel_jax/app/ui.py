"""The page: one tab per capability over :class:`~bagel_jax.app.handlers.Handlers` (Gradio Blocks).

Element ids (``elem_id``) name every control the browser tests use: ``<tab>_<what>`` with tabs ``gen``,
``edit``, ``und``, ``il`` (interleave), ``chat``, ``batch``; the status line of a tab is ``<tab>_status``.
"""

from __future__ import annotations

import dataclasses

from ..inference.cfg import CFG_MODES, RENORM_TYPES, STEP_CACHES
from ..inference.conversation import DEFAULT_MAX_TEXT
from ..inference.decode import SamplingParams
from .handlers import IMAGE_FIELDS, TEXT_FIELDS, Handlers, image_defaults

# label and help of each image setting (values: ImageParams, via handlers.image_defaults)
IMAGE_HELP = {
    "cfg_text_scale": ("text guidance", "CFG scale of the text condition (higher: follows the prompt more)"),
    "cfg_img_scale": ("image guidance", "CFG scale of the input image (editing; 1 = off)"),
    "timestep_shift": ("timestep shift", "shifts the flow schedule toward the noisy end (official 3.0)"),
    "num_timesteps": ("timesteps", "schedule points; N gives N-1 model evaluations"),
    "cfg_renorm_min": ("renorm min", "lower bound of the CFG renormalisation factor (0-1)"),
    "cfg_renorm_type": ("renorm type", "how guided velocities are renormalised"),
    "cfg_mode": ("CFG mode", "how the guidance branches combine"),
    "step_cache": ("step cache", "taylorseer predicts some steps instead of running the model"),
    "cfg_interval_lo": ("CFG from t", "guidance is applied for t in [from, to] (t = 1 is pure noise)"),
    "cfg_interval_hi": ("CFG to t", "upper end of the guidance interval"),
}
CHOICES = {"cfg_renorm_type": RENORM_TYPES, "cfg_mode": tuple(sorted(CFG_MODES)), "step_cache": STEP_CACHES}
TEXT_HELP = {
    "max_new_tokens": ("max tokens", "most decoded tokens (the start token counts)"),
    "do_sample": ("sample", "sample instead of greedy decoding (official default: greedy)"),
    "temperature": ("temperature", "sampling temperature"),
    "top_k": ("top-k", "sample among the k most likely tokens (0 = off)"),
    "top_p": ("top-p", "nucleus mass (1 = off)"),
}


def _setting(gr, name: str, value, label: str, info: str, elem_id: str):
    if name in CHOICES:
        return gr.Dropdown(list(CHOICES[name]), value=value, label=label, info=info, elem_id=elem_id)
    if isinstance(value, bool):
        return gr.Checkbox(value=value, label=label, info=info, elem_id=elem_id)
    return gr.Number(value=value, label=label, info=info, elem_id=elem_id, precision=0 if isinstance(value, int)
                     else None)


def image_settings(gr, tab: str, edit: bool) -> list:
    """Every image setting with its official default (editing or text-to-image), in IMAGE_FIELDS order."""
    d = image_defaults(edit)
    with gr.Accordion("Image settings (official defaults)", open=False):
        with gr.Row():
            return [_setting(gr, k, d[k], *IMAGE_HELP[k], f"{tab}_{k}") for k in IMAGE_FIELDS]


def text_settings(gr, tab: str) -> list:
    d = dict(dataclasses.asdict(SamplingParams()), max_new_tokens=DEFAULT_MAX_TEXT)
    with gr.Accordion("Text settings", open=False):
        with gr.Row():
            return [_setting(gr, k, d[k], *TEXT_HELP[k], f"{tab}_{k}") for k in TEXT_FIELDS]


# small images (the demo model's 32x32) are shown scaled up, sharp
CSS = (".bagel-result img { width: 100% !important; height: 100% !important; object-fit: contain; "
       "image-rendering: pixelated; }")


def _status(gr, tab: str):
    return gr.Textbox(label="status", interactive=False, elem_id=f"{tab}_status")


def _run(gr, tab: str, label: str = "Run"):
    return gr.Button(label, variant="primary", elem_id=f"{tab}_run")


def _image_tab(gr, h: Handlers, tab: str, edit: bool):
    """The generate or edit tab -> its run event (inputs in the order of ``h.generate`` / ``h.edit``)."""
    with gr.Row():
        with gr.Column():
            inputs = [gr.Image(label="input image", type="pil", sources=["upload", "clipboard"],
                               elem_id=f"{tab}_input")] if edit else []
            inputs.append(gr.Textbox(label="instruction" if edit else "prompt", lines=2, elem_id=f"{tab}_prompt"))
            with gr.Row():
                if not edit:
                    inputs.append(gr.Textbox(h.default_size, label="size HxW", elem_id=f"{tab}_size"))
                inputs += [gr.Number(0, label="seed", precision=0, elem_id=f"{tab}_seed"),
                           gr.Checkbox(False, label="think", elem_id=f"{tab}_think"),
                           gr.Number(DEFAULT_MAX_TEXT, label="max think tokens", precision=0)]
            settings = image_settings(gr, tab, edit=edit)
            run = _run(gr, tab)
        with gr.Column():
            image = gr.Image(label="edited" if edit else "image", type="pil", format="png", interactive=False,
                             elem_id=f"{tab}_image", height=320, elem_classes="bagel-result")
            thinking = gr.Textbox(label="thinking", lines=3, interactive=False, elem_id=f"{tab}_thinking")
            status = _status(gr, tab)
    return run.click(h.edit if edit else h.generate, inputs + settings, [image, thinking, status])


def build(h: Handlers, title: str = "BAGEL (JAX)"):
    """The app's Blocks (queue enabled, one request at a time on the shared model)."""
    import gradio as gr   # optional dependency (the [app] extra), imported when a page is built

    events = []
    with gr.Blocks(title=title) as demo:
        with gr.Row():
            gr.Markdown(f"## {title}\nText-to-image, editing, understanding, interleaved text and images, chat. "
                        "Text and images appear as they are produced.")
            stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=0)
        with gr.Tabs():
            with gr.Tab("Generate", id="gen"):
                events.append(_image_tab(gr, h, "gen", edit=False))
            with gr.Tab("Edit", id="edit"):
                events.append(_image_tab(gr, h, "edit", edit=True))
            with gr.Tab("Understand", id="und"):
                with gr.Row():
                    with gr.Column():
                        src = gr.Image(label="image (optional)", type="pil", sources=["upload", "clipboard"],
                                       elem_id="und_input")
                        question = gr.Textbox(label="question", lines=2, elem_id="und_question")
                        with gr.Row():
                            think = gr.Checkbox(False, label="think", elem_id="und_think")
                            seed = gr.Number(0, label="seed", precision=0)
                        tsettings = text_settings(gr, "und")
                        run = _run(gr, "und", "Ask")
                    with gr.Column():
                        answer = gr.Textbox(label="answer", lines=6, interactive=False, elem_id="und_answer")
                        status = _status(gr, "und")
                events.append(run.click(h.understand, [src, question, think, seed] + tsettings, [answer, status]))
            with gr.Tab("Interleave", id="il"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="prompt", lines=2, elem_id="il_prompt")
                        src = gr.Image(label="input image (optional)", type="pil", sources=["upload", "clipboard"])
                        with gr.Row():
                            mode = gr.Radio(["auto", "model", "explicit"], value="auto", label="mode",
                                            info="auto: N x (text, image) then text; model: the model decides; "
                                                 "explicit: an image at each <|vision_start|>")
                            n_img = gr.Number(2, label="images (auto)", precision=0, elem_id="il_num_images")
                        with gr.Row():
                            think = gr.Checkbox(False, label="think")
                            size = gr.Textbox(h.default_size, label="size HxW")
                            seed = gr.Number(0, label="seed", precision=0)
                            max_text = gr.Number(500, label="max tokens per text", precision=0)
                        settings = image_settings(gr, "il", edit=False)
                        run = _run(gr, "il")
                    with gr.Column():
                        out = gr.Chatbot(label="result", elem_id="il_out", height=500)
                        status = _status(gr, "il")
                events.append(run.click(h.interleave, [prompt, src, mode, n_img, think, size, seed, max_text]
                                        + settings, [out, status]))
            with gr.Tab("Chat", id="chat"):
                conv = gr.State(None)
                with gr.Row():
                    with gr.Column(scale=2):
                        history = gr.Chatbot(label="conversation", elem_id="chat_history", height=500)
                        message = gr.Textbox(label="message", lines=2, elem_id="chat_message")
                        with gr.Row():
                            action = gr.Radio(["ask", "image", "edit"], value="ask", label="action",
                                              info="ask: text answer; image: draw; edit: change the latest image",
                                              elem_id="chat_action")
                            send = _run(gr, "chat", "Send")
                            new = gr.Button("New conversation", elem_id="chat_new")
                        status = _status(gr, "chat")
                    with gr.Column(scale=1):
                        attach = gr.Image(label="attach image", type="pil", sources=["upload", "clipboard"],
                                          elem_id="chat_attach")
                        size = gr.Textbox(h.default_size, label="size HxW")
                        think = gr.Checkbox(False, label="think before images")
                        seed = gr.Number(0, label="seed", precision=0)
                        steps = gr.Number(image_defaults(False)["num_timesteps"], label="timesteps", precision=0)
                        tsettings = text_settings(gr, "chat")
                events.append(send.click(h.chat, [message, attach, action, history, conv, size, think, seed, steps]
                                         + tsettings, [history, conv, message, attach, status]))
                new.click(h.reset, None, [history, conv, status])
            with gr.Tab("Batch", id="batch"):
                with gr.Row():
                    with gr.Column():
                        prompts = gr.Textbox(label="prompts (one per line)", lines=4, elem_id="batch_prompts")
                        with gr.Row():
                            n = gr.Number(4, label="images per prompt", precision=0, elem_id="batch_n")
                            size = gr.Textbox(h.default_size, label="size HxW")
                            seed = gr.Number(0, label="first seed", precision=0)
                        settings = image_settings(gr, "batch", edit=False)
                        run = _run(gr, "batch")
                    with gr.Column():
                        gallery = gr.Gallery(label="images", format="png", columns=4, elem_id="batch_gallery")
                        status = _status(gr, "batch")
                events.append(run.click(h.batch, [prompts, n, size, seed] + settings, [gallery, status]))
        stop.click(h.stop, None, None, cancels=events, queue=False)
    demo.queue(default_concurrency_limit=1)
    return demo
