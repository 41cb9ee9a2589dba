"""Fixtures of the tests of the project's trained models (their committed weight files, one training thread)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from pretrained import toy


@pytest.fixture
def one_thread():
    """One torch thread, as the training scripts use (on a busy shared CPU, 2 threads can be far slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def changed_committed_file(tmp_path, monkeypatch) -> Callable[[str], Path]:
    """``changed_committed_file("fm_mnist.pt")`` → a copy of the committed weights folder (made the folder the
    loaders check against :data:`pretrained.toy.WEIGHTS_SHA256`) in which that file has one byte flipped."""
    folder = tmp_path / "weights"
    shutil.copytree(toy.WEIGHTS_DIR, folder)
    monkeypatch.setattr(toy, "WEIGHTS_DIR", folder)

    def change(name: str) -> Path:
        path = folder / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        return path

    return change
