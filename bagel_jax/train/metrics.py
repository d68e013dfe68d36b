"""Step accounting of a training run: the model FLOPs of a step (MFU numerator), the peak FLOP/s of the
devices, one ``metrics.jsonl`` record per step, and the writer of that file (plus TensorBoard when
``tensorboardX`` is installed).

``metrics.jsonl`` is append-only: every invocation of ``train.py`` first appends a start record
``{"event": "start", "step": S, "resumed": bool, "time": ...}`` (S = the step it starts from), then one
record per step. Nothing is ever deleted, also not on a fresh start over an old file; :func:`read_metrics`
returns the history of the latest run (a start record at step S drops the records after S before it)."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from ..data.packing import allowed_pairs

try:  # optional: TensorBoard scalars beside metrics.jsonl
    from tensorboardX import SummaryWriter
except Exception:  # pragma: no cover - not installed, or a broken install (e.g. protobuf versions)
    SummaryWriter = None


def is_main() -> bool:
    """True on the process that writes files (process 0)."""
    return jax.process_index() == 0


PEAK_TFLOPS = {"v5p": 459.0, "v5e": 197.0, "v5 lite": 197.0, "v6e": 918.0, "v4": 275.0, "h100": 989.0,
               "h200": 989.0, "a100": 312.0, "cpu": 0.1}


def peak_flops_per_device(tc) -> float:
    """``train.peak_tflops_per_device`` if set, else a table entry matched on the device kind (MFU denominator)."""
    if tc.peak_tflops_per_device:
        return tc.peak_tflops_per_device * 1e12
    kind = jax.devices()[0].device_kind.lower()
    for k, v in PEAK_TFLOPS.items():
        if k in kind:
            return v * 1e12
    return PEAK_TFLOPS["cpu"] * 1e12 if jax.devices()[0].platform == "cpu" else 100e12


def step_flops(cfg, batch: dict) -> float:
    """Model FLOPs of one step (forward + backward = 3x forward), counting the work a step needs, once:

    * every real (non-padding) token through one expert's projections and MLP per layer (training runs
      expert streams, so each token's expert runs once; the ``select`` test path would run twice this);
    * decoder attention over the *allowed* (query, key) pairs of the BAGEL mask
      (:func:`bagel_jax.data.packing.allowed_pairs`; QK^T and PV), not over a padded ``L x L`` square:
      dense attention computes more, a block-skipping kernel slightly more, so this is the honest MFU
      numerator (padding slots and masked pairs are waste, not work);
    * the LM head on real CE tokens, the ViT (projections, MLP, full attention within each image) and
      connector on real ViT tokens, ``vae2llm`` / ``llm2vae`` on real latent tokens.

    Not counted: the frozen VAE encoder, norms, RoPE, softmax and the timestep embedder (all small
    next to the matmuls at BAGEL sizes). :func:`step_flops_by_part` gives the same sum by part.
    """
    parts = step_flops_by_part(cfg, batch)
    return sum(parts.values())


def step_flops_by_part(cfg, batch: dict, vae_encode_flops: float = 0.0) -> dict[str, float]:
    """:func:`step_flops` by part: ``decoder matmuls``, ``attention``, ``ViT`` (with the connector),
    ``CE (LM head)``, ``latent heads`` (each 3x its forward) and ``VAE encode`` (the frozen encoder's
    forward, once: ``vae_encode_flops``, which the caller measures, e.g. from XLA's cost analysis; 0 here
    leaves it out as :func:`step_flops` does)."""
    llm, vit = cfg.llm, cfg.vit
    D, F, nl = llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers
    H, K, dh = llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim
    per_tok_layer = 2 * (D * (H + 2 * K) * dh + H * dh * D + 3 * D * F)
    seg = np.asarray(batch["seg"])
    tokens = float((seg > 0).sum())
    pairs = float(allowed_pairs(seg, batch["vis"], batch["nblk"]).sum())
    attn = 4.0 * nl * H * dh * pairs
    n_ce = float(np.asarray(batch["ce_valid"]).sum())
    vit_seg = np.asarray(batch["vit_seg"])
    vit_seg = vit_seg.reshape(-1, vit_seg.shape[-1]) if vit_seg.size else np.zeros((1, 0), np.int32)
    n_vit = float((vit_seg > 0).sum())
    vit_pairs = float(sum((np.bincount(r[r > 0]) ** 2).sum() for r in vit_seg))
    Dv = vit.hidden_size
    vit_fwd = n_vit * (vit.num_hidden_layers * 2 * (4 * Dv * Dv + 2 * Dv * vit.intermediate_size)
                       + 2 * (Dv * D + D * D)) + 4.0 * vit.num_hidden_layers * Dv * vit_pairs
    vae_dest = np.asarray(batch["vae_dest"])
    flat = int(np.prod(seg.shape[-2:]))
    n_lat = float((vae_dest < flat).sum())
    lat_fwd = n_lat * 2 * 2 * cfg.patch_latent_dim * D
    parts = {"decoder matmuls": 3.0 * tokens * nl * per_tok_layer, "attention": 3.0 * attn,
             "ViT": 3.0 * vit_fwd, "CE (LM head)": 3.0 * n_ce * 2 * D * llm.vocab_size,
             "latent heads": 3.0 * lat_fwd}
    if vae_encode_flops:
        parts["VAE encode"] = float(vae_encode_flops)
    return parts


def step_record(step: int, m: dict, ntok: int, dt: float, flops: float, peak: float, compiled: bool,
                dstate: dict) -> dict:
    """One ``metrics.jsonl`` line: the step's metrics ``m`` (floats), throughput (``ntok`` tokens of the
    whole step, over all processes, in ``dt`` seconds; ``flops`` of :func:`step_flops` of the whole step;
    ``peak`` FLOP/s of all devices) and the data iterator's skip counters ``dstate`` (all rows)."""
    return dict(step=step, loss=m["loss"], loss_ce=m["loss_ce"], loss_mse=m["loss_mse"],
                grad_norm=m["grad_norm"], lr=m["lr"], finite=bool(m.get("finite", 1.0)), tokens=int(ntok),
                ce_tokens=_count(m["n_ce"]), mse_tokens=_count(m["n_mse"]), step_time=dt,
                tokens_per_s=ntok / dt, mfu=flops / dt / peak, compiled=compiled,
                data_skipped=int(sum(dstate["skipped"].values())), data_too_long=int(dstate["too_long"]),
                data_dropped=int(dstate["dropped"]))


