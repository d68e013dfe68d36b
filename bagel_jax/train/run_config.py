"""A training run's configuration: the YAML file (``model:``, ``train:``, ``data:``) plus ``key=value``
overrides from the command line, parsed into the model, train and data configs."""

from __future__ import annotations

import json
import os

import yaml

from ..config import config_from_dict, load_yaml
from ..data.loader import DataConfig
from .optimizer import TrainConfig


class TrainSetupError(ValueError):
    """Bad command line / config / workdir."""


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
    with open(path) as f:
        raw = load_yaml(f) or {}
    if not isinstance(raw, dict) or "model" not in raw:
        raise TrainSetupError(f"{path}: expected a mapping with a 'model:' section (and optional train:, data:)")
    raw = apply_overrides(raw, overrides)
    cfg = config_from_dict(raw["model"], path)
    tc = TrainConfig.from_dict(raw.get("train") or {})
    dc = DataConfig.from_dict(raw.get("data") or {})
    return raw, cfg, tc, dc
