"""Comparison of one computed array with its reference: shapes first, then values.

Tolerances: ``tol = rtol * max(1, max|ref|)`` with ``rtol = 1e-4`` for single forward passes and ``1e-3``
for arrays accumulated over a multi-step sampling loop (``steps.*``, final latents, decoded images of the
``*_sampling*`` cases, e.g. ``t2i_sampling_taylorseer``); integer and bool
arrays must be equal; uint8 images may differ by one level (truncation boundary).
"""

from __future__ import annotations

import numpy as np

RTOL_FORWARD = 1e-4
RTOL_SAMPLING = 1e-3
SAMPLING_ARRAYS = ("steps.", "final_latent", "decoded")


class ShapeMismatch(ValueError):
    """A computed array's shape differs from the reference's (never reshaped to fit)."""


def tolerance(case: str, name: str, ref: np.ndarray) -> float:
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rtol = RTOL_SAMPLING if ("_sampling" in case and name.startswith(SAMPLING_ARRAYS)) else RTOL_FORWARD
    return rtol * max(1.0, scale)


def compare(case: str, name: str, ours, ref) -> tuple[float, float, float, bool]:
    """``(max_abs_err, ref_scale, tol, passed)``; raises :class:`ShapeMismatch` when the shapes differ."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.shape != ref.shape:
        raise ShapeMismatch(f"{case} {name}: computed shape {ours.shape}, reference shape {ref.shape}")
    scale = float(np.max(np.abs(ref.astype(np.float64)))) if ref.size else 0.0
    if ref.dtype == np.bool_ or np.issubdtype(ref.dtype, np.integer):
        err = float(np.max(np.abs(ours.astype(np.int64) - ref.astype(np.int64)))) if ref.size else 0.0
        if ref.dtype == np.uint8:
            return err, 255.0, 1.0, err <= 1
        return err, scale, 0.0, err == 0
    err = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
    tol = tolerance(case, name, ref)
    return err, scale, tol, bool(np.isfinite(err) and err <= tol)
