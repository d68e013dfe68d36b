"""A training run's configuration: the YAML file (``model:``, ``train:``, ``data:``) plus ``key=value``
overrides from the command line, parsed into the model, train and data configs; and the up-front check
that the run's output folders can be written."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import yaml

from ..config import config_from_dict, load_yaml
from ..data.loader import DataConfig
from .optimizer import TrainConfig


class TrainSetupError(ValueError):
    """Bad command line / config / workdir."""


def check_init_config(folder_cfg, cfg, init: str) -> None:
    """TrainSetupError unless the model folder ``init`` (config ``folder_cfg``) has the YAML's model ``cfg``.
    ``timestep_shift`` only shapes the training-time t distribution and the image mode only the layout (same
    parameters): a fine-tune may change them."""
    if dataclasses.replace(folder_cfg, timestep_shift=cfg.timestep_shift, image_mode=cfg.image_mode,
                           patch_ar_groups=cfg.patch_ar_groups) != cfg:
        raise TrainSetupError(f"train.init: the folder {init} has a different model config than the YAML "
                              "model: section (use the folder's shapes)")


def yaml_error(path: str, e: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: file, line, column and the parser's complaint."""
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{path}: not valid YAML{where}: {what}"


def check_writable_dir(path: str, what: str, keep: bool = True) -> None:
    """Create ``path`` if needed and write / delete a probe file in it: TrainSetupError naming ``what``
    (e.g. ``--workdir``) if that fails (read-only folder or file system, a file in the way, no space).
    ``keep=False``: folders this check had to create are removed again (``--export`` is written only at the end,
    so a run that fails before then leaves no empty export folder behind)."""
    top = os.path.abspath(path)
    while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
        top = os.path.dirname(top)  # the outermost folder this call would create
    created = not os.path.exists(top)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise TrainSetupError(f"{what} {path} is not a writable folder ({e.strerror or e})") from None
    finally:
        if created and not keep and os.path.isdir(top):
            shutil.rmtree(top, ignore_errors=True)


def parse_value(v: str):
    try:
        return load_yaml(v)
    except yaml.YAMLError:
        return v


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``section.key=value`` (value parsed as YAML) into the raw config dict."""
    raw = json.loads(json.dumps(raw))
    for ov in overrides:
        if "=" not in ov:
            raise TrainSetupError(f"override {ov!r}: expected key=value, e.g. train.lr=2e-5")
        key, val = ov.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] not in ("model", "train", "data"):
            raise TrainSetupError(f"override {ov!r}: key must start with model., train. or data.")
        d = raw
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise TrainSetupError(f"override {ov!r}: {p} is not a section")
        d[parts[-1]] = parse_value(val)
    return raw


def load_train_config(path: str, overrides: list[str]):
    """``(raw dict after overrides, BagelConfig, TrainConfig, DataConfig)`` of the YAML at ``path``."""
    if not os.path.isfile(path):
        raise TrainSetupError(f"config file not found: {path}")
    try:
        with open(path) as f:
            raw = load_yaml(f) or {}
    except yaml.YAMLError as e:
        raise TrainSetupError(yaml_error(path, e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise TrainSetupError(f"cannot read the config file {path}: {e}") from None
    if not isinstance(raw, dict) or "model" not in raw:
        raise TrainSetupError(f"{path}: expected a mapping with a 'model:' section (and optional train:, data:)")
    raw = apply_overrides(raw, overrides)
    cfg = config_from_dict(raw["model"], path)
    tc = TrainConfig.from_dict(raw.get("train") or {})
    dc = DataConfig.from_dict(raw.get("data") or {})
    return raw, cfg, tc, dc
