"""The streamed commands of ``sample.py``: ``interleave`` and the ``chat`` loop, printing text as it is decoded and
writing a Markdown transcript (``transcript.md``) as each item is produced.
JAX-importing modules are imported inside the functions that use them, so that ``--help`` and bad arguments
answer without loading JAX.
"""

from __future__ import annotations

import os
import sys

from .checks import image_kw, mode_kw, text_kw

def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


class Transcript:
    """``transcript.md`` in --out, rewritten after every item so that nothing produced is lost; each image
    is saved as ``image_NN.png`` the moment it exists. Items: ``(role, kind, value)``, kind "text",
    "think", "image" (PIL) or "input" (the path of an input image)."""

    def __init__(self, out: str, items=()):
        self.out, self.n = out, 0
        self.path = os.path.join(out, "transcript.md")
        self.lines = ["# BAGEL transcript", ""]
        write_text(self.path, "\n".join(self.lines))
        for item in items:
            self.add(*item)

    def add(self, role: str, kind: str, value) -> None:
        if kind == "image":
            self.n += 1
            name = f"image_{self.n:02d}.png"
            value.save(os.path.join(self.out, name))
            line = f"**{role}:** ![image {self.n}]({name})"
        elif kind == "input":
            line = f"**{role}:** ![input]({value})"
        elif kind == "think":
            line = f"**{role} (thinking):** {value}"
        else:
            line = f"**{role}:** {value}"
        self.lines += [line, ""]
        write_text(self.path, "\n".join(self.lines))

    def error(self, e: BaseException) -> None:
        self.add("error", "text", f"`{type(e).__name__}: {e}`")


class Printer:
    """Prints streamed text as it arrives (``[thinking] `` before thinking text), one line per block."""

    def __init__(self):
        self.kind = None

    def piece(self, kind: str, text: str) -> None:
        if kind != self.kind:
            self.end()
            print("[thinking] " if kind == "think" else "", end="")
            self.kind = kind
        print(text, end="", flush=True)

    def end(self) -> None:
        if self.kind is not None:
            print(flush=True)
        self.kind = None


STREAM_CHUNK = 8   # tokens per compiled decoding call while printing text as it arrives


def streamed(fn, *a, printer: Printer, **kw):
    """Run ``fn(*a, **kw)`` streamed (bagel_jax.inference.streaming): text pieces are printed as they are
    decoded; returns ``(result, printed)`` with ``printed`` whether any text piece came."""
    from ..inference import streaming   # (JAX: see the module docstring)

    s, printed = streaming.stream(fn, *a, chunk=STREAM_CHUNK, **kw), False
    for ev in s:
        if ev.kind in ("text", "think") and ev.row == 0:
            printer.piece(ev.kind, ev.value)
            printed = True
        elif ev.kind == "image":
            printer.end()
    printer.end()
    return s.result, printed


def cmd_interleave(args, pipe) -> int:
    from ..inference import streaming   # (JAX: see the module docstring)

    shown = [("user", "input", os.path.abspath(p)) for p in args.image] + \
            ([("user", "text", p) for p in args.prompt] if args.mode != "explicit" else [])
    tr = Transcript(args.out, shown)
    printer = Printer()

    def on_item(item):   # text was printed piece by piece; the transcript gets whole items, images at once
        kind, v = item
        tr.add("assistant", kind, v)
        if kind == "image":
            printer.end()
            print(f"[image {tr.n}]", flush=True)

    def run():
        return pipe.interleave(list(args.images) + list(args.prompt), mode=args.mode,
                               num_images=1 if args.num_images is None else args.num_images,
                               image_size=args.image_size or pipe.default_image_size,
                               max_text_length=args.max_text_length, max_interleaved_blocks=args.max_interleaved_blocks,
                               think=args.think, max_think_tokens=args.max_think_tokens, seed=args.seed,
                               progress=False, on_item=streaming.item_hook(on_item), **image_kw(args),
                               **mode_kw(args),
                               **text_kw(args))

    res, _ = streamed(run, printer=printer)
    print(tr.path)
    if res.error is not None:
        tr.error(res.error)
        print(f"error: generation stopped early: {type(res.error).__name__}: {res.error} "
              f"(partial output saved to {tr.path})", file=sys.stderr)
        return 1
    return 0


CHAT_USAGE = ("text = ask; /image PATH = add an image; /gen PROMPT = generate an image; "
              "/edit INSTRUCTION = edit the latest image; /help; /quit")


def _chat_turn(args, conv, tr, line: str) -> bool:
    """One chat line; False ends the session. Bad input (an unreadable image, a command without its
    argument, /edit with no image) prints an error and the session goes on."""
    prog = not args.no_progress
    if not line.startswith("/"):
        tr.add("user", "text", line)
        ans, printed = streamed(conv.ask, line, printer=Printer())   # printed as it is decoded
        tr.add("assistant", "text", ans)
        if not printed:
            print(ans)
        return True
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/quit", "/exit"):
        return False
    if cmd == "/help":
        print(CHAT_USAGE)
    elif cmd not in ("/image", "/gen", "/edit"):
        print(f"error: unknown command {cmd} (usage: {CHAT_USAGE})", file=sys.stderr)
    elif not arg:
        print(f"error: {cmd} needs {'a path' if cmd == '/image' else 'a prompt'} (usage: {CHAT_USAGE})",
              file=sys.stderr)
    elif cmd == "/image":
        conv.add_image(arg)
        tr.add("user", "text", f"[image {arg}]")
    elif cmd == "/edit" and not conv.has_image:
        print("error: /edit: there is no image in the conversation yet; add one with /image PATH or make one "
              "with /gen PROMPT", file=sys.stderr)
    else:
        tr.add("user", "text", arg)
        img, printed = streamed(conv.edit if cmd == "/edit" else conv.generate_image, arg, think=args.think,
                                progress=prog, printer=Printer())
        if conv.last_thinking is not None:     # --think: the thinking text came before the image
            tr.add("assistant", "think", conv.last_thinking)
            if not printed:
                print(f"[thinking] {conv.last_thinking}")
        tr.add("assistant", "image", img)
        print(f"[image {tr.n}]")
    return True


def cmd_chat(args, pipe) -> int:
    defaults = dict(max_new_tokens=args.max_new_tokens, max_think_tokens=args.max_think_tokens, **text_kw(args))
    defaults.update(image_kw(args), **mode_kw(args))
    if args.image_size:
        defaults["image_size"] = args.image_size
    conv = pipe.conversation(think="gen" if args.think else None, seed=args.seed, **defaults)
    tr = Transcript(args.out)
    error = None
    try:
        for path, im in zip(args.image, args.images):
            conv.add_image(im)
            tr.add("user", "text", f"[image {path}]")
        while True:
            if sys.stdin.isatty():
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            try:
                if not _chat_turn(args, conv, tr, line):
                    break
            except ValueError as e:   # bad input in this turn (image, context length, ...): say so, go on
                print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
                tr.error(e)
    except KeyboardInterrupt:
        pass
    except Exception as e:   # keep what was produced (the transcript is already written up to here)
        error = e
    print(tr.path)
    if error is not None:
        print(f"error: {type(error).__name__}: {error} (conversation so far saved to {tr.path})", file=sys.stderr)
        try:
            tr.error(error)
        except OSError:   # the failure may be the disk itself
            pass
        return 1
    return 0
