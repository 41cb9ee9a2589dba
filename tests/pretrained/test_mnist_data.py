"""The MNIST split of the project's own MNIST models (pretrained.mnist_data): every fifth test image held out."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from bench import datasets
from pretrained import checkpoints, mnist_data

MNIST = checkpoints.ASSETS / "mnist"
needs_mnist = pytest.mark.skipif(not (MNIST / mnist_data.LABELS_FILE).is_file(),
                                 reason=f"MNIST test set not in {MNIST} (shared assets)")


def test_split_is_every_fifth_index_held_out_and_covers_the_test_set_once():
    train, held = mnist_data.split_indices()
    assert train.shape == (8000,) and held.shape == (2000,)
    np.testing.assert_array_equal(held, np.arange(4, 10_000, 5))
    assert np.intersect1d(train, held).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), np.arange(10_000))
    # Both halves of the test set (NIST employees 0-4999, students 5000-9999) give 1,000 held-out images.
    assert (held < 5000).sum() == 1000


@needs_mnist
def test_split_parts_are_the_test_images_and_labels_at_those_indices():
    images = datasets.read_idx_images(MNIST / mnist_data.IMAGES_FILE)
    labels = datasets.read_idx_labels(MNIST / mnist_data.LABELS_FILE)
    for part, index in zip(("train", "heldout"), mnist_data.split_indices()):
        x, y = mnist_data.mnist_split(part)
        assert x.dtype == torch.uint8 and x.shape == (len(index), 1, 28, 28)
        assert y.dtype == torch.int64 and y.shape == (len(index),)
        np.testing.assert_array_equal(x[:, 0].numpy(), images[index])
        np.testing.assert_array_equal(y.numpy(), labels[index])


@needs_mnist
def test_classes_are_balanced_in_both_parts():
    all_labels = datasets.read_idx_labels(MNIST / mnist_data.LABELS_FILE)
    whole = np.bincount(all_labels, minlength=10) / 10_000
    for part, limit in (("train", 0.005), ("heldout", 0.015)):
        share = np.bincount(mnist_data.mnist_split(part)[1].numpy(), minlength=10) / (8000 if part == "train" else 2000)
        assert np.abs(share - whole).max() < limit, (part, share, whole)
        assert share.min() > 0.07


def test_unknown_part_and_missing_files_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="'heldout' \\(2,000\\)"):
        mnist_data.mnist_split("test")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / mnist_data.IMAGES_FILE)):
        mnist_data.mnist_split("train", tmp_path)


def test_files_that_are_not_the_mnist_test_set_are_refused(tmp_path):
    images = np.zeros((3, 28, 28), np.uint8)
    (tmp_path / mnist_data.IMAGES_FILE).write_bytes(gzip.compress(struct.pack(">IIII", 2051, 3, 28, 28)
                                                                  + images.tobytes()))
    (tmp_path / mnist_data.LABELS_FILE).write_bytes(gzip.compress(struct.pack(">II", 2049, 3) + b"\0\1\2"))
    with pytest.raises(ValueError, match=r"10,000 MNIST test images.*\(3, 28, 28\)"):
        mnist_data.mnist_split("heldout", tmp_path)


def test_epoch_batches_use_each_index_once_per_epoch_and_refuse_bad_sizes():
    gen = torch.Generator().manual_seed(0)
    batches = mnist_data.epoch_batches(10, 3, gen)
    epochs = [torch.cat([next(batches) for _ in range(3)]) for _ in range(2)]   # 3 batches of 3, index 10th dropped
    for seen in epochs:
        assert len(seen) == 9 and len(set(seen.tolist())) == 9 and set(seen.tolist()) <= set(range(10))
    assert not torch.equal(epochs[0], epochs[1])
    again = mnist_data.epoch_batches(10, 3, torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([next(again) for _ in range(3)]), epochs[0])
    for bad in (0, 11):
        with pytest.raises(ValueError, match=f"between 1 and the 10 training images, got {bad}"):
            mnist_data.epoch_batches(10, bad, gen)
