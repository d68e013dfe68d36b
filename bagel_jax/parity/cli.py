"""Parity verifier: run fixture cases through bagel_jax and compare with the official outputs.

    python -m bagel_jax.verify --fixtures DIR [--cases a,b,...] [--save-outputs DIR] [--dtype float32|bfloat16]
                               [--attention NAME]

(``python -m bagel_jax.parity`` is the same command.) DIR is a fixture folder: a checkpoint in the
official layout, ``manifest.json`` and one ``<case>.safetensors`` per case (like
``tests/fixtures/tiny-a``). Everything is driven by the manifest: prompts, image sizes,
sample descriptions, hyperparameters and the recorded random draws. Inputs are rebuilt by our own
preprocessing, tokenizer and packing (so the layout arrays are compared too), through the functions the
engine and the trainer use; recorded noise is injected.

One line per compared array: ``case array max_abs_err ref_scale tol PASS|FAIL``; an array whose shape
differs from the reference's is a FAIL line saying both shapes (never reshaped). Tolerances: see
:mod:`bagel_jax.parity.compare`. Exit status 1 if any comparison fails or a requested case cannot be
run. With ``--dtype bfloat16`` the errors are reported (status INFO) but do not gate the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import jax.numpy as jnp
import numpy as np

from ..convert.safetensors_io import load_file, save_file
from ..nn.attention import ACCELERATOR_AUTO_BLOCKED_MIN_LEN, AUTO_BLOCKED_MIN_LEN, IMPLEMENTATIONS
from . import encoders, engine_cases, gen_step, train_case
from .common import Fixture
from .compare import ShapeMismatch, compare

RUNNERS = {**encoders.RUNNERS, **engine_cases.RUNNERS, **gen_step.RUNNERS, **train_case.RUNNERS}


def runner_for(case: str):
    """The runner of ``case``: by name, else of the longest known name it extends with ``_...`` (variants of
    a case, e.g. ``edit_sampling_taylorseer``, take their settings from the manifest's params)."""
    if case in RUNNERS:
        return RUNNERS[case]
    known = [k for k in RUNNERS if case.startswith(k + "_")]
    return RUNNERS[max(known, key=len)] if known else None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bagel_jax.verify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", required=True, help="fixture folder (checkpoint + manifest.json + <case>.safetensors)")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: every case in the manifest)")
    ap.add_argument("--save-outputs", default=None, metavar="DIR",
                    help="also write DIR/<case>.safetensors with every array computed, under the manifest's names")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype of the Bagel model (bfloat16 reports errors without gating)")
    ap.add_argument("--attention", default="auto", choices=("auto",) + IMPLEMENTATIONS,
                    help="attention implementation of the decoder and the ViT (default auto: 'blocked' with a KV "
                         "cache or above %d keys on CPU, %d on GPU / TPU, else 'xla')"
                         % (AUTO_BLOCKED_MIN_LEN, ACCELERATOR_AUTO_BLOCKED_MIN_LEN))
    return ap


def _report(case: str, meta: dict, arr: dict, ours: dict, gate: bool) -> tuple[bool, dict]:
    """Compare every computed array that has a reference; print one line each. Returns (ok, arrays to save)."""
    ok, saved = True, {}
    for name in sorted(ours):
        val = ours[name]
        if isinstance(val, tuple):      # (ours, reference) for values kept in the manifest, not the file
            val, ref = val
        elif name in arr:
            ref = arr[name]
        else:
            saved[name] = np.asarray(val)
            continue
        saved[name] = np.asarray(val)
        try:
            err, scale, tol, passed = compare(case, name, val, ref)
        except ShapeMismatch as e:
            print(f"{case:<16} {name:<48} shape mismatch: {e}  FAIL")
            ok = False
            continue
        ok &= passed or not gate
        status = ("PASS" if passed else "FAIL") if gate else "INFO"
        print(f"{case:<16} {name:<48} {err:>12.3e} {scale:>11.3e} {tol:>10.1e}  {status}")
    outputs = [k for k, v in meta.get("arrays", {}).items() if v.get("role") == "output"]
    missing = [k for k in outputs if k not in ours]
    if missing:
        print(f"{case:<16} cannot run fully: outputs not computed: {', '.join(missing)}")
        ok = False
    return ok, saved


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    mpath = os.path.join(args.fixtures, "manifest.json")
    if not os.path.isfile(mpath):
        print(f"error: {mpath} not found", file=sys.stderr)
        return 1
    with open(mpath) as f:
        manifest = json.load(f)
    all_cases = list(manifest.get("cases", {}))
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else all_cases
    gate = args.dtype == "float32"
    try:
        fx = Fixture(args.fixtures, manifest, jnp.float32 if gate else jnp.bfloat16, args.attention)
    except Exception as e:
        print(f"error: cannot load the model from {args.fixtures}: {e}", file=sys.stderr)
        return 1
    ok = run(fx, args.fixtures, manifest, cases, args.save_outputs, gate)
    print("verify:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def run(fx: Fixture, folder: str, manifest: dict, cases, save_outputs=None, gate: bool = True) -> bool:
    """Run ``cases`` of the fixture folder with the loaded model ``fx``, printing one line per compared
    array (and writing ``save_outputs/<case>.safetensors``). Returns True when everything passed."""
    if save_outputs:
        os.makedirs(save_outputs, exist_ok=True)
    all_cases = list(manifest.get("cases", {}))
    ok = True
    print(f"{'case':<16} {'array':<48} {'max_abs_err':>12} {'ref_scale':>11} {'tol':>10}  status")
    for case in cases:
        if case not in all_cases:
            print(f"{case:<16} cannot run: not in {os.path.join(folder, 'manifest.json')} "
                  f"(cases: {', '.join(all_cases)})")
            ok = False
            continue
        runner = runner_for(case)
        if runner is None:
            print(f"{case:<16} cannot run: no runner for this case in this version of bagel_jax")
            ok = False
            continue
        meta = manifest["cases"][case]
        try:
            arr = load_file(os.path.join(folder, meta.get("file", f"{case}.safetensors")))
            ours = runner(fx, meta, arr)
        except Exception as e:
            print(f"{case:<16} cannot run: {type(e).__name__}: {e}")
            if os.environ.get("BAGEL_VERIFY_DEBUG"):
                traceback.print_exc()
            ok = False
            continue
        case_ok, saved = _report(case, meta, arr, ours, gate)
        ok &= case_ok
        if save_outputs:
            save_file({k: _storable(v) for k, v in saved.items()}, os.path.join(save_outputs, f"{case}.safetensors"))
    return ok


def _storable(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.float64:
        return x.astype(np.float32)
    if x.dtype == np.int32:
        return x.astype(np.int64)
    return x
