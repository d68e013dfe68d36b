"""Deterministic, checkpointable packing iterator (official ``PackedDataset`` semantics,
docs/architecture.md#training-packing).

One training step consumes ``accum x packs`` packed sequences (``packs`` = the process's share of the
global ``packs_per_step``); each pack is one row of up to ``max_num_tokens`` tokens built greedily:
groups are drawn with probability proportional to ``weight``; at the start of a pack one sample of every
``is_mandatory`` group is inserted; a sample that would overflow is parked in a buffer (at most
``max_buffer_size``) and parked samples are preferred while the pack is shorter than
``prefer_buffer_before``; a pack is emitted once it reaches ``expected_num_tokens`` (or when an
overflowing sample cannot be parked; that sample is dropped).

Static shapes (the only bucketed shapes of training): every array of a step is padded to
``row_len`` = the smallest of ``row_buckets`` that holds the longest pack (ViT, latent and CE token
capacities equal ``row_len``), ``vae_images_per_pack`` VAE images of the smallest ``vae_hw_buckets``
entry that holds them. Every pack is laid out as expert streams (``packing.to_expert_streams``: und
tokens in the first ``und_tokens`` slots, gen tokens in the last ``gen_tokens``) with one split for the
whole step from ``packing.choose_stream_layout`` (values on a grid of ``und_split_steps`` steps of
``row_len``). So a run compiles at most ``len(row_buckets) * len(vae_hw_buckets) * (und_split_steps + 1)
* (und_split_steps + 2)`` programs (distinct row length, VAE size and split; a run sees far fewer).
The split travels with the batch as the array ``expert_split`` ``[accum, packs, 2]`` (und, gen slots)
and reaches the jitted step as a static argument (``bagel_jax.train.step.batch_expert_split``).
Note: zero-padding the VAE batch to the bucket (rather than to the batch maximum as the official code
does) changes the latents of smaller images slightly (GroupNorm sees the padding;
docs/architecture.md#known-official-quirks-we-reproduce).

A data folder that cannot feed training fails fast: ``max_failed_draws`` (default 1000) draws in a row
without a usable sample raise :class:`DataConfigError` naming each group and the reasons counted (bad
rows, samples too long, too many or too large VAE images, no loss); the warning for each bad row is
logged for the first ``WARN_FIRST`` rows of a group, then at most once per ``WARN_EVERY_S`` seconds per
group with the number of rows skipped meanwhile.

Row streams: row ``r`` of the ``R = packs_per_step`` rows of each (micro)step is packed by its own stream,
which reads positions ``r, r+R, r+2R, ...`` of each group's per-epoch permutation with its own draws. An
iterator builds the rows ``rows`` (default: all); a multi-host run gives each process the rows its devices
hold (:mod:`bagel_jax.train.distributed`), so 1 process x 8 devices and 2 x 4 see the same global batch.
State (``get_state()``): ``{"rows": [...]}`` (:mod:`.row_state`), per row a JSON dict of integers (draw
counter, next index per group, buffer of parked ``(group, index)``, skip counters). A sample is a pure
function of ``(seed, group, index, row)``, so restoring the state resumes every stream exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from typing import Optional

import numpy as np
import yaml

from ..config import check_keys, load_yaml
from . import packing, patch_ar
from .datasets import DATASET_CLASSES, DataConfigError, Dropout, SampleError, plan_to_items, sample_stats
from .row_state import select_rows

log = logging.getLogger("bagel_jax.data")

WARN_FIRST = 5          # bad rows of a group logged one by one ...
WARN_EVERY_S = 30.0     # ... then one summary line per group at most this often


def check_numbers(obj, section: str, error=ValueError) -> None:
    """Raise ``error`` naming the field if a field of the dataclass ``obj`` whose default is a number holds
    something else: a bool or a non-number, a non-integer where the default is an integer, or a
    non-finite float (YAML ``.nan`` / ``.inf``). Range checks stay with each config."""
    for f in dataclasses.fields(obj):
        v, kind = getattr(obj, f.name), type(f.default)
        if kind not in (int, float) or isinstance(f.default, bool):
            continue
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        ok = ok and (isinstance(v, int) if kind is int else math.isfinite(v))
        if not ok:
            want = "an integer" if kind is int else "a finite number"
            raise error(f"{section}: {f.name} must be {want}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    seed: int = 42
    groups_file: str = "dataset.yaml"         # relative to the data folder
    # {group name: weight} overriding the groups file's ``weight`` (a mapping in YAML)
    group_weights: tuple[tuple[str, float], ...] = ()
    dropout_text: float = 0.1
    dropout_vit: float = 0.3
    dropout_vae: float = 0.3
    expected_num_tokens: int = 192
    max_num_tokens: int = 256
    max_num_tokens_per_sample: int = 192
    prefer_buffer_before: int = 128
    max_buffer_size: int = 50
    row_buckets: tuple[int, ...] = (128, 256)
    vae_images_per_pack: int = 12
    vae_hw_buckets: tuple[tuple[int, int], ...] = ((64, 64),)
    und_split_steps: int = 8                   # grid of expert-stream capacities per row bucket (module doc)
    packs_per_step: int = 1                    # global number of packs per (micro)step
    prefetch: int = 2
    max_failed_draws: int = 1000               # draws in a row without a usable sample before stopping

    @staticmethod
    def from_dict(d: dict) -> "DataConfig":
        check_keys(DataConfig, d, "data config", DataConfigError)
        d = dict(d)
        if "row_buckets" in d:
            d["row_buckets"] = tuple(int(v) for v in d["row_buckets"])
        if "vae_hw_buckets" in d:
            d["vae_hw_buckets"] = tuple((int(h), int(w)) for h, w in d["vae_hw_buckets"])
        if "group_weights" in d:
            gw = d["group_weights"] or {}
            if not isinstance(gw, dict):
                raise DataConfigError(f"data: group_weights must be a mapping {{group: weight}}, got {gw!r}")
            try:
                d["group_weights"] = tuple((str(k), float(v)) for k, v in gw.items())
            except (TypeError, ValueError):
                raise DataConfigError(f"data: group_weights values must be numbers, got {gw!r}") from None
        c = DataConfig(**d)
        c.validate()
        return c

    def validate(self) -> None:
        check_numbers(self, "data", DataConfigError)
        if not self.row_buckets or max(self.row_buckets) < self.max_num_tokens:
            raise DataConfigError(f"data: row_buckets {list(self.row_buckets)} must include a size >= "
                                  f"max_num_tokens {self.max_num_tokens}")
        if not (0 < self.expected_num_tokens <= self.max_num_tokens):
            raise DataConfigError(f"data: need 0 < expected_num_tokens ({self.expected_num_tokens}) <= "
                                  f"max_num_tokens ({self.max_num_tokens})")
        if self.max_num_tokens_per_sample > self.max_num_tokens:
            raise DataConfigError("data: max_num_tokens_per_sample must be <= max_num_tokens")
        for p in (self.dropout_text, self.dropout_vit, self.dropout_vae):
            if not 0.0 <= p <= 1.0:
                raise DataConfigError(f"data: dropout probabilities must be in [0, 1], got {p}")
        if isinstance(self.und_split_steps, bool) or not isinstance(self.und_split_steps, int) \
                or self.und_split_steps < 1:
            raise DataConfigError(f"data: und_split_steps must be an integer >= 1, got {self.und_split_steps!r}")
        if self.packs_per_step < 1 or self.vae_images_per_pack < 0:
            raise DataConfigError("data: packs_per_step must be >= 1 and vae_images_per_pack >= 0")
        if self.max_failed_draws < 1:
            raise DataConfigError(f"data: max_failed_draws must be >= 1, got {self.max_failed_draws}")


def load_groups(data_dir: str, dcfg: DataConfig) -> dict[str, dict]:
    path = os.path.join(data_dir, dcfg.groups_file)
    if not os.path.isdir(data_dir):
        raise DataConfigError(f"data folder not found: {data_dir}")
    if not os.path.isfile(path):
        raise DataConfigError(f"{data_dir}: missing dataset config {dcfg.groups_file} "
                              "(write one, or generate data with python -m bagel_jax.demo.synthetic)")
    try:
        with open(path) as f:
            groups = load_yaml(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise DataConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(groups, dict) or not groups:
        raise DataConfigError(f"{path}: expected a mapping of dataset groups")
    for name, spec in groups.items():
        if name not in DATASET_CLASSES:
            raise DataConfigError(f"{path}: unknown dataset group {name!r} (supported: {sorted(DATASET_CLASSES)})")
        if not isinstance(spec, dict) or "data_dir" not in spec or "image_transform_args" not in spec:
            raise DataConfigError(f"{path}: group {name!r} needs data_dir and image_transform_args")
    return groups


class PackedIterator:
    """Yields ``(arrays, n_tokens)`` per step: ``arrays`` maps PackedBatch field -> ``[accum, packs, ...]``."""

    def __init__(self, data_dir: str, dcfg: DataConfig, model_cfg, tokenizer, accum: int = 1,
                 rows=None):
        self.dcfg, self.cfg, self.tok = dcfg, model_cfg, tokenizer
        self.accum = accum
        self.num_shards = dcfg.packs_per_step        # row streams of a step (module doc)
        self.rows = list(range(self.num_shards)) if rows is None else sorted({int(r) for r in rows})
        if not self.rows or not all(0 <= r < self.num_shards for r in self.rows):
            raise DataConfigError(f"data: rows {rows} must be a non-empty subset of 0..{self.num_shards - 1}")
        self.packs = len(self.rows)
        self.groups = load_groups(data_dir, dcfg)
        self.names = list(self.groups)
        self.ds = {}
        for n in self.names:
            try:
                self.ds[n] = DATASET_CLASSES[n](data_dir, self.groups[n], tokenizer, model_cfg)
            except DataConfigError:
                raise
            except (KeyError, TypeError, ValueError, OSError) as e:
                raise DataConfigError(f"{os.path.join(data_dir, dcfg.groups_file)}: group {n!r}: "
                                      f"{type(e).__name__}: {e}") from None
        for n, d in self.ds.items():
            if len(d) == 0:
                raise DataConfigError(f"dataset group {n!r} in {data_dir} has no rows")
        override = dict(dcfg.group_weights)
        unknown = sorted(set(override) - set(self.names))
        if unknown:
            raise DataConfigError(f"data: group_weights names {unknown} not in {data_dir}/{dcfg.groups_file} "
                                  f"(groups: {self.names})")
        w = np.array([override.get(n, float(self.groups[n].get("weight", 1.0))) for n in self.names])
        if (w < 0).any() or w.sum() <= 0:
            raise DataConfigError("data: group weights must be >= 0 with a positive sum")
        self.p = w / w.sum()
        self.mandatory = [n for n in self.names if self.groups[n].get("is_mandatory", False)]
        self.dropout = Dropout(dcfg.dropout_text, dcfg.dropout_vit, dcfg.dropout_vae)
        self._perm_cache: dict = {}
        self.states = {r: dict(draw=0, next={n: 0 for n in self.names}, buffer=[],
                               skipped={n: 0 for n in self.names}, too_long=0, dropped=0, packs=0)
                       for r in self.rows}
        self._use_row(self.rows[0])
        self._failed = {}       # (group, reason) -> count over the current run of failed draws
        self._warned = {}       # group -> (rows skipped when last logged, time last logged)

    # -- state --------------------------------------------------------------------------------------
    def _use_row(self, r: int) -> None:
        """Make row stream ``r`` the one ``_draw`` / ``_sample`` / ``_next_pack`` advance."""
        self.shard, self.state = r, self.states[r]

    def get_state(self) -> dict:
        return {"rows": [copy.deepcopy(self.states.get(r)) for r in range(self.num_shards)]}

    def set_state(self, state: dict) -> None:
        self.states = select_rows(state, self.num_shards, self.rows, self.names)
        self._use_row(self.rows[0])

    # -- samples ------------------------------------------------------------------------------------
    def _row(self, g: str, idx: int) -> int:
        N = len(self.ds[g])
        k = idx * self.num_shards + self.shard
        epoch = k // N
        key = (g, epoch)
        if key not in self._perm_cache:
            gid = self.names.index(g)
            if len(self._perm_cache) >= 2 * len(self.names):   # row streams sit in one or two epochs
                self._perm_cache.clear()
            self._perm_cache[key] = np.random.default_rng([self.dcfg.seed, gid, epoch]).permutation(N)
        return int(self._perm_cache[key][k % N])

    def _sample(self, g: str, idx: int):
        """Items of sample ``idx`` of group ``g`` or None (skipped and counted; the reason is kept for
        the error of :meth:`_draw`)."""
        row = self._row(g, idx)
        rng = np.random.default_rng([self.dcfg.seed, self.names.index(g), idx, self.shard, 1])
        try:
            items = patch_ar.expand_items(plan_to_items(self.ds[g].plan(row, rng), rng, self.dropout), self.cfg, rng)
        except SampleError as e:
            self.state["skipped"][g] += 1
            self._fail(g, "unreadable or malformed row")
            self._warn_skip(g, row, e)
            return None
        st = sample_stats(items, self.cfg.vit.patch_size, self.cfg.latent_downsample)
        reason = self._unusable(st)
        if reason:
            self.state["too_long"] += 1
            self._fail(g, reason)
            return None
        return items, st

    def _unusable(self, st) -> Optional[str]:
        """Why a readable sample cannot go into a pack, or None."""
        d = self.dcfg
        max_hw = max(d.vae_hw_buckets, key=lambda b: b[0] * b[1])
        if st.tokens > d.max_num_tokens_per_sample:
            return f"more than data.max_num_tokens_per_sample={d.max_num_tokens_per_sample} tokens"
        if st.vae_images > d.vae_images_per_pack:
            return f"more than data.vae_images_per_pack={d.vae_images_per_pack} VAE images"
        if st.vae_hw[0] > max_hw[0] or st.vae_hw[1] > max_hw[1]:
            return f"a VAE image larger than the largest data.vae_hw_buckets entry {list(max_hw)}"
        if not st.has_loss:
            return "no loss tokens (everything dropped)"
        return None

    def _fail(self, g: str, reason: str) -> None:
        self._failed[(g, reason)] = self._failed.get((g, reason), 0) + 1

    def _warn_skip(self, g: str, row: int, e: Exception) -> None:
        """Rate-limited warning about a bad row (module doc): a data folder full of bad rows must not
        flood the log."""
        n = self.state["skipped"][g]
        last_n, last_t = self._warned.get(g, (0, 0.0))
        now = time.monotonic()
        if n <= WARN_FIRST:
            log.warning("skipping bad sample %s row %d: %s (skipped so far: %d)", g, row, e, n)
        elif now - last_t >= WARN_EVERY_S:
            log.warning("skipping bad samples of %s: %d more since the last message (skipped so far: %d; "
                        "latest: row %d: %s)", g, n - last_n, n, row, e)
        else:
            return
        self._warned[g] = (n, now)

    def _draw(self):
        """The next usable sample ``(group, index, (items, stats))``; DataConfigError after
        ``max_failed_draws`` draws in a row without one."""
        self._failed = {}
        for _ in range(self.dcfg.max_failed_draws):
            rng = np.random.default_rng([self.dcfg.seed, 7, self.shard, self.state["draw"]])
            self.state["draw"] += 1
            g = self.names[int(rng.choice(len(self.names), p=self.p))]
            idx = self.state["next"][g]
            self.state["next"][g] += 1
            s = self._sample(g, idx)
            if s is not None:
                return g, idx, s
        reasons = "; ".join(f"{g}: {n} x {r}" for (g, r), n in sorted(self._failed.items()))
        raise DataConfigError(f"data: no usable sample in {self.dcfg.max_failed_draws} draws in a row "
                              f"(data.max_failed_draws) from groups {self.names}: {reasons}")

    def _next_pack(self) -> list:
        d = self.dcfg
        samples, tokens, nvae = [], 0, 0

        def fits(st):
            return tokens + st.tokens <= d.max_num_tokens and nvae + st.vae_images <= d.vae_images_per_pack

        def add(s):
            nonlocal tokens, nvae
            samples.append(s[0])
            tokens += s[1].tokens
            nvae += s[1].vae_images

        for g in self.mandatory:
            idx = self.state["next"][g]
            self.state["next"][g] += 1
            s = self._sample(g, idx)
            if s is not None and fits(s[1]):
                add(s)
        while True:
            chosen = None
            if self.state["buffer"] and tokens < d.prefer_buffer_before:
                for j, (g, idx) in enumerate(self.state["buffer"]):
                    s = self._sample(g, idx)
                    if s is not None and fits(s[1]):
                        chosen = s
                        del self.state["buffer"][j]
                        break
            if chosen is None:
                g, idx, s = self._draw()
                if not fits(s[1]):
                    if len(self.state["buffer"]) < d.max_buffer_size:
                        self.state["buffer"].append([g, idx])
                        continue
                    self.state["dropped"] += 1
                    if samples:
                        break
                    continue
                chosen = s
            add(chosen)
            if tokens >= d.expected_num_tokens:
                break
        self.state["packs"] += 1
        return samples

    # -- batches ------------------------------------------------------------------------------------
    def next_batch(self) -> tuple[dict[str, np.ndarray], int]:
        return self.collate(self.next_packs())

    def next_packs(self) -> list:
        """The packs of one step, ``accum x len(rows)`` in ``[accum, packs]`` order (not yet collated)."""
        packs = []
        for _ in range(self.accum):
            for r in self.rows:
                self._use_row(r)
                packs.append(self._next_pack())
        return packs

    def layout_stats(self, packs) -> np.ndarray:
        """What the static shapes of a step depend on: ``[tokens, und tokens, gen tokens, VAE height, VAE
        width]``, each the maximum over ``packs`` (int64). A multi-host step collates every process's packs
        with the maximum over processes, so that all agree on the shapes."""
        lens = [sum(sample_stats(s, self.cfg.vit.patch_size, self.cfg.latent_downsample).tokens for s in p)
                for p in packs]
        ds = self.cfg.latent_downsample
        gen = [sum(patch_ar.latent_slots(it, ds) for s in p for it in s if isinstance(it, packing.VaeItem))
               for p in packs]
        hw = [it.image.shape[1:] for p in packs for s in p for it in s if isinstance(it, packing.VaeItem)]
        return np.array([max(lens, default=0), max([n - g for n, g in zip(lens, gen)], default=0),
                         max(gen, default=0), max([h for h, _ in hw], default=0),
                         max([w for _, w in hw], default=0)], np.int64)

    def collate(self, packs, stats=None) -> tuple[dict[str, np.ndarray], int]:
        """The arrays of one step from its packs; ``stats``: :meth:`layout_stats` (of these packs when None)."""
        d = self.dcfg
        lens = [sum(sample_stats(s, self.cfg.vit.patch_size, self.cfg.latent_downsample).tokens for s in p)
                for p in packs]
        n, u, g, mh, mw = (int(v) for v in (self.layout_stats(packs) if stats is None else stats))
        # two stand-in rows with the same longest row, largest und and largest gen count as the real rows
        row_len, und_tokens, gen_tokens = packing.choose_stream_layout([u, n - g], [0, g], d.row_buckets,
                                                                       d.und_split_steps)
        vae_hw = min((b for b in d.vae_hw_buckets if b[0] >= mh and b[1] >= mw), key=lambda b: b[0] * b[1])
        caps = packing.Capacities(rows=1, row_len=row_len, vit_tokens=row_len, latent_tokens=row_len,
                                  vae_images=max(d.vae_images_per_pack, 1), vae_hw=tuple(vae_hw), ce_tokens=row_len,
                                  und_tokens=und_tokens, gen_tokens=gen_tokens)
        batches = [packing.pack([p], self.tok.special, self.cfg, caps).arrays() for p in packs]
        out = {k: np.stack([b[k] for b in batches]).reshape((self.accum, self.packs) + batches[0][k].shape)
               for k in batches[0]}
        out["expert_split"] = np.tile(np.array([und_tokens, gen_tokens], np.int32), (self.accum, self.packs, 1))
        return out, int(sum(lens))

    def __iter__(self):
        while True:
            yield self.next_batch()
