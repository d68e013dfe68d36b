"""The web app: ``python -m bagel_jax.app [--model-path DIR] [--host 127.0.0.1] [--port 7860]`` (Gradio, the
``[app]`` extra). One model is loaded once and shared by every request; requests are queued and run one at
a time; text and images stream into the page as they are produced.

Modules: :mod:`~bagel_jax.app.handlers` (request handlers, plain generators, testable without a browser),
:mod:`~bagel_jax.app.ui` (the page), :mod:`~bagel_jax.app.__main__` (command line, loading, serving).
"""

from .handlers import Handlers   # gradio itself is imported only when a page is built

__all__ = ["Handlers"]

