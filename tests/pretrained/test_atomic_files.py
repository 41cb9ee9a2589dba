"""The project's one atomic-write helper (:mod:`pretrained.files`) and the pretrained/ writers that use it:
a file appears whole or not at all, with the mode an ordinary ``open`` would give, and no temporary file stays.
"""
from __future__ import annotations

import os
import pickle
import stat

import pytest
import torch

from pretrained.files import atomic_path, atomic_write_bytes, atomic_write_text
from pretrained.train_gmm2d import save_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def test_atomic_write_creates_the_folder_and_gives_the_ordinary_mode(tmp_path, umask_022):
    path = tmp_path / "new" / "folder" / "out.txt"
    atomic_write_text(path, "ρ = 7\n")
    assert path.read_bytes() == "ρ = 7\n".encode("utf-8")
    assert _mode(path) == umask_022                     # mkstemp's 0600 would hide it from other users
    assert os.listdir(path.parent) == ["out.txt"]       # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")           # fails inside the write
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_atomic_path_renames_what_the_block_wrote_and_keeps_the_suffix(tmp_path, umask_022):
    target = tmp_path / "cache" / "weights.pt"
    with atomic_path(target, suffix=".part") as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".part") and not target.exists()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and _mode(target) == umask_022
    assert [p.name for p in target.parent.iterdir()] == ["weights.pt"]


def test_atomic_path_leaves_nothing_when_the_check_in_the_block_fails(tmp_path):
    target = tmp_path / "weights.pt"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="checksum"):
        with atomic_path(target, suffix=".part") as tmp:
            tmp.write_bytes(b"crafted")
            raise ValueError("checksum mismatch")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.pt"]


def test_toy_weights_are_saved_atomically(tmp_path, umask_022):
    path = tmp_path / "weights" / "cm_gmm2d.pt"
    save_atomic({"format": 1, "state_dict": {"w": torch.arange(3.0)}}, path)
    record = torch.load(path, weights_only=True)
    assert record["format"] == 1 and torch.equal(record["state_dict"]["w"], torch.tensor([0.0, 1.0, 2.0]))
    assert _mode(path) == umask_022 and os.listdir(path.parent) == ["cm_gmm2d.pt"]
    with pytest.raises((pickle.PicklingError, AttributeError)):
        save_atomic({"format": 2, "bad": lambda: None}, path)   # cannot be pickled: nothing replaced
    assert torch.load(path, weights_only=True)["format"] == 1 and os.listdir(path.parent) == ["cm_gmm2d.pt"]


def test_the_zoo_report_writes_its_numbers_and_figures_atomically(tmp_path, monkeypatch, umask_022):
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pretrained import zoo_report

    def fake_section(out, n=2000):
        fig = plt.figure(figsize=(1, 1))
        zoo_report._save_figure(fig, out / "gmm2d.png")
        plt.close(fig)
        return {"n": 3}
    monkeypatch.setattr(zoo_report, "gmm2d_section", fake_section)
    assert zoo_report.main(["--out", str(tmp_path), "--skip-mnist", "--threads", "1"]) == 0
    report = json.loads((tmp_path / "zoo_report.json").read_text(encoding="utf-8"))
    assert report["gmm2d"] == {"n": 3} and report["command"] == "python -m pretrained.zoo_report --skip-mnist"
    assert (tmp_path / "gmm2d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["gmm2d.png", "zoo_report.json"]   # no temporary files
    assert _mode(tmp_path / "zoo_report.json") == umask_022 and _mode(tmp_path / "gmm2d.png") == umask_022
