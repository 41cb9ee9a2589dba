"""The ``cd_imagenet64_l2`` loader's U-Net config checks: every way the ``config.json`` beside the weights can be
wrong is named before any weights are read (offline; the weight file is a placeholder that is never opened).
"""
from __future__ import annotations

import json

import pytest

import pretrained
from pretrained.checkpoints import CheckpointError
from pretrained.consistency import CD_TEST_CONFIG

pytest.importorskip("diffusers", reason="cd_imagenet64_l2 runs on diffusers' UNet2DModel (the 'hub' extra)")


def _folder(tmp_path, config_text=None):
    """A save_pretrained-style folder with a placeholder weight file and, if given, this config.json text."""
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"never read")
    if config_text is not None:
        (folder / "config.json").write_text(config_text)
    return folder


def _load_error(folder, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        pretrained.load("cd_imagenet64_l2", weights=folder, **kw)
    return str(e.value)


def test_invalid_json_is_named(tmp_path):
    folder = _folder(tmp_path, "{not json")
    msg = _load_error(folder, strict_config=False)
    assert str(folder / "config.json") in msg and "not valid JSON" in msg


def test_a_missing_config_is_required_only_without_the_published_architecture(tmp_path):
    folder = _folder(tmp_path)
    msg = _load_error(folder, strict_config=False)
    assert "no config.json next to the weights" in msg and "strict_config=False" in msg
    # strict: the published architecture is assumed, so the next check to fail is the weight file itself.
    assert "cannot read" in _load_error(folder)


def test_an_unconditional_unet_is_refused(tmp_path):
    config = {k: v for k, v in CD_TEST_CONFIG.items() if k != "num_class_embeds"}
    msg = _load_error(_folder(tmp_path, json.dumps(config)), strict_config=False)
    assert "num_class_embeds is missing" in msg and "class-conditional" in msg


def test_a_config_diffusers_cannot_build_is_named(tmp_path):
    config = {**CD_TEST_CONFIG, "no_such_argument": 1}
    msg = _load_error(_folder(tmp_path, json.dumps(config)), strict_config=False)
    assert "diffusers cannot build a UNet2DModel" in msg and str(tmp_path / "unet" / "config.json") in msg
