"""Weight files from a hub repository (:func:`pretrained.checkpoints.resolve_hub_weights`): the download into a
staging folder, candidate order, extra files, the check before the cache, and what is left after a failure.

``huggingface_hub`` is replaced by a fake module that serves files from a dict, so nothing is downloaded.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from pretrained.checkpoints import CheckpointError, HubSource, WeightsNotFoundError, resolve_hub_weights

SOURCE = HubSource(repo_id="someone/model", candidates=("unet/weights.safetensors", "unet/weights.bin"),
                   extra_files=("config.json", "scheduler.json"), description="the test weights")
HUB_FOLDER = ("hub", "someone--model", "main")


@pytest.fixture
def hub(monkeypatch):
    """A fake huggingface_hub serving ``hub.files`` (path → bytes); every request is logged in ``hub.calls``."""
    fake = types.ModuleType("huggingface_hub")
    fake.files, fake.calls = {}, []

    def hf_hub_download(repo_id, filename, revision, local_dir):
        fake.calls.append((repo_id, filename, revision))
        if filename not in fake.files:
            raise FileNotFoundError(f"404 {filename}")
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fake.files[filename])
        (Path(local_dir) / ".cache").mkdir(exist_ok=True)   # the hub's own metadata folder
        return str(target)

    fake.hf_hub_download = hf_hub_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    return fake


def test_the_first_candidate_that_exists_is_downloaded_with_its_extra_files(tmp_path, hub):
    hub.files = {"unet/weights.bin": b"weights", "unet/config.json": b"{}"}
    checked = []
    path = resolve_hub_weights(SOURCE, cache=tmp_path, download=True, check=checked.append)
    folder = tmp_path.joinpath(*HUB_FOLDER)
    assert path == folder / "unet" / "weights.bin" and path.read_bytes() == b"weights"
    assert (folder / "unet" / "config.json").read_bytes() == b"{}"     # the extra file beside the weights
    assert not (folder / "unet" / "scheduler.json").exists()            # a missing extra file is skipped
    assert not (folder / ".cache").exists()                             # the hub's metadata is not kept
    assert [c[1] for c in hub.calls] == ["unet/weights.safetensors", "unet/weights.bin", "unet/config.json",
                                         "unet/scheduler.json"]
    assert all(c[0] == "someone/model" and c[2] == "main" for c in hub.calls)
    assert len(checked) == 1 and checked[0].name == "weights.bin" and checked[0].parent.parent != folder
    assert sorted(p.name for p in folder.parent.iterdir()) == ["main"]  # the staging folder is gone

    hub.calls.clear()   # a second call finds the cached file offline, without asking the hub
    assert resolve_hub_weights(SOURCE, cache=tmp_path, download=False) == path and hub.calls == []


def test_no_candidate_downloads_lists_every_error_and_leaves_nothing(tmp_path, hub):
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_hub_weights(SOURCE, cache=tmp_path, download=True)
    msg = str(e.value)
    assert "someone/model" in msg and "404 unet/weights.safetensors" in msg and "404 unet/weights.bin" in msg
    assert "weights=PATH" in msg and str(tmp_path.joinpath(*HUB_FOLDER)) in msg
    assert list(tmp_path.joinpath(*HUB_FOLDER[:2]).iterdir()) == []


def test_a_download_that_fails_its_check_never_enters_the_cache(tmp_path, hub):
    hub.files = {"unet/weights.safetensors": b"wrong"}

    def reject(path):
        raise CheckpointError(f"{path}: missing keys: x")
    with pytest.raises(CheckpointError, match="missing keys"):
        resolve_hub_weights(SOURCE, cache=tmp_path, download=True, check=reject)
    assert list(tmp_path.joinpath(*HUB_FOLDER[:2]).iterdir()) == []


def test_offline_and_missing_package_say_where_to_put_the_file(tmp_path, monkeypatch):
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_hub_weights(SOURCE, cache=tmp_path, download=False)
    assert "offline" in str(e.value) and SOURCE.url("unet/weights.safetensors") in str(e.value)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)   # makes the import fail
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_hub_weights(SOURCE, cache=tmp_path, download=True)
    msg = str(e.value)
    assert "pip install 'diffusion-solvers[hub]'" in msg and str(tmp_path.joinpath(*HUB_FOLDER)) in msg
    assert not tmp_path.joinpath(*HUB_FOLDER[:2]).exists()   # nothing created before the package was found
