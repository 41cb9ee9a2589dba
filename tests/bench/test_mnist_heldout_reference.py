"""The MNIST label reader and the "mnist-heldout" reference data set (bench.datasets)."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from bench import datasets
from pretrained import checkpoints, mnist_data

needs_mnist = pytest.mark.skipif(not (checkpoints.ASSETS / "mnist" / mnist_data.IMAGES_FILE).is_file(),
                                 reason="MNIST test set not in the shared assets")


def test_read_idx_labels_round_trip_and_errors(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    (tmp_path / "l.gz").write_bytes(gzip.compress(struct.pack(">II", 2049, 5) + labels.tobytes()))
    np.testing.assert_array_equal(datasets.read_idx_labels(tmp_path / "l.gz"), labels)
    (tmp_path / "plain").write_bytes(struct.pack(">II", 2049, 5) + labels.tobytes())
    np.testing.assert_array_equal(datasets.read_idx_labels(tmp_path / "plain"), labels)
    (tmp_path / "images").write_bytes(struct.pack(">IIII", 2051, 1, 1, 1) + b"\0")
    with pytest.raises(ValueError, match="magic 2051, expected 2049"):
        datasets.read_idx_labels(tmp_path / "images")
    (tmp_path / "short").write_bytes(struct.pack(">II", 2049, 5) + b"\0\0")
    with pytest.raises(ValueError, match="header says 5 labels but the file holds 2 bytes"):
        datasets.read_idx_labels(tmp_path / "short")
    (tmp_path / "tiny").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="too short"):
        datasets.read_idx_labels(tmp_path / "tiny")


def test_mnist_heldout_is_a_known_reference_of_2000_images():
    assert "mnist-heldout" in datasets.REFERENCE_DATASETS
    assert datasets.REFERENCE_SIZES["mnist-heldout"] == 2000
    datasets.check_reference("mnist-heldout")  # no error


@needs_mnist
def test_mnist_heldout_images_are_every_fifth_test_image_in_rgb():
    held = datasets.reference_dataset("mnist-heldout")
    test = datasets.mnist_test_images()
    assert len(held) == 2000
    for i in (0, 1, 1999):
        assert held[i].dtype == torch.uint8 and held[i].shape == (3, 28, 28)
        assert torch.equal(held[i], test[5 * i + 4])
