"""A model folder's optional inference.json sets the default image size and input transforms."""

import json

import pytest

from bagel_jax.images import INFERENCE_VAE, ImageTransform
from bagel_jax.inference.api import folder_defaults


def test_folder_defaults(tmp_path):
    assert folder_defaults(str(tmp_path)) == {}
    (tmp_path / "inference.json").write_text(json.dumps({
        "image_size": [64, 48], "vae_transform": {"max_image_size": 64, "min_image_size": 64, "image_stride": 16},
        "vit_transform": {"max_image_size": 56, "min_image_size": 56, "image_stride": 14}}))
    d = folder_defaults(str(tmp_path))
    assert d["image_size"] == (64, 48)
    assert d["vae_transform"] == ImageTransform(64, 64, 16) != INFERENCE_VAE
    assert d["vit_transform"] == ImageTransform(56, 56, 14)


def test_bad_folder_defaults(tmp_path):
    (tmp_path / "inference.json").write_text(json.dumps({"vae_transform": {"max_image_size": 64}}))
    with pytest.raises(ValueError, match="inference.json"):
        folder_defaults(str(tmp_path))
