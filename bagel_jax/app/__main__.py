"""``python -m bagel_jax.app``: load a model once and serve the page (see :mod:`bagel_jax.app`)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import jax

from ..inference.api import load
from ..runtime import DEFAULT_COMPILATION_CACHE, tune_cpu_malloc, tune_xla_cpu, use_compilation_cache
from .handlers import Handlers
from .ui import CSS, build

DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bagel_jax.app", description="BAGEL web app (Gradio).")
    ap.add_argument("--model-path", default=DEMO_MODEL,
                    help="official BAGEL model folder (default: the embedded demo model bagel_jax/assets/demo)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU")
    ap.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,tensor=T", help="split the model over devices")
    ap.add_argument("--lora", default=None, metavar="ADAPTER", help="apply a LoRA adapter folder (docs/lora.md)")
    ap.add_argument("--chunk", type=int, default=8,
                    help="tokens per compiled decoding call while streaming (default 8)")
    ap.add_argument("--compilation-cache", default=DEFAULT_COMPILATION_CACHE,
                    metavar="DIR", help="JAX persistent compilation cache folder ('' to disable)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.model_path):
        print(f"error: model folder not found: {args.model_path}", file=sys.stderr)
        return 2
    if not 0 <= args.port < 65536 or args.chunk < 1:
        print("error: --port must be in [0, 65535] and --chunk >= 1", file=sys.stderr)
        return 2
    if importlib.util.find_spec("gradio") is None:
        print("error: the app needs gradio: pip install -e '.[app]'", file=sys.stderr)
        return 2
    tune_xla_cpu()   # before JAX's first computation (see bagel_jax/runtime.py)
    tune_cpu_malloc()
    use_compilation_cache(args.compilation_cache, force=True)
    dtype = args.dtype if args.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    t0 = time.time()
    pipe = load(args.model_path, dtype=dtype, mesh=args.mesh, compilation_cache=None, lora=args.lora)
    print(f"loaded {args.model_path} ({dtype}) in {time.time() - t0:.1f}s", file=sys.stderr)
    serve(pipe, args.host, args.port, args.chunk, name=os.path.basename(os.path.normpath(args.model_path)))
    return 0


def serve(pipe, host: str = "127.0.0.1", port: int = 7860, chunk: int = 8, name: str = "demo", block: bool = True):
    """Serve the page for a loaded pipeline; ``block=False`` returns the running Blocks (tests: ``.close()``)."""
    demo = build(Handlers(pipe, chunk), title=f"BAGEL (JAX): {name}")
    demo.launch(server_name=host, server_port=port, show_error=True, footer_links=[], prevent_thread_lock=not block,
                quiet=not block, css=CSS)
    return demo


if __name__ == "__main__":
    sys.exit(main())