def read_metrics(path: str) -> list[dict]:
    """The per-step records of the latest run in an append-only ``metrics.jsonl`` (module doc): a start
    record at step S discards the records after S read so far (steps that a resume or fresh start
    redid). Unparsable lines are skipped."""
    out: list[dict] = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or "step" not in rec:
                continue
            if rec.get("event") == "start":
                out = [r for r in out if r["step"] <= rec["step"]]
            else:
                out.append(rec)
    return out


def _count(x: float) -> int:
    """A token count of the step's metrics as an int (-1 if it came out non-finite)."""
    return int(x) if np.isfinite(x) else -1


class MetricsWriter:
    """Appends to ``WORKDIR/metrics.jsonl`` (process 0 only): a start record at ``start_step``, then one
    JSON line per step (:func:`read_metrics` reads the latest run back)."""

    def __init__(self, workdir: str, start_step: int, resumed: bool = False):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = is_main()
        self.f = open(self.path, "a") if self.enabled else None
        self.tb = None
        if self.enabled:
            if self.f.tell() > 0:   # a run killed mid-line: start on a fresh line
                with open(self.path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        self.f.write("\n")
            self._put(dict(event="start", step=int(start_step), resumed=bool(resumed), time=time.time()))
        if self.enabled and SummaryWriter is not None:
            try:
                self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            except Exception:
                self.tb = None

    def _put(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        self._put(rec)
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self):
        if self.f:
            self.f.close()
        if self.tb is not None:
            self.tb.close()
